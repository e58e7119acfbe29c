"""``GPTDistillationModel``: the NeMo ``ModelPT`` face of :class:`~nemo_kd.models.engine.DistillationEngine`.

Config (Hydra/OmegaConf, see ``conf/gpt_kd.yaml``)::

    student:  GPTModelConfig fields
    student_init: null   # optional: HF directory / converted Megatron checkpoint / .nemo to start from
    teacher:  {mode: offline}                                  # top-k from data.train_ds.logits_store
              {mode: online, checkpoint: PATH, model: null}    # co-located frozen Megatron teacher
              {mode: online, ..., tokenizer: DIR}              # ... with its own tokenizer and template
                                                               #     (cross-tokenizer, prompt_format, top_k)
              {mode: served, url: URL, model: ID, top_k: K}    # a teacher behind vLLM / SGLang /
                                                               #     nemo-kd-serve-teacher (dialect,
                                                               #     api_key_env, concurrency, timeouts;
                                                               #     nemo_kd.training.served_teacher)
              {mode: none}                                     # no teacher: SFT only (the baseline)
    kd:       DistillationLossConfig fields (NeMo-Aligner names: kd_loss_weight, sft_loss_weight,
              logits_scale, target_logits_scale, kd_loss_type, topk_convention, ...)
    optim:    OptimConfig fields (lr, min_lr, warmup_steps, decay_steps, ...)
    parallel: ParallelConfig fields (tensor/pipeline_model_parallel_size, seed, ...)
    data:     {train_ds: {...}, validation_ds: {...} | null}
              each: file_path, logits_store (offline), tokenizer (HF dir), prompt_format,
              max_seq_length, overlong, micro_batch_size, global_batch_size, seed, shuffle
    max_steps: null   # LR schedule length; null: trainer.max_steps

The engine (Megatron DDP + optimizer + scheduler + objective) is built in ``__init__``
after :func:`~nemo_kd.parallel.initialize_parallel` (unless already initialised).
Bad values fail there, with the validators' messages: unknown keys or loss types
(``DistillationLossConfig.validate``), a TP/PP layout that does not split the
architecture (``GPTModelConfig.validate_parallel``), a store not made from this dataset /
tokenizer / length limit (``StoreMismatchError``), an online teacher with another
vocabulary.

Training uses manual optimisation: ``training_step`` gets this rank's list of collated
microbatches of one global batch, calls ``engine.train_step`` and then steps a thin
:class:`_EngineOptimizer` (no parameters update there) through
``self.optimizers().step()``, which is what advances Lightning's ``global_step`` in
manual optimisation. Lightning checkpoints are Megatron dist-checkpoint directories
written by :class:`~nemo_kd.parallel.strategy.MegatronStrategy` (student, optimizer,
scheduler, RNG; reshardable across TP/PP/DP); ``consumed_samples`` (the data position)
is saved in them too and the train sampler resumes from it.

Only the student is part of ``state_dict()`` (``self.student`` is the engine's
Megatron module, a ``ModuleList`` of this rank's model chunks with virtual pipeline stages),
so ``save_to`` writes the student weights to ``model_weights.ckpt``
and ``restore_from`` rebuilds the engine from the config and loads them. Under TP/PP (and
virtual pipeline stages) the ``.nemo`` still holds the full (TP=1, PP=1) student under global
layer numbers, the same file whatever layout saved it, gathered at save and re-sharded at
restore, so a ``.nemo`` restores with any layout (the one the restoring process initialised).
Virtual pipeline stages (``parallel.virtual_pipeline_model_parallel_size``) run Megatron's
interleaved schedule for training, validation and ``forward``, an online teacher chunked like
the student; on-policy sampling needs PP=1 (refused at construction). The student's tokenizer files
(``data.train_ds.tokenizer``) travel inside it as NeMo artifacts (``model.tokenizer``, see
:mod:`nemo_kd.models.nemo_artifacts`): a restored model finds them in ``tokenizer_dir``
wherever it runs, and ``import nemo_kd`` is all ``ModelPT.restore_from`` needs.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from functools import partial
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

import nemo_kd
from nemo.core.classes import ModelPT

from nemo_kd.data.kd_dataset import DataConfigError, DistillationDataset, GlobalBatchSampler, collate
from nemo_kd.data.packing import DEFAULT_PACK_WINDOW, PackedDataset, collate_packed
from nemo_kd.losses.objective import DistillationLossConfig
from nemo_kd.models.config import GPTModelConfig
from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig, check_interleaving
from nemo_kd.models.nemo_artifacts import TOKENIZER_SECTION, register_tokenizer
from nemo_kd.models.router_terms import RouterTerms
from nemo_kd.parallel import state
from nemo_kd.parallel.state import ParallelConfig
from nemo_kd.training.resume import settle_loop_state
from nemo_kd.training.run_config import check_model_config, validation_configured

nemo_kd._allow_nemo_restore()
# Metrics are reduced over data-parallel ranks by the engine already.
warnings.filterwarnings("ignore", message=r".*It is recommended to use `self.log\('val_.*sync_dist=True")

__all__ = ["GPTDistillationModel"]

log = logging.getLogger(__name__)

# The progress bar shows the loss, the terms the config weighs in (kd.<term>_weight > 0) and the rate;
# everything else goes to the loggers only.
_TERM_WEIGHTS = {"kd_loss": ("kd_loss_weight",), "sft_loss": ("sft_loss_weight",),
                 "preference_loss": ("dpo_loss_weight",)}


def _plain(node) -> dict:
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def _virtual_stages() -> Optional[int]:
    """The initialised layout's virtual pipeline stages per rank (None: no interleaving)."""
    return state.config().virtual_pipeline_model_parallel_size if state.config() is not None else None


def _global_tokens(microbatches: List[Dict[str, torch.Tensor]]) -> float:
    """Real (unpadded) input tokens of the whole global batch: this rank's, summed over DP."""
    return _global_token_counts(microbatches)[0]


def _global_token_counts(microbatches: List[Dict[str, torch.Tensor]]) -> tuple:
    """``(real input tokens, loss tokens)`` of the whole global batch, this rank's summed over DP (one
    all-reduce). Real: the positions the model reads that are not padding (``num_tokens``: per row, or per
    packed row its samples' tokens); loss: the positions the objective trains on (``loss_mask`` > 0, the
    completions)."""
    real = sum(int(mb["num_tokens"].sum()) if "num_tokens" in mb else int(mb["inputs"].numel())
               for mb in microbatches)
    trained = sum(int((mb["loss_mask"] > 0).sum()) for mb in microbatches)
    if state.dp_size() == 1:
        return float(real), float(trained)
    total = torch.tensor([real, trained], dtype=torch.float64, device=state.device())
    torch.distributed.all_reduce(total, group=state.dp_group())
    return float(total[0].item()), float(total[1].item())


class _EngineOptimizer(torch.optim.Optimizer):
    """What Lightning sees as the optimizer: the real update happens in ``engine.train_step``.

    ``step()`` only runs Lightning's closure (a no-op in manual optimisation) so that
    ``self.optimizers().step()`` advances ``global_step``; ``param_groups[0]["lr"]``
    mirrors the engine's rate (for ``LearningRateMonitor``). Its state is saved by
    :class:`~nemo_kd.parallel.strategy.MegatronStrategy` (``nemo_kd.models.checkpointing``).
    """

    def __init__(self, engine: DistillationEngine, params):
        self.engine = engine
        super().__init__(params, {"lr": engine.optimizer.param_groups[0]["lr"]})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.param_groups[0]["lr"] = self.engine.optimizer.param_groups[0]["lr"]
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:  # the engine zeroes its grad buffers
        pass

    def state_dict(self) -> Dict[str, Any]:
        # The Megatron optimizer and scheduler live in the engine; MegatronStrategy saves and
        # restores them with the weights (dist_checkpointing), so Lightning's copy stays empty.
        return {}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        pass


class _StepData(torch.utils.data.Dataset):
    """Item = one step: a list of microbatch index lists -> this rank's collated microbatches
    (indices of samples, or of packs with a :class:`~nemo_kd.data.packing.PackedDataset`)."""

    def __init__(self, dataset, seq_length: int, pad_id: int):
        self.dataset, self.seq_length, self.pad_id = dataset, seq_length, pad_id
        self.collate = collate_packed if isinstance(dataset, PackedDataset) else collate

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, microbatches: List[List[int]]) -> List[Dict[str, torch.Tensor]]:
        return [self.collate([self.dataset[i] for i in mb], self.seq_length, self.pad_id) for mb in microbatches]


class _StepSampler:
    """``len()`` steps per Lightning epoch from a :class:`GlobalBatchSampler` started at the
    current data position (``start()``, read at ``iter`` time: after a checkpoint restore)."""

    def __init__(self, num_samples: int, micro: int, gbs: int, seed: int, shuffle: bool, start=lambda: 0,
                 group_size: int = 1):
        self.kw = dict(num_samples=num_samples, micro_batch_size=micro, global_batch_size=gbs,
                       dp_rank=state.dp_rank(), dp_size=state.dp_size(), seed=seed, shuffle=shuffle,
                       group_size=group_size)
        self.start = start
        GlobalBatchSampler(**self.kw)  # validates the sizes now
        self.steps = num_samples // gbs

    def __len__(self) -> int:
        return self.steps

    def step_at(self, consumed_samples: int) -> List[List[int]]:
        """The microbatch index lists of the step that starts at ``consumed_samples`` (what ``__iter__``
        yields there)."""
        return next(iter(GlobalBatchSampler(consumed_samples=consumed_samples, **self.kw)))

    def __iter__(self):
        it = iter(GlobalBatchSampler(consumed_samples=self.start(), **self.kw))
        for _ in range(self.steps):
            yield next(it)


class GPTDistillationModel(ModelPT):
    """Knowledge distillation of a Megatron-core GPT student (offline top-k store or online teacher)."""

    def __init__(self, cfg: DictConfig, trainer=None):
        # Parse and validate everything before touching the parallel state.
        check_model_config(cfg)  # every key under model.*, with the closest valid key
        self._student_cfg = GPTModelConfig.from_dict(_plain(cfg.student))
        self._loss_cfg = DistillationLossConfig.from_dict(_plain(cfg.get("kd")))
        self._progress_bar = {"loss", "lr"} | {term for term, weights in _TERM_WEIGHTS.items()
                                               if any(getattr(self._loss_cfg, w, 0) for w in weights)}
        self._optim_cfg = OptimConfig.from_dict(_plain(cfg.get("optim")))
        self._parallel_cfg = ParallelConfig.from_dict(_plain(cfg.get("parallel")))
        from nemo_kd.generation.on_policy import OnPolicyConfig

        self._on_policy = OnPolicyConfig.from_dict(_plain(cfg.get("on_policy")))
        teacher = _plain(cfg.get("teacher")) or {"mode": "offline"}
        self._teacher_mode = teacher.get("mode", "offline")
        if self._teacher_mode not in ("offline", "online", "served", "none"):
            raise ValueError("teacher.mode must be 'offline', 'online', 'served' or 'none', got "
                             f"{self._teacher_mode!r}")
        self._served_cfg = self._served = None
        if self._teacher_mode == "served":  # a teacher behind an HTTP server scores every step's rows
            from nemo_kd.training.served_teacher import ServedTrainingConfig

            self._served_cfg = ServedTrainingConfig.from_teacher_section(teacher, self._loss_cfg)
        if self._teacher_mode == "none" and self._loss_cfg.kd_loss_weight:
            raise ValueError("teacher.mode=none (SFT only) needs kd.kd_loss_weight=0, got "
                             f"{self._loss_cfg.kd_loss_weight}")
        if self._teacher_mode == "offline" and self._loss_cfg.kd_loss_weight and \
                self._loss_cfg.topk_convention == "exact_tail" and self._loss_cfg.target_logits_scale != 1.0:
            from nemo_kd.losses.objective import STORED_LSE_TEMPERATURE_ERROR

            raise ValueError(STORED_LSE_TEMPERATURE_ERROR)
        if self._on_policy.enabled and (self._teacher_mode not in ("online", "served") or teacher.get("tokenizer")):
            raise ValueError("on_policy.fraction > 0 needs teacher.mode=online (the student's tokenizer) or served: a "
                             "stored teacher's top-k describes the dataset's responses, not the student's samples")
        if self._on_policy.enabled and self._parallel_cfg.pipeline_model_parallel_size > 1:
            raise ValueError("on_policy sampling needs pipeline_model_parallel_size=1 (TP and DP are fine)")
        if self._teacher_mode == "online" and not teacher.get("checkpoint"):
            raise ValueError("teacher.mode=online needs teacher.checkpoint (a Megatron teacher checkpoint directory)")
        data = _plain(cfg.get("data"))
        train_ds = data.get("train_ds") or {}
        self._seq_length = int(train_ds.get("max_seq_length", self._student_cfg.max_position_embeddings))
        if self._seq_length > self._student_cfg.max_position_embeddings:
            raise ValueError(f"data.train_ds.max_seq_length ({self._seq_length}) exceeds student."
                             f"max_position_embeddings ({self._student_cfg.max_position_embeddings})")
        if train_ds.get("pack_sequences", False) and train_ds.get("pack_length") is not None:
            # packed rows may be longer than one sample may be (max_seq_length: a sample's limit)
            pack_length = int(train_ds["pack_length"])
            if not self._seq_length <= pack_length <= self._student_cfg.max_position_embeddings:
                raise ValueError(f"data.train_ds.pack_length ({pack_length}) must lie between max_seq_length "
                                 f"({self._seq_length}) and student.max_position_embeddings "
                                 f"({self._student_cfg.max_position_embeddings})")
            self._seq_length = pack_length
        p = self._parallel_cfg
        # the layout against the architecture and the row length: TP/PP/VPP splits, CP, SP (named refusals)
        self._student_cfg.validate_layout(p, self._seq_length, packed=bool(train_ds.get("pack_sequences", False)),
                                          cross_tokenizer=bool(teacher.get("tokenizer")),
                                          on_policy=self._on_policy.enabled)
        if p.sequence_parallel and self._on_policy.enabled:
            raise ValueError("parallel.sequence_parallel=true with on_policy sampling: generation runs the student on "
                             "rows whose length grows one token at a time, which sequence parallelism cannot split "
                             "over TP: set sequence_parallel=false")
        teacher_model_cfg = (teacher.get("model") or {}) if self._teacher_mode == "online" else {}  # served: an id
        if any(teacher_model_cfg.get(k) is not None for k in ("recompute_granularity", "recompute_method",
                                                                "recompute_num_layers")):
            raise ValueError("teacher.model.recompute_*: an online teacher runs forward-only under no_grad, so there "
                             "is nothing to recompute; set activation recomputation in model.student only")
        super().__init__(cfg=cfg, trainer=trainer)
        self.automatic_optimization = False
        self.tokenizer_dir = self._pack_tokenizer()  # the student's tokenizer, carried by the .nemo

        if not state.is_initialized():
            state.initialize_parallel(self._parallel_cfg)
        layout = (state.tp_size(), state.pp_size(), _virtual_stages())
        asked = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size)
        if layout != asked and self._is_model_being_restored():
            # a .nemo holds the full student: restore into the layout (TP, PP, virtual stages) this process runs with
            self._student_cfg.validate_parallel(state.tp_size(), state.pp_size(), layout[2], state.ep_size(),
                                                state.etp_size())
            log.info("restoring a TP=%d/PP=%d/VPP=%s model with TP=%d/PP=%d/VPP=%s", *asked, *layout)
            (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
             p.virtual_pipeline_model_parallel_size) = layout
            # the experts' TP split of this layout too (None: over TP), so that the saved config is one layout
            p.expert_tensor_parallel_size = state.etp_size() if state.etp_size() != state.tp_size() else None
            with open_dict(self._cfg):
                self._cfg.parallel.tensor_model_parallel_size = state.tp_size()
                self._cfg.parallel.pipeline_model_parallel_size = state.pp_size()
                self._cfg.parallel.virtual_pipeline_model_parallel_size = layout[2]
                self._cfg.parallel.expert_tensor_parallel_size = p.expert_tensor_parallel_size
        elif layout != asked:
            raise ValueError(f"parallel state is already initialised with TP={layout[0]}, PP={layout[1]}, "
                             f"VPP={layout[2]} but the config asks TP={asked[0]}, PP={asked[1]}, VPP={asked[2]}")

        teacher_model = teacher_cfg = None
        restoring = self._is_model_being_restored()
        if self._teacher_mode == "online":
            path = teacher["checkpoint"]
            if os.path.exists(path):
                from nemo_kd.teacher.teachers import load_megatron_teacher, load_megatron_teacher_chunks

                try:
                    if _virtual_stages():  # chunked like the student: one per virtual stage (the interleaved schedule)
                        teacher_model, teacher_cfg = load_megatron_teacher_chunks(path)
                    else:
                        teacher_model, teacher_cfg = load_megatron_teacher(path, state.tp_rank(), state.tp_size(),
                                                                           state.pp_rank(), state.pp_size())
                except ValueError as e:  # e.g. a teacher whose layers do not split over this layout
                    raise ValueError(f"teacher.checkpoint {path}: {e}") from e
                if teacher.get("model"):
                    declared = GPTModelConfig.from_dict(teacher["model"])
                    # recompute is a training setting of the run that saved it, not architecture
                    if declared.architecture_dict() != teacher_cfg.architecture_dict():
                        raise ValueError(f"teacher.model does not match the checkpoint's architecture at {path}")
            elif not restoring:
                raise FileNotFoundError(f"teacher.checkpoint {path} does not exist")
            else:
                log.warning("online teacher checkpoint %s not found: restored model has no teacher", path)

        self._max_steps = self._resolve_max_steps(cfg, trainer)
        batch_cfg = BatchConfig(micro_batch_size=int(train_ds.get("micro_batch_size", 1)),
                                global_batch_size=int(train_ds.get("global_batch_size", 1)),
                                seq_length=self._seq_length)
        init_path = None if restoring else cfg.get("student_init")
        student_arch = self._student_cfg
        if cfg.get("student_hf_architecture"):  # what GPTModelConfig cannot say (RoPE scaling, tanh GELU)
            from nemo_kd.convert.hf_config import HFArchitecture

            student_arch = HFArchitecture.from_dict({**_plain(cfg.student_hf_architecture),
                                                     "model": self._student_cfg.to_dict()})
        self._teacher, self._teacher_model_cfg = teacher, teacher_cfg
        self.engine = DistillationEngine(student_arch, self._loss_cfg, self._optim_cfg, batch_cfg,
                                         max_steps=self._max_steps, teacher_cfg=teacher_cfg,
                                         student_init_path=init_path, teacher_model=teacher_model,
                                         cross_tokenizer=bool(teacher.get("tokenizer")),
                                         moe_load_log_interval=cfg.get("moe_load_log_interval", 100))
        if init_path:
            # The checkpoint's architecture is the student's now: record all of it (and forget
            # the path) so that a .nemo of this model restores without the original checkpoint.
            log.info("student initialised from %s", init_path)
            self._student_cfg = self.engine.student_cfg
            extras = self.engine.student_arch.to_dict()
            extras.pop("model")
            with open_dict(self._cfg):
                self._cfg.student = OmegaConf.create(self._student_cfg.to_dict())
                self._cfg.student_hf_architecture = OmegaConf.create(extras)
                self._cfg.student_init = None
        # registered: the student weights are this model's state_dict. With virtual pipeline stages a ModuleList
        # of this rank's chunks (``student.<chunk>.*``, chunk i = virtual stage i); .nemo and Lightning checkpoints
        # hold global names either way (save_to gathers, the strategy saves Megatron's sharded state dicts).
        self.student = self.engine.module
        if self._served_cfg is not None and not restoring:  # connects now: a wrong url / model fails here
            from nemo_kd.training.served_teacher import ServedStepTeacher

            self._served = ServedStepTeacher(self._served_cfg, vocab_size=self._student_cfg.vocab_size)
        self.consumed_samples = 0
        self._train_samples = self._val_samples = None

        if not restoring:
            if data.get("train_ds") and not train_ds.get("defer_setup", False):
                self.setup_training_data(cfg.data.train_ds)
            if validation_configured(cfg) and not data["validation_ds"].get("defer_setup", False):
                self.setup_validation_data(cfg.data.validation_ds)

    @staticmethod
    def _resolve_max_steps(cfg, trainer) -> int:
        if cfg.get("max_steps"):
            return int(cfg.max_steps)
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        return 1

    # ------------------------------------------------------------------ data

    def _build_loader(self, ds_cfg, train: bool):
        ds = _plain(ds_cfg)
        split = "train_ds" if train else "validation_ds"
        if not ds.get("file_path"):
            raise DataConfigError(f"data.{split}.file_path is required")
        from transformers import AutoTokenizer

        from nemo_kd.data.records import read_records
        from nemo_kd.data.tokenization import ConversationTokenizer

        tok_path = self._data_tokenizer(ds.get("tokenizer"), split)
        tok = AutoTokenizer.from_pretrained(tok_path)
        if len(tok) > self._student_cfg.vocab_size:
            raise DataConfigError(f"tokenizer {tok_path} has {len(tok)} tokens, more than student.vocab_size "
                                  f"({self._student_cfg.vocab_size})")
        max_len = int(ds.get("max_seq_length", self._seq_length))
        if max_len > self._seq_length:
            raise DataConfigError(f"max_seq_length {max_len} exceeds the training seq_length {self._seq_length}")
        ctok = ConversationTokenizer(tok, ds.get("prompt_format", "chat"), max_len, ds.get("overlong", "truncate"))
        records = read_records(ds["file_path"], skip_bad_samples=bool(ds.get("skip_bad_samples", False)),
                               split=ds.get("split"))
        store = None
        if self._teacher_mode == "offline":
            if not ds.get("logits_store"):
                raise DataConfigError("teacher.mode=offline needs data.*.logits_store (a teacher top-k store)")
            from nemo_kd.teacher.store import StoreReader

            store = StoreReader(ds["logits_store"], verify_checksums=bool(ds.get("verify_logits_store", False)))
            tv = store.manifest.teacher_vocab_size
            if tv and tv > self._student_cfg.vocab_size and not getattr(store, "cross_tokenizer", False):
                raise DataConfigError(f"the store's teacher vocabulary ({tv}) is larger than student.vocab_size "
                                      f"({self._student_cfg.vocab_size}): same-tokenizer KD needs a shared "
                                      "vocabulary (a cross-tokenizer store comes from compute_topk_logits with "
                                      "align_teacher_template=true)")
        teacher_ctok = teacher_vocab = None
        if self._teacher_mode == "online" and self._teacher.get("tokenizer"):
            # cross-tokenizer online KD: the teacher reads its own rendering of every conversation
            t_tok = AutoTokenizer.from_pretrained(self._teacher["tokenizer"])
            teacher_ctok = ConversationTokenizer(t_tok, self._teacher.get("prompt_format", "chat"), max_len,
                                                 ds.get("overlong", "truncate"))
            teacher_vocab = self._teacher_model_cfg.vocab_size if self._teacher_model_cfg is not None else None
        dataset = DistillationDataset(records, ctok, store=store,
                                      k=self._teacher.get("top_k") if teacher_ctok is not None else ds.get("top_k"),
                                      teacher_tokenizer=teacher_ctok, student_vocab_size=self._student_cfg.vocab_size,
                                      teacher_vocab_size=teacher_vocab,
                                      # what the KD term will read from the store (nothing when it weighs 0)
                                      topk_convention=self._loss_cfg.topk_convention if store is not None and any(
                                          (self._loss_cfg.kd_loss_weight, self._loss_cfg.positive_kd_weight,
                                           self._loss_cfg.negative_kd_weight)) else None)
        micro, gbs = int(ds.get("micro_batch_size", 1)), int(ds.get("global_batch_size", 1))
        if train and (micro, gbs) != (self.engine.batch_cfg.micro_batch_size, self.engine.batch_cfg.global_batch_size):
            raise DataConfigError("train_ds micro/global batch size differs from the engine's")
        if not train and _virtual_stages():  # the engine checks the training batches; validation runs interleaved too
            try:
                check_interleaving(BatchConfig(micro, gbs).num_microbatches(state.dp_size()), state.pp_size(),
                                   _virtual_stages())
            except ValueError as e:
                raise DataConfigError(f"data.{split}: {e}") from e
        rows = dataset
        if ds.get("pack_sequences", False):  # rows of whole samples; the batch sizes count rows (nemo_kd.data.packing)
            if self._on_policy.enabled:
                raise DataConfigError(f"data.{split}.pack_sequences: on-policy sampling rewrites the rows' "
                                      "completions; it runs on unpacked rows (set pack_sequences: false)")
            # Every spec reads packed rows in Megatron's THD layout (packing.ModelInputs: PackedSeqParams with
            # qkv_format="thd"); TE's DotProductAttention takes them as Megatron's own packed training does.
            rows = PackedDataset(dataset, self._seq_length, int(ds.get("pack_window", DEFAULT_PACK_WINDOW)),
                                 int(ds.get("seed", 1234)), bool(ds.get("shuffle", train)))
            log.info("%s: %d samples packed into %d rows of %d (padding %.1f%%, window %d)", ds["file_path"],
                     len(dataset), len(rows), self._seq_length, 100 * rows.padding_fraction,
                     int(ds.get("pack_window", DEFAULT_PACK_WINDOW)))
        sampler = _StepSampler(len(rows), micro, gbs, int(ds.get("seed", 1234)),
                               bool(ds.get("shuffle", train)),
                               start=(lambda: self.consumed_samples) if train else (lambda: 0),
                               group_size=rows.group_size)  # packed: packs hold whole pairs
        if dataset.group_size == 2 and self._loss_cfg.dpo_loss_weight == 0:
            log.warning("%s holds preference pairs but kd.dpo_loss_weight=0: only the token-level terms train",
                        ds["file_path"])
        if dataset.dropped_pairs:
            log.warning("%d preference pair(s) of %s dropped: a side exceeds max_seq_length=%d", dataset.dropped_pairs,
                        ds["file_path"], max_len)
        self._report_drops(dataset, ds["file_path"], "train" if train else "validation")
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        if train:  # what on-policy sampling needs of the tokenizer
            self._sampling_ids = dict(eos_id=tok.eos_token_id, pad_id=pad_id, vocab_size=len(tok))
        loader = torch.utils.data.DataLoader(_StepData(rows, self._seq_length, pad_id), sampler=sampler,
                                             batch_size=None, num_workers=int(ds.get("num_workers", 0)))
        return loader, gbs

    def _report_drops(self, dataset: DistillationDataset, file_path: str, split: str) -> None:
        """Name every sample of ``file_path`` that will not train: in the log (the first few) and, whole, in
        ``dropped.jsonl`` (``dropped.validation.jsonl``) of the run directory; the count goes to the first
        step's metrics (``dropped_samples``)."""
        drops = dataset.drops
        total = len(dataset.records) + len(dataset.records.skipped)  # samples read + lines that were no sample
        if split == "train":
            self._dropped_train_samples = len(drops)
        if not drops:
            return
        shown = "; ".join(f"{d['file']}:{d['line']}" + (f" (sample {d['sample']})" if "sample" in d else "")
                          + f": {d['reason']}" for d in drops[:5])
        run_dir = getattr(self._trainer, "default_root_dir", None) if self._trainer is not None else None
        path = os.path.join(run_dir, "dropped.jsonl" if split == "train" else f"dropped.{split}.jsonl") \
            if run_dir else None
        log.warning("%s: %d of %d samples will not %s: %s%s%s", file_path, len(drops), total,
                    "train" if split == "train" else "be validated", shown, " ..." if len(drops) > 5 else "",
                    f" (all listed in {path})" if path else "")
        if path and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            from nemo_kd.generation.stages import atomic_write_jsonl

            atomic_write_jsonl(path, [dict(split=split, **d) for d in drops])

    def setup_training_data(self, train_data_config):
        self._train_dl, self._train_gbs = self._build_loader(train_data_config, train=True)

    def setup_validation_data(self, val_data_config):
        self._validation_dl, self._val_gbs = self._build_loader(val_data_config, train=False)

    @classmethod
    def list_available_models(cls):
        return None

    # ------------------------------------------------------------------ Lightning

    def configure_optimizers(self):
        self._optimizer = _EngineOptimizer(self.engine, [p for p in self.student.parameters() if p.requires_grad])
        return self._optimizer

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None):
        """Student logits ``[B, S, V/TP]`` of ``input_ids`` ``[B, S]``: this rank's vocabulary shard (TP=1: every
        column). Under pipeline parallelism every rank of the pipeline calls it (a collective, no gradient): the
        rows go through Megatron's forward-only schedule, every model chunk (virtual stage) in its turn; the last
        stage returns the logits, the other stages ``None``."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if state.pp_size() == 1:
            return self.student(input_ids, position_ids, None)
        device = state.device()
        rows = [{"inputs": input_ids[r:r + 1].to(device), "position_ids": position_ids[r:r + 1].to(device)}
                for r in range(input_ids.shape[0])]
        if _virtual_stages():  # the interleaved schedule runs groups of PP microbatches: copies of row 0, dropped
            rows += rows[:1] * (-len(rows) % state.pp_size())

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            return model(mb["inputs"], mb["position_ids"], None), \
                lambda logits: (logits.new_zeros(()), {"logits": logits.detach()})

        with torch.no_grad():
            outs = self.engine._run_schedule(list(self.engine.chunks), forward_step, rows, forward_only=True)
        if not state.is_pipeline_last_stage():
            return None
        return torch.cat([o["logits"] for o in outs[: input_ids.shape[0]]], dim=0)

    def training_step(self, batch: List[Dict[str, torch.Tensor]], batch_idx: int):
        t0 = time.perf_counter()
        on_policy = None
        served = self._served
        if self._on_policy.enabled:  # GKD: this step's completions are the student's own samples
            from nemo_kd.generation.on_policy import resample_step

            on_policy = resample_step(self.engine.module, batch, self._on_policy, step=self.global_step,
                                      global_batch_size=self.engine.batch_cfg.global_batch_size,
                                      dp_rank=state.dp_rank(), **self._sampling_ids,
                                      on_sampled=partial(served.submit_sampled, self.global_step) if served else None)
        step_batch = on_policy or batch
        if served is not None:  # the server's top-k for this step's rows; the next step's requested now
            step_batch = served.attach(self.global_step, step_batch)
            self._prefetch_served_rows(self.global_step + 1)
        metrics = self.engine.train_step(step_batch)
        if self._on_policy.enabled:
            metrics["on_policy"] = float(on_policy is not None)
        self.optimizers().step()  # advances global_step (the engine already updated the weights)
        elapsed = max(time.perf_counter() - t0, 1e-9)
        if served is not None:
            metrics.update(served.step_metrics(elapsed))  # teacher_wait_s, teacher_wait_frac
        gbs = self.engine.batch_cfg.global_batch_size
        self.consumed_samples += gbs
        real_tokens, loss_tokens = _global_token_counts(on_policy or batch)
        metrics["tokens/s"] = real_tokens / elapsed  # real input tokens, not padding
        metrics["loss_tokens/s"] = loss_tokens / elapsed  # the tokens the loss trains on (loss_mask)
        metrics["padded_tokens/s"] = gbs * self.engine.batch_cfg.seq_length / elapsed
        metrics["consumed_samples"] = float(self.consumed_samples)
        if self.global_step == 1 and getattr(self, "_dropped_train_samples", None) is not None:
            metrics["dropped_samples"] = float(self._dropped_train_samples)  # named in the log and dropped.jsonl
        interval = {k: float(v) for k, v in metrics.items() if k.startswith(RouterTerms.INTERVAL_METRIC_PREFIXES)}
        for name, value in metrics.items():
            if name not in interval:
                self.log(name, float(value), prog_bar=name in self._progress_bar, batch_size=gbs)
        if interval:
            self._log_this_step_only(interval)
        # the steps completed (optimizers().step() above has already counted this one), as trainer.global_step
        self.log("global_step", float(self.global_step), batch_size=gbs)
        return torch.tensor(metrics["loss"])

    def _log_this_step_only(self, metrics: Dict[str, float]) -> None:
        """Write ``metrics`` to the loggers at this step alone. ``self.log`` would not do: Lightning keeps a
        step-logged key until the epoch ends and hands its last value to the loggers again at every later step,
        so the expert load of every ``moe_load_log_interval``-th step would show as flat copies in between.
        The step is the one Lightning logs this batch's other metrics at (``_batches_that_stepped`` before the
        loop increments it)."""
        trainer = self._trainer
        if trainer is None or not trainer.loggers:
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _prefetch_served_rows(self, step: int) -> None:
        """Served teacher: request ``step``'s dataset rows (the sampler's next global batch) while this step
        trains; not past the run's last step, nor for a step that trains on the student's samples."""
        from nemo_kd.generation.on_policy import use_student_samples

        if step >= self._max_steps or (self._on_policy.enabled and use_student_samples(self._on_policy, step)):
            return
        data, sampler = self._train_dl.dataset, self._train_dl.sampler
        consumed = self.consumed_samples + self.engine.batch_cfg.global_batch_size
        self._served.prefetch(step, lambda: data[sampler.step_at(consumed)])

    def validation_step(self, batch: List[Dict[str, torch.Tensor]], batch_idx: int):
        if self._served is not None:
            batch = self._served.score_now(batch, f"validation batch {batch_idx}")
        metrics = self.engine.eval_step(batch)
        gbs = getattr(self, "_val_gbs", None) or 1
        for name, value in metrics.items():
            self.log(f"val_{name}", float(value), batch_size=gbs, prog_bar=name == "loss")
        return metrics["loss"]

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["consumed_samples"] = self.consumed_samples
        # Lightning saves mid-step (before the step's logger step and completed batch are counted): save the
        # loop state of the finished step, so that the resumed run logs at the next TensorBoard step and keeps
        # the uninterrupted run's epoch boundaries (nemo_kd.training.resume).
        settle_loop_state(checkpoint)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.consumed_samples = int(checkpoint.get("consumed_samples", 0))
        # Checkpoints saved before settle_loop_state existed: the same correction here (this hook runs before
        # Lightning restores its loops from this dict; on a settled checkpoint it changes nothing).
        settle_loop_state(checkpoint)

    def _model_parallel(self) -> bool:
        return state.is_initialized() and state.tp_size() * state.pp_size() * state.ep_size() > 1

    # ------------------------------------------------------------------ .nemo

    def _pack_tokenizer(self) -> Optional[str]:
        """Register the student's tokenizer files as artifacts (:mod:`nemo_kd.models.nemo_artifacts`).

        A new model packs ``data.train_ds.tokenizer`` (the tokenizer it trains with); a restored
        one finds the files NeMo extracted and keeps them in nemo_kd's cache, since NeMo's
        extraction directory is deleted when ``restore_from`` returns. Returns that local
        directory (``AutoTokenizer.from_pretrained`` loads it), ``None`` if there is none.
        """
        source = None
        if not self._is_model_being_restored():
            path = (_plain(self._cfg.get("data")).get("train_ds") or {}).get("tokenizer")
            if path and os.path.isdir(path):
                source = path
            elif path and not os.path.exists(path):
                log.warning("data.train_ds.tokenizer=%s is not a local directory: the .nemo will not carry the "
                            "tokenizer (pass a directory to make it self-contained)", path)
        return register_tokenizer(self, _plain(self._cfg.get(TOKENIZER_SECTION)) or None, source)

    def _data_tokenizer(self, path: Optional[str], split: str) -> str:
        """``data.<split>.tokenizer``, or the tokenizer this model carries when that is unset or is the
        directory the carried files came from and it is not on this machine (a restored model)."""
        packed = getattr(self, "tokenizer_dir", None)
        source = (_plain(self._cfg.get(TOKENIZER_SECTION)) or {}).get("source")
        if path and (os.path.exists(path) or packed is None or os.path.abspath(path) != source):
            return path
        if packed is None:
            raise DataConfigError(f"data.{split}.tokenizer is required (this model carries no tokenizer)")
        if path:
            log.info("data.%s.tokenizer %s is not on this machine: using the model's own copy %s", split, path, packed)
        return packed

    def _save_nemo(self, save_path: str):
        """``ModelPT.save_to`` under a temporary name, renamed by the writing rank: an interrupted save
        never leaves a truncated file under ``save_path``."""
        from nemo.utils.get_rank import is_global_rank_zero

        if "://" in str(save_path):  # object storage (multistorageclient): NeMo's own upload
            return super().save_to(save_path)
        save_path = os.path.abspath(os.path.expanduser(str(save_path)))
        partial = os.path.join(os.path.dirname(save_path), f".{os.path.basename(save_path)}.partial")
        try:
            out = super().save_to(partial)
            if is_global_rank_zero():
                os.replace(partial, save_path)
            return out
        finally:
            if is_global_rank_zero() and os.path.exists(partial):
                os.remove(partial)

    def _chunk_prefixes(self) -> List[str]:
        """Where ``load_state_dict`` takes each model chunk's ``GPTModel`` keys: ``student.`` (one chunk) or
        ``student.<i>.`` (virtual stage i), then ``module.`` for each wrapper around it. (``Float16Module.state_dict``
        leaves its ``module.`` out, but torch's ``load_state_dict`` walks into the wrapped module by name.)"""
        from nemo_kd.convert.hf_weights import unwrap_model

        chunks = list(self.engine.chunks)
        prefixes = []
        for i, chunk in enumerate(chunks):
            prefix = "student." if len(chunks) == 1 else f"student.{i}."
            while chunk is not unwrap_model(chunk):
                prefix, chunk = prefix + "module.", chunk.module
            prefixes.append(prefix)
        return prefixes

    def save_to(self, save_path: str):
        """Write ``.nemo``: the config, the *full* (TP=1, PP=1) student weights and its tokenizer files.

        Under TP/PP (and virtual pipeline stages) the shards of data-parallel replica 0 are gathered to global
        rank 0 (``gather_object``: CPU copies, fine for students that fit one host's memory), merged with
        :func:`~nemo_kd.models.gather_state_dict` and written by rank 0; ``restore_from`` shards them again for
        whatever layout it runs with. The keys are ``student.`` + the full ``GPTModel``'s (global layer numbers):
        the same file whatever layout saved it.
        """
        if not self._model_parallel():
            return self._save_nemo(save_path)
        import torch.distributed as dist

        from nemo_kd.models import gather_state_dict
        from nemo_kd.models.sharding import merge_expert_shards

        local = [{k: v.detach().cpu() for k, v in chunk.state_dict().items() if torch.is_tensor(v)}
                 for chunk in self.engine.chunks]
        # One copy of every shard: DP replica 0's, and under EP each EP rank's experts (the ranks of
        # expert-data-parallel rank 0 hold one (PP, TP, EP) position each).
        ep, etp = state.ep_size(), state.etp_size()
        if etp != state.tp_size() and (etp != 1 or ep > 1):
            raise NotImplementedError(f"save_to with expert_tensor_parallel_size={etp} at TP={state.tp_size()}, "
                                      f"EP={ep}: gathering covers experts split over TP, or held whole at EP=1")
        first_copy = dist.get_rank(group=state.expert_dp_group()) == 0 if ep > 1 else state.dp_rank() == 0
        item = (state.pp_rank(), state.tp_rank(), state.ep_rank() if ep > 1 else 0, local) if first_copy else None
        items = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(item, items, dst=0)
        if dist.get_rank() == 0:
            pp, vpp = state.pp_size(), len(local)
            by_ep = [[[None] * ep for _ in range(state.tp_size())] for _ in range(pp)]
            for it in items:
                if it is not None:
                    by_ep[it[0]][it[1]][it[2]] = it[3]
            # The model's stages in layer order: virtual stage v of pipeline rank r is stage v * PP + r
            # (sharding.layer_offset), so the chunks form a non-interleaved pipeline of PP * VPP stages.
            shards = [[merge_expert_shards([chunks[v] for chunks in parts], self._student_cfg) for parts in by_ep[r]]
                      for v in range(vpp) for r in range(pp)]
            # keeps this layout's padded vocab rows; experts held whole (expert TP 1) taken once
            full = gather_state_dict(shards, self._student_cfg, expert_tp_size=etp)
            self._export_state = {f"student.{k}": v for k, v in full.items()}
        try:
            return self._save_nemo(save_path)
        finally:
            self._export_state = None
            dist.barrier()

    def state_dict(self, *args, **kwargs):
        if getattr(self, "_export_state", None) is not None:
            return dict(self._export_state)
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        if self._is_model_being_restored() and state.is_initialized():
            # .nemo holds the full student (see save_to): take this rank's shard of every chunk (vocab rows padded
            # for this TP, the layers of each virtual stage)
            from nemo_kd.models import shard_state_dict

            full = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
            vpp = _virtual_stages()
            state_dict = {}
            for i, prefix in enumerate(self._chunk_prefixes()):
                shard = shard_state_dict(full, self._student_cfg, state.tp_rank(), state.tp_size(), state.pp_rank(),
                                         state.pp_size(), i if vpp else None, vpp, ep_rank=state.ep_rank(),
                                         ep_size=state.ep_size(), etp_rank=state.etp_rank(), etp_size=state.etp_size())
                state_dict.update({prefix + k: v for k, v in shard.items()})
        out = super().load_state_dict(state_dict, strict=strict, **kwargs)
        if hasattr(self.engine.optimizer, "reload_model_params"):  # refresh fp32 main params (bf16 students)
            self.engine.optimizer.reload_model_params()
        return out
