"""The Megatron side of a distillation step: student, optimizer, schedule, teacher.

:class:`DistillationEngine` owns this rank's student chunk wrapped in Megatron's
``DistributedDataParallel``, Megatron's optimizer and LR/WD scheduler, an optional
co-located frozen teacher (online mode, same TP/PP layout), and the joint objective.
:meth:`train_step` runs one global batch through Megatron's own
``get_forward_backward_func`` (microbatches, pipeline stages, DP gradient reduction
in ``finalize_model_grads``) and the optimizer step — the same code on GPU and, with
:mod:`nemo_kd.parallel.cpu_shim`, on CPU. The NeMo model class
(:mod:`nemo_kd.models.distillation_model`) drives it from a Lightning ``Trainer``.

Normalisation (contract (B) of :mod:`nemo_kd.losses.reduction`): before the schedule
runs, the global counts of KD tokens, SFT tokens and preference pairs are computed
from this step's microbatches and all-reduced over DP; each microbatch's loss is its
exact contribution to the global-batch objective times ``M·DP``, which the schedule
(÷M) and DDP's gradient average (÷DP) undo. Each term is thus a mean over the whole
global batch, whatever the microbatch split.

Context parallelism (``parallel.context_parallel_size`` CP > 1): the CP ranks of a DP rank read the
same microbatches and each keeps its ``S/CP`` positions of every per-position tensor, Megatron's
load-balanced chunks (:func:`~nemo_kd.data.context_parallel.microbatch_on_cp_rank`; the model's RoPE
and TE's attention follow that layout themselves). An online teacher runs the same cut rows with the
same CP layout, so its logits come out for this rank's positions. The token counts are summed over
DP×CP, the pairs counted once (:func:`~nemo_kd.losses.objective.objective_normalisers`); each sample's
sequence log-prob is summed over the CP group inside the objective, whose every output (loss and
metrics) then sums over DP×CP ranks to the global value, which ``_reduce_reports`` does. The schedule
multiplies each loss by CP and DDP averages over DP×CP (megatron-core 0.16.1,
``forward_step_calc_loss`` and ``DistributedDataParallel``'s ``gradient_scaling_factor``): net ÷(M·DP)
per rank as without CP, so ``scale`` stays ``M·DP`` and the CP ranks' gradients add up.

Deferred output projection (``kd.fuse_output_layer``): the student's forward runs inside
:class:`~nemo_kd.models.deferred_projection.DeferredOutputProjection`, so the last stage
returns its final hidden states and the objective receives
:class:`~nemo_kd.losses.projection.ProjectedLogits` (hidden states + the output weight),
computing the logits chunk by chunk; the weight's gradient reaches DDP as usual. An online
teacher then keeps its final hidden states (not its logits) for the loss, which projects them
chunk by chunk beside the student's.

Mixed precision (``params_dtype`` bf16/fp16, from ``trainer.precision``): Megatron's own path,
as Megatron-LM trains — the student in ``Float16Module``, DDP reducing fp32 grads
(``grad_reduce_in_fp32``), ``Float16OptimizerWithFloat16Params`` stepping fp32 main params; fp16
adds Megatron's loss scaling (``config.grad_scale_func = optimizer.scale_loss``: the schedule
scales each microbatch's loss, the optimizer unscales, skips a step whose grads overflow and
lowers the scale; the scheduler then does not advance, ``skipped_steps`` counts it). The
objective reads the logits in the model's dtype and accumulates in fp32; the online teacher
runs in the student's dtype.

Online teacher: with PP > 1 the teacher's activations travel through its own
pipeline, so the teacher runs first, forward-only, over the step's microbatches, and
its logits shards (``[b, s, V/TP]``, the teacher's dtype) are kept on the last stage
for the student's loss. The teacher never sees gradients.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from nemo_kd.align.loss import CrossTokenizerTeacher
from nemo_kd.data.context_parallel import microbatch_on_cp_rank
from nemo_kd.data.packing import ModelInputs
from nemo_kd.losses.objective import (
    DistillationLossConfig,
    DistillationObjective,
    FullTeacher,
    ObjectiveBatch,
    TopKTeacher,
    check_reduction_under_context_parallel,
    objective_normalisers,
)
from nemo_kd.losses.projection import ProjectedLogits
from nemo_kd.losses.vocab_parallel import mask_padded_vocab_, padded_vocab_valid_columns
from nemo_kd.models.builder import half_precision_output, in_params_dtype
from nemo_kd.models.deferred_projection import DeferredOutputProjection, run_model
from nemo_kd.models.router_terms import RouterTerms, check_token_dropping
from nemo_kd.models.config import GPTModelConfig
from nemo_kd.parallel import state


@dataclass
class OptimConfig:
    """Adam + warmup/cosine, as NeMo/Megatron users set them."""

    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # default: the run's max_steps
    decay_style: str = "cosine"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False  # Megatron's DistributedOptimizer: Adam state sharded over DP
    # fp16 students only (Megatron's loss scaling; bf16 and fp32 need none). ``loss_scale``:
    # None = dynamic (Megatron's DynamicGradScaler: start at ``initial_loss_scale``, halve after
    # ``hysteresis`` overflowing steps, never below ``min_loss_scale``, double after
    # ``loss_scale_window`` clean steps); a number = that static scale. Megatron's defaults.
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: float = 1000
    hysteresis: int = 2

    def __post_init__(self):
        if self.loss_scale is not None and not self.loss_scale > 0:
            raise ValueError(f"optim.loss_scale must be None (dynamic) or > 0, got {self.loss_scale}")
        if not 0 < self.min_loss_scale <= self.initial_loss_scale:
            raise ValueError(f"optim needs 0 < min_loss_scale ({self.min_loss_scale}) <= initial_loss_scale "
                             f"({self.initial_loss_scale})")
        if self.loss_scale_window < 1 or self.hysteresis < 1:
            raise ValueError(f"optim.loss_scale_window ({self.loss_scale_window}) and optim.hysteresis "
                             f"({self.hysteresis}) must be >= 1")

    @classmethod
    def from_dict(cls, d) -> "OptimConfig":
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown optim keys {unknown}")
        return cls(**d)


@dataclass
class BatchConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 1
    seq_length: int = 512

    def num_microbatches(self, dp_size: int) -> int:
        per_step = self.micro_batch_size * dp_size
        if self.global_batch_size % per_step:
            raise ValueError(f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size × "
                             f"data-parallel size ({self.micro_batch_size} × {dp_size})")
        return self.global_batch_size // per_step


def check_interleaving(num_microbatches: int, pp: int, vpp: Optional[int]) -> None:
    """Megatron's interleaved schedule (virtual pipeline stages) runs the microbatches in groups of PP per
    virtual stage: a step's microbatch count must be a multiple of PP (else it raises mid-step)."""
    if vpp and num_microbatches % pp:
        raise ValueError(f"virtual_pipeline_model_parallel_size={vpp}: Megatron's interleaved schedule needs the "
                         f"microbatches per step (global_batch_size / (micro_batch_size x data-parallel size) = "
                         f"{num_microbatches}) to be a multiple of pipeline_model_parallel_size ({pp})")


def _objective_batch(mb: Dict[str, torch.Tensor], teacher_logits: Optional[torch.Tensor]) -> ObjectiveBatch:
    if CrossTokenizerTeacher.in_microbatch(mb):  # the teacher's own tokenisation, aligned (nemo_kd.align)
        teacher = CrossTokenizerTeacher.from_microbatch(mb, teacher_logits)
    elif teacher_logits is not None:
        teacher = FullTeacher(teacher_logits)
    elif "teacher_values" in mb:
        teacher = TopKTeacher(mb["teacher_values"], mb["teacher_ids"], mb.get("teacher_lse"), mb.get("teacher_log_tail"))
    else:
        teacher = None
    return ObjectiveBatch(mb["labels"], mb["loss_mask"], teacher, mb.get("roles"), mb.get("pair_ids"),
                          mb.get("teacher_seq_logprob"), mb.get("sample_of_position"))


class DistillationEngine:
    """Student + optimizer + scheduler (+ online teacher) for this rank. Parallel state must be initialised."""

    def __init__(self, student_cfg, loss_cfg: DistillationLossConfig, optim_cfg: OptimConfig,
                 batch_cfg: BatchConfig, max_steps: int, teacher_cfg: Optional[GPTModelConfig] = None,
                 student_init_path: Optional[str] = None, teacher_model: Optional[torch.nn.Module] = None,
                 cross_tokenizer: bool = False, moe_load_log_interval: int = 100):
        """``student_cfg``: a :class:`GPTModelConfig` or an ``HFArchitecture`` (ignored when
        ``student_init_path`` names a checkpoint to start from). Online teacher: ``teacher_cfg``
        (its architecture, checked against the student's vocabulary) and ``teacher_model``,
        this rank's already loaded chunk (without it a randomly initialised one is built).
        ``cross_tokenizer``: the online teacher has its own tokenizer/vocabulary; the
        microbatches carry its tokenisation and the alignment (:mod:`nemo_kd.align`).
        ``moe_load_log_interval``: an MoE student's per-layer expert load is logged every this many
        steps (0: never; :mod:`nemo_kd.models.router_terms`)."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        if not state.is_initialized():
            raise RuntimeError("initialise parallel state (nemo_kd.parallel.initialize_parallel) before the engine")
        loss_cfg.validate()
        check_reduction_under_context_parallel(loss_cfg, state.cp_size())  # before anything is built
        self.max_steps = max_steps
        self.num_microbatches = batch_cfg.num_microbatches(state.dp_size())
        if state.config() is not None:
            check_interleaving(self.num_microbatches, state.pp_size(),
                               state.config().virtual_pipeline_model_parallel_size)
        from nemo_kd.convert.hf_config import HFArchitecture

        if student_init_path:
            # A converted nemo_kd Megatron checkpoint or a Hugging Face directory, loaded at this
            # run's TP/PP; its architecture (incl. RoPE scaling etc.) replaces student_cfg.
            from nemo_kd.convert.checkpoint_io import build_and_load

            loaded = build_and_load(student_init_path)
            self.chunks, self.student_arch = list(loaded.model_chunks), loaded.arch
        else:
            from nemo_kd.convert.checkpoint_io import build_model_chunks

            # An HFArchitecture carries what GPTModelConfig cannot (RoPE scaling, tanh GELU):
            # a student restored from a .nemo of an HF-initialised model is built the same way.
            self.student_arch = student_cfg if isinstance(student_cfg, HFArchitecture) \
                else HFArchitecture(family=None, model=student_cfg)
            self.chunks = build_model_chunks(self.student_arch)
        # Virtual pipeline stages (interleaved schedule): one model chunk per virtual stage, each in its
        # own DDP (Megatron-LM's layout: bucketing for the first chunk only), one optimizer over all.
        # ``module`` is the chunk itself without them, a ModuleList of the chunks with them.
        self.module = self.chunks[0] if len(self.chunks) == 1 else torch.nn.ModuleList(self.chunks)
        student_cfg = self.student_arch.model
        if state.config() is not None:  # CP / SP against this layout and row length (named refusals)
            student_cfg.validate_layout(state.config(), batch_cfg.seq_length, cross_tokenizer=cross_tokenizer)
            if teacher_cfg is not None and state.cp_size() > 1:  # the online teacher runs the same cut rows
                teacher_cfg.validate_layout(state.config(), batch_cfg.seq_length, cross_tokenizer=cross_tokenizer)
        self.student_cfg, self.loss_cfg, self.optim_cfg, self.batch_cfg = student_cfg, loss_cfg, optim_cfg, batch_cfg
        # MoE student: the router's aux / z losses as their own objective term, the experts' load
        self.router_terms = None
        if student_cfg.is_moe:
            self.router_terms = RouterTerms(student_cfg, self.chunks, moe_load_log_interval)
        if teacher_cfg is not None and not cross_tokenizer and teacher_cfg.padded_vocab_size(state.tp_size()) != \
                student_cfg.padded_vocab_size(state.tp_size()):
            raise ValueError(f"online teacher vocabulary ({teacher_cfg.vocab_size}) differs from the student's "
                             f"({student_cfg.vocab_size}); cross-tokenizer online KD needs the alignment pipeline "
                             "(cross_tokenizer=True and DistillationDataset(teacher_tokenizer=...))")
        self.ddps = [DistributedDataParallel(
            config=chunk.config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=optim_cfg.use_distributed_optimizer
            ),
            module=chunk, disable_bucketing=i > 0,
        ) for i, chunk in enumerate(self.chunks)]
        self.ddp = self.ddps[0]
        # The schedule reads the first chunk's config; every chunk's gets the same hooks.
        tconfigs = [chunk.config for chunk in self.chunks]
        for tconfig in tconfigs:
            tconfig.no_sync_func = self.ddp.no_sync if len(self.ddps) == 1 else [d.no_sync for d in self.ddps]
            tconfig.finalize_model_grads_func = finalize_model_grads
        # bf16/fp16: Megatron's Float16OptimizerWithFloat16Params (fp32 main params; the grads
        # arrive in fp32 through grad_reduce_in_fp32 above), as Megatron-LM trains them.
        fp16 = student_cfg.params_dtype == "fp16"
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=optim_cfg.lr, min_lr=optim_cfg.min_lr, weight_decay=optim_cfg.weight_decay,
                adam_beta1=optim_cfg.adam_beta1, adam_beta2=optim_cfg.adam_beta2, adam_eps=optim_cfg.adam_eps,
                clip_grad=optim_cfg.clip_grad, bf16=student_cfg.params_dtype == "bf16", fp16=fp16,
                params_dtype=student_cfg.torch_dtype, loss_scale=optim_cfg.loss_scale,
                initial_loss_scale=optim_cfg.initial_loss_scale, min_loss_scale=optim_cfg.min_loss_scale,
                loss_scale_window=optim_cfg.loss_scale_window, hysteresis=optim_cfg.hysteresis,
                use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
            ),
            self.ddps,
        )
        # fp16: the schedule multiplies each microbatch's loss by the optimizer's loss scale
        # before backward (schedules.backward_step), which optimizer.step() divides out of the
        # fp32 main grads, skipping the step on inf/NaN — what Megatron-LM's training sets up.
        for tconfig in tconfigs:
            tconfig.grad_scale_func = self.optimizer.scale_loss if fp16 else None
        decay_steps = optim_cfg.decay_steps or max_steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim_cfg.warmup_steps else optim_cfg.lr, max_lr=optim_cfg.lr,
            min_lr=optim_cfg.min_lr, lr_warmup_steps=optim_cfg.warmup_steps,
            lr_decay_steps=max(decay_steps, optim_cfg.warmup_steps + 1), lr_decay_style=optim_cfg.decay_style,
            start_wd=optim_cfg.weight_decay, end_wd=optim_cfg.weight_decay, wd_incr_steps=max(decay_steps, 1),
            wd_incr_style="constant",
        )
        self.objective = DistillationObjective(loss_cfg, group=state.tp_group(), vocab_size=student_cfg.vocab_size,
                                               cp_group=state.cp_group() if state.cp_size() > 1 else None)
        if loss_cfg.fuse_output_layer and cross_tokenizer:
            raise ValueError("fuse_output_layer does not cover cross-tokenizer KD: set kd.fuse_output_layer=false")
        # the output layer is in the last chunk (of the last stage); the others' forwards never reach it
        self.deferred_projection = DeferredOutputProjection(self.chunks[-1]) if loss_cfg.fuse_output_layer else None
        self.teacher = self.teacher_projection = None
        self.teacher_vocab_size = teacher_cfg.vocab_size if teacher_cfg is not None else None
        if teacher_cfg is not None:
            # The run's precision (the student's, from trainer.precision) governs the teacher too,
            # as one Lightning precision plugin casts every module of a NeMo model: a bf16 run
            # runs its online teacher in bf16 whatever dtype its checkpoint recorded.
            # With virtual pipeline stages the teacher is chunked alike (``teacher_model``: its list of chunks)
            # and runs forward-only through the same interleaved schedule.
            if teacher_model is None:
                from nemo_kd.convert.checkpoint_io import build_model_chunks

                teacher_model = build_model_chunks(replace(teacher_cfg.without_recompute(),
                                                           params_dtype=student_cfg.params_dtype))
            chunks = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
            if len(chunks) != len(self.chunks):
                raise ValueError(f"the online teacher has {len(chunks)} model chunk(s), the student {len(self.chunks)}:"
                                 " with virtual pipeline stages pass the teacher's chunks (one per virtual stage)")
            self.teacher_chunks = [in_params_dtype(c, student_cfg.params_dtype) for c in chunks]
            # A teacher runs forward-only (no_grad, eval mode): nothing to recompute, and Megatron recomputes
            # only in training mode, so a loaded teacher whose config asks for recompute runs without it too.
            for chunk in self.teacher_chunks:
                chunk.requires_grad_(False)
                chunk.eval()
            self.teacher = self.teacher_chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(self.teacher_chunks)
            # nothing is stored, so a warning (extraction refuses: a store must not depend on its batches)
            check_token_dropping(self.teacher_chunks[0], "the online teacher",
                                 "a sample's KD targets depend on its micro-batch (micro_batch_size, batch-mates, "
                                 "packing, the DP layout)", "moe_expert_capacity_factor: null in the teacher "
                                 "checkpoint's architecture for batch-independent targets")
            if loss_cfg.fuse_output_layer:
                self.teacher_projection = DeferredOutputProjection(self.teacher_chunks[-1])
        self.step = 0
        self.skipped_steps = 0  # optimizer steps skipped for inf/NaN gradients (fp16 overflow)

    # ------------------------------------------------------------------ schedules

    def _run_schedule(self, model, forward_step, microbatches: List[dict], forward_only: bool):
        """``model``: a module, or the list of model chunks (virtual pipeline stages: Megatron's interleaved
        schedule, each chunk reading every microbatch in order from its own iterator)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        models = list(model) if isinstance(model, (list, tuple)) else [model]
        data = iter(microbatches) if len(models) == 1 else [iter(microbatches) for _ in models]
        # the p2p tensors' shape: [S, B, H], or [B·S, 1, H] for packed rows (THD, nemo_kd.data.packing);
        # the schedule divides the row length by CP itself (get_tensor_shapes), the microbatches are already cut
        seq_length, micro_batch_size = ModelInputs.of_batch(microbatches[0]).schedule_shape
        seq_length *= state.cp_size()
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=models,
            num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )

    def _teacher_logits(self, microbatches: List[dict]) -> List[Optional[torch.Tensor]]:
        """Online teacher: forward-only through its pipeline; logits kept on the last stage."""

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            # Cross-tokenizer: the teacher reads its own rendering/tokenisation (same [B, S] shape).
            # Deferred projection: keep the final hidden states ([b, s, H], not [b, s, V/TP]) for the loss.
            x = ModelInputs.of(mb.get("xtok_teacher_inputs", mb["inputs"]),
                               mb.get("xtok_teacher_position_ids", mb["position_ids"]),
                               mb.get("xtok_teacher_segment_ids", mb.get("segment_ids")))
            out, weight = run_model(half_precision_output(model), self.teacher_projection, *x.args, **x.kwargs)

            def keep(out):
                out = x.rows(out)  # packed rows: [1, B·S, ...] -> [B, S, ...]
                # The teacher's padded vocabulary columns carry no probability (mask_padded_vocab_).
                if weight is None:
                    kept = mask_padded_vocab_(out.detach(), self.teacher_vocab_size, state.tp_group())
                else:
                    kept = ProjectedLogits.of_hidden_states(
                        out.detach(), weight.detach(), self.loss_cfg.output_layer_chunk_tokens,
                        padded_vocab_valid_columns(weight.shape[0], self.teacher_vocab_size, state.tp_group()))
                return out.new_zeros(()), {"logits": kept}

            return out, keep

        with torch.no_grad():
            outs = self._run_schedule(self.teacher_chunks, forward_step, microbatches, forward_only=True)
        if not state.is_pipeline_last_stage():
            return [None] * len(microbatches)
        return [o["logits"] for o in outs]

    def _loss_func(self, mb: dict, teacher_logits, norms, scale: float, output_weight, logits: torch.Tensor):
        # In-place logits gradient (DistillationLossConfig.inplace_logits_grad): the objective may
        # write ∂L/∂logits over ``logits``. Safe here because nothing else needs them after the
        # loss (megatron-core 0.16.1, gpt_model.py ``_postprocess``): the output layer is a
        # ColumnParallelLinear whose autograd function (LinearWithGradAccumulationAndAsync-
        # Communication) saves its input and weight, never its output; the output then goes
        # through ``.transpose(0, 1).contiguous()`` — a copy for micro-batch > 1, the same storage
        # for micro-batch 1 — and (bf16/fp16) past Float16Module without its fp32 upcast
        # (``half_precision_output``: the loss reads the model's dtype, so the buffer written is the
        # model's own bf16/fp16 logits); the backward of transpose / clone saves nothing. The
        # schedule replaces the output by this function's loss (forward_step_calc_loss), and the
        # report below holds only detached scalars; the teacher's logits are a separate,
        # never-written tensor. So the objective's own autograd node is the only holder of the
        # logits for backward.
        # Note: for micro-batch > 1 the gradient reaching the output layer is the [s, b] transpose
        # of this [b, s] buffer, which Megatron copies (prepare_input_tensors_for_wgrad_compute's
        # .contiguous()) — its own logits-sized buffer, outside the loss, in place or not.
        # Megatron's padded vocabulary rows are not tokens: the objective (built with the student's
        # vocab_size) masks them, in place on the output layer's output, which nothing else saved.
        if output_weight is not None:  # deferred projection: ``logits`` are the final hidden states
            logits = ProjectedLogits.of_hidden_states(logits, output_weight, self.loss_cfg.output_layer_chunk_tokens)
        out = self.objective(logits, _objective_batch(mb, teacher_logits), norms)
        report = {name: v.detach().float().reshape(()) for name, v in out.metrics.items()}
        report["loss"] = out.loss.detach().float()
        return out.loss * scale, report

    def _forward_step(self, norms, scale, data_iterator, model):
        mb = next(data_iterator)
        # Deferred projection: the model returns its final hidden states; the loss projects them in chunks.
        # bf16/fp16: the logits (or hidden states) reach the loss in the model's dtype, see half_precision_output.
        # Packed rows (segment_ids): Megatron's THD layout, the output back in rows for the loss.
        x = ModelInputs.of_batch(mb)
        output, weight = run_model(half_precision_output(model), self.deferred_projection, *x.args, **x.kwargs)
        loss_func = partial(self._loss_func, mb, mb.get("_teacher_logits"), norms, scale, weight)
        return output, lambda out: loss_func(x.rows(out))

    def _reduce_reports(self, reports: List[dict]) -> Dict[str, float]:
        """Sum each microbatch's report, average fractions, all-reduce over DP (×CP: every report of the
        objective sums over the CP ranks to its global value), share across PP.

        ``token_agreement`` is weighted by each microbatch's KD tokens (a fraction of the global
        batch's tokens, whatever the microbatch split: packed rows give what padded rows give)."""
        keys = ["loss", "kd_loss", "sft_loss", "preference_loss", "token_agreement", "teacher_student_kd_sum",
                "kd_tokens", "preference_accuracy_sum", "pairs", "xtok_one_to_one", "xtok_completion_tokens",
                "xtok_vocab_coverage"]
        vec = torch.zeros(len(keys), dtype=torch.float64)
        if state.is_pipeline_last_stage() and reports:
            for i, key in enumerate(keys):
                vals = [r[key] * r["kd_tokens"] if key == "token_agreement" else r[key] for r in reports if key in r]
                if vals:
                    total = torch.stack(vals).double().sum()
                    vec[i] = total / len(vals) if key == "xtok_vocab_coverage" else total
        device = state.device()
        vec = vec.to(device)
        if state.pp_size() > 1:  # the last stage knows; every stage logs the same numbers
            dist.broadcast(vec, src=dist.get_global_rank(state.pp_group(), state.pp_size() - 1), group=state.pp_group())
        if state.dp_size(with_context_parallel=True) > 1:
            dist.all_reduce(vec, group=state.dp_group(with_context_parallel=True))
            vec[keys.index("xtok_vocab_coverage")] /= state.dp_size(with_context_parallel=True)
        totals = dict(zip(keys, vec.cpu().tolist()))
        out = {k: totals[k] for k in ("loss", "kd_loss", "sft_loss", "preference_loss")}
        out["token_agreement"] = totals["token_agreement"] / totals["kd_tokens"] if totals["kd_tokens"] > 0 else 0.0
        if totals["kd_tokens"] > 0:
            out["teacher_student_kd"] = totals["teacher_student_kd_sum"] / totals["kd_tokens"]
        if totals["pairs"] > 0:
            out["preference_accuracy"] = totals["preference_accuracy_sum"] / totals["pairs"]
        if totals["xtok_completion_tokens"] > 0:  # cross-tokenizer KD (nemo_kd.align)
            out["xtok_one_to_one_frac"] = totals["xtok_one_to_one"] / totals["xtok_completion_tokens"]
            out["xtok_vocab_coverage"] = totals["xtok_vocab_coverage"]
            out["xtok_kl"] = out.get("teacher_student_kd", 0.0)
        return out

    def _prepare(self, microbatches: List[dict]):
        device = state.device()
        cp_size = state.cp_size()
        cp_rank = dist.get_rank(state.cp_group()) if cp_size > 1 else 0
        # context parallelism: this CP rank's positions of every per-position tensor (before the teacher runs)
        mbs = [microbatch_on_cp_rank({k: v.to(device) if torch.is_tensor(v) else v for k, v in mb.items()},
                                     cp_rank, cp_size) for mb in microbatches]
        if self.teacher is not None:
            for mb, logits in zip(mbs, self._teacher_logits(mbs)):
                mb["_teacher_logits"] = logits
        batches = [_objective_batch(mb, None) for mb in mbs]
        norms = objective_normalisers(self.loss_cfg, batches, state.dp_group(with_context_parallel=True),
                                      cp_group=state.cp_group() if cp_size > 1 else None)
        return mbs, norms

    # ------------------------------------------------------------------ public API

    def train_step(self, microbatches: List[dict]) -> Dict[str, float]:
        """One optimizer step on this rank's ``num_microbatches`` microbatches of the global batch."""
        if len(microbatches) != self.num_microbatches:
            raise ValueError(f"expected {self.num_microbatches} microbatches, got {len(microbatches)}")
        for ddp in self.ddps:
            ddp.train()
        mbs, norms = self._prepare(microbatches)
        for ddp in self.ddps:
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        scale = float(len(mbs) * state.dp_size())  # undone by the schedule (÷M) and DDP (÷DP)
        if self.router_terms is not None:
            self.router_terms.begin_step(self.step)
        reports = self._run_schedule(self.ddps, partial(self._forward_step, norms, scale), mbs, forward_only=False)
        router_metrics = self.router_terms.end_step(len(mbs)) if self.router_terms is not None else {}
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (Megatron's warmup starts at init_lr)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        else:  # inf/NaN grads (fp16 overflow): weights, Adam state and schedule untouched
            self.skipped_steps += 1
        self.step += 1
        metrics = self._reduce_reports(reports)
        if router_metrics:  # the router's terms are part of the objective the step minimised
            metrics["loss"] += router_metrics.get("router_loss", 0.0)
            metrics.update(router_metrics)
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
                       lr=lr, update_skipped=float(not ok), skipped_steps=float(self.skipped_steps))
        if self.student_cfg.params_dtype == "fp16":  # the scale the next step uses (already lowered on overflow)
            metrics["loss_scale"] = float(self.optimizer.get_loss_scale())
        return metrics

    @torch.no_grad()
    def eval_step(self, microbatches: List[dict]) -> Dict[str, float]:
        """Forward-only objective on a batch (same normalisation; no update)."""
        for ddp in self.ddps:
            ddp.eval()
        mbs, norms = self._prepare(microbatches)
        reports = self._run_schedule(self.ddps, partial(self._forward_step, norms, 1.0), mbs, forward_only=True)
        return self._reduce_reports(reports)

    def config_dict(self) -> dict:
        return {"student": self.student_cfg.to_dict(), "loss": asdict(self.loss_cfg), "optim": asdict(self.optim_cfg),
                "batch": asdict(self.batch_cfg), "max_steps": self.max_steps}
