"""``nemo-kd-evaluate``: score one or more students on a JSONL eval set (Hydra, ``conf/evaluate.yaml``).

::

    nemo-kd-evaluate data_path=test.jsonl output_dir=eval \\
        +students.kd=kd.nemo +students.sft=/ckpt/sft_megatron +students.hf=/export/hf_student
    torchrun --nproc-per-node 4 -m nemo_kd.evaluation.cli parallel.tensor_model_parallel_size=2 ...

Every student is loaded the way training loads one (:func:`nemo_kd.convert.checkpoint_io.build_and_load`: a
nemo_kd ``.nemo``, a converted Megatron checkpoint saved at any TP/PP, or a Hugging Face directory, all
loaded into this run's TP; PP=1, the sampler's limit), generates through
:func:`nemo_kd.generation.sampling.generate` (greedy by default; TP, data-parallel over the prompts,
Megatron's KV cache) and is scored per sample (:mod:`nemo_kd.evaluation.evaluator`). Students share the
data, and the teacher when ``heldout`` asks for one. ``heldout.enabled``: the main job's held-out terms
(:func:`nemo_kd.evaluation.metrics.heldout_metrics` over a :class:`DistillationEngine` holding the
student) – CE of the references, KL(teacher‖student), KL(student‖teacher) and token agreement – against
``heldout.logits_store`` (a store built on ``data_path``) or a live ``heldout.teacher_path``.
Global rank 0 writes the outputs (:mod:`nemo_kd.evaluation.report`) and shows a progress bar per student.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, List, Optional

import torch

from nemo_kd.teacher.extract import _default_conf_dir, _plain  # the console scripts' conf/ and config reading
from nemo_kd.evaluation.evaluator import (
    EvalSettings,
    cipher_checker,
    compare,
    generate_responses,
    load_eval_records,
    prompt_token_ids,
    score_samples,
    summarize,
)

__all__ = ["run_from_config", "main", "student_paths"]

_TOP_KEYS = {"data_path", "split", "skip_bad_samples", "limit", "prompt_format", "max_seq_length", "output_dir",
             "students", "tokenizer_path", "generation", "metrics", "bootstrap", "heldout", "parallel", "progress",
             "plots"}
_GENERATION = {"temperature", "top_k", "top_p", "max_new_tokens", "seed", "batch_size"}
_METRICS = {"rouge_stemmer", "rouge_tokenizer", "exact_match", "checker", "checker_task"}
_BOOTSTRAP = {"resamples", "confidence", "seed"}
_HELDOUT = {"enabled", "logits_store", "teacher_path", "topk_convention", "batch_size"}


def _section(c: dict, name: str, keys: set) -> dict:
    section = dict(c.get(name) or {})
    unknown = sorted(set(section) - keys)
    if unknown:  # a typo would otherwise fall back to a default silently
        raise ValueError(f"unknown {name} keys {unknown}; valid keys: {sorted(keys)}")
    return section


def student_paths(students) -> Dict[str, str]:
    """``students``: ``{name: path}`` or a list of paths (named by their file names), in order."""
    if isinstance(students, str):
        students = [students]
    if isinstance(students, dict):
        out = {str(k): str(v) for k, v in students.items()}
    else:
        out = {}
        for p in students or []:
            name = os.path.basename(os.path.normpath(str(p)))
            if name in out:
                raise ValueError(f"two students named {name!r}: give students as a name: path mapping")
            out[name] = str(p)
    if not out:
        raise ValueError("no students: give students.<name>=<path> (a .nemo, a Megatron checkpoint or an HF directory)")
    return out


def settings_from_config(c: dict) -> EvalSettings:
    g, m, b = _section(c, "generation", _GENERATION), _section(c, "metrics", _METRICS), _section(c, "bootstrap",
                                                                                                  _BOOTSTRAP)
    em = dict(m.get("exact_match") or {})
    bad = sorted(set(em) - {"lowercase", "strip_punctuation", "drop_articles"})
    if bad:
        raise ValueError(f"unknown metrics.exact_match keys {bad}; valid: drop_articles, lowercase, strip_punctuation")
    return EvalSettings(**{k: g[k] for k in _GENERATION if k in g},
                        rouge_stemmer=bool(m.get("rouge_stemmer", True)),
                        rouge_tokenizer=str(m.get("rouge_tokenizer", "default")), exact_match=em,
                        bootstrap_resamples=int(b.get("resamples", 2000)), confidence=float(b.get("confidence", 0.95)),
                        bootstrap_seed=int(b.get("seed", 0)))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True)


class _Heldout:
    """The main job's held-out terms for each student, sharing the data and the teacher across students."""

    def __init__(self, h: dict, data_path: str, split, skip_bad_samples: bool, max_seq_length: int, prompt_format,
                 settings):
        from nemo_kd.parallel import state

        if state.dp_size() > 1 or state.pp_size() > 1:
            raise ValueError("heldout terms run at DP=1 and PP=1 (TP any): launch the held-out pass with "
                             "world size = tensor_model_parallel_size")
        if bool(h.get("logits_store")) == bool(h.get("teacher_path")):
            raise ValueError("heldout.enabled needs exactly one of heldout.logits_store (a store built on data_path) "
                             "and heldout.teacher_path (a live teacher)")
        self.h, self.max_seq_length, self.prompt_format = h, max_seq_length, prompt_format
        self.settings = settings  # EvalSettings: the bootstrap's confidence, resamples and seed
        # the store is keyed by the whole file: its records, not the `limit`ed subset
        self.records = load_eval_records(data_path, split, skip_bad_samples)
        self.store = self.teacher = None
        if h.get("logits_store"):
            from nemo_kd.teacher.store import StoreReader

            self.store = StoreReader(h["logits_store"])
        else:
            from nemo_kd.convert.checkpoint_io import build_and_load

            loaded = build_and_load(h["teacher_path"])
            self.teacher, self.teacher_cfg = loaded.model_chunks[0], loaded.arch.model

    def __call__(self, path: str, tokenizer) -> Dict[str, float]:
        from nemo_kd.data.kd_dataset import DistillationDataset, collate
        from nemo_kd.data.tokenization import ConversationTokenizer
        from nemo_kd.evaluation.metrics import heldout_intervals, heldout_metrics, heldout_per_sample
        from nemo_kd.losses.objective import DistillationLossConfig
        from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig

        convention = self.h.get("topk_convention") or "exact_tail"
        bs = int(self.h.get("batch_size") or 8)
        ctok = ConversationTokenizer(tokenizer, self.prompt_format, self.max_seq_length, "truncate")
        ds = DistillationDataset(self.records, ctok, store=self.store,
                                 topk_convention=convention if self.store is not None else None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batches = [[collate([ds[i] for i in range(s, min(s + bs, len(ds)))], self.max_seq_length, pad)]
                   for s in range(0, len(ds), bs)]
        engine = DistillationEngine(None, DistillationLossConfig(topk_convention=convention), OptimConfig(),
                                    BatchConfig(micro_batch_size=bs, global_batch_size=bs,
                                                seq_length=self.max_seq_length), max_steps=1,
                                    teacher_cfg=getattr(self, "teacher_cfg", None), student_init_path=path,
                                    teacher_model=self.teacher)
        forward = heldout_metrics(engine, batches, "forward_kl", convention)
        reverse = heldout_metrics(engine, batches, "reverse_kl", convention)
        # intervals over samples (token-weighted, whole samples resampled), as the generation scores' over prompts
        per_sample = heldout_per_sample(engine, [ds[i] for i in range(len(ds))], self.max_seq_length, pad, convention)
        intervals = heldout_intervals(per_sample, self.settings.confidence, self.settings.bootstrap_resamples,
                                      self.settings.bootstrap_seed)
        return dict(forward, reverse_kl=reverse["kl"], heldout_samples=len(ds), intervals=intervals)

    def close(self):
        if self.store is not None and hasattr(self.store, "close"):
            self.store.close()


def _tokenizer_dir(path: str, tokenizer_path: Optional[str]) -> str:
    """The student's tokenizer: ``tokenizer_path``, a .nemo's packed one, a converted Megatron checkpoint's
    ``tokenizer/``, else the directory itself (HF): :func:`checkpoint_tokenizer_dir`."""
    from nemo_kd.models.nemo_artifacts import checkpoint_tokenizer_dir

    return checkpoint_tokenizer_dir(path, tokenizer_path)


def evaluate(c: dict) -> dict:
    """Run the evaluation of config ``c`` (a plain dict of ``conf/evaluate.yaml``) in an initialised
    parallel state; returns ``results`` (what ``results.json`` holds) on every rank."""
    import torch.distributed as dist

    from nemo_kd.convert.checkpoint_io import build_and_load
    from nemo_kd.evaluation.report import write_report
    from nemo_kd.parallel import state

    unknown = sorted(set(c) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"unknown evaluate keys {unknown}; valid keys: {sorted(_TOP_KEYS)}")
    for key in ("data_path", "output_dir"):
        if not c.get(key):
            raise ValueError(f"{key} is required")
    settings = settings_from_config(c)
    students = student_paths(c.get("students"))
    metrics = _section(c, "metrics", _METRICS)
    checker = None
    if metrics.get("checker"):
        if metrics["checker"] != "cipher":
            raise ValueError(f"metrics.checker must be null or 'cipher', got {metrics['checker']!r}")
        task_json = metrics.get("checker_task") or os.path.join(os.path.dirname(c["data_path"]), "task.json")
        checker = cipher_checker(task_json)
    heldout_cfg = _section(c, "heldout", _HELDOUT)
    max_seq_length = int(c.get("max_seq_length") or 2048)
    prompt_format = c.get("prompt_format") or "chat"
    records = load_eval_records(c["data_path"], c.get("split"), bool(c.get("skip_bad_samples")), c.get("limit"))
    heldout = _Heldout(heldout_cfg, c["data_path"], c.get("split"), bool(c.get("skip_bad_samples")), max_seq_length,
                       prompt_format, settings) if heldout_cfg.get("enabled") else None
    rank0 = (dist.get_rank() if dist.is_initialized() else 0) == 0
    show = bool(c.get("progress", True)) and rank0
    from transformers import AutoTokenizer

    rows_by_student: Dict[str, List[dict]] = {}
    summaries: Dict[str, dict] = {}
    try:
        for name, path in students.items():
            t0 = time.perf_counter()
            tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(path, c.get("tokenizer_path")))
            loaded = build_and_load(path)
            if len(loaded.model_chunks) != 1:
                raise ValueError(f"{path}: evaluation runs one model chunk (no virtual pipeline stages)")
            model, arch = loaded.model_chunks[0], loaded.arch.model
            prompts = prompt_token_ids(tokenizer, records, prompt_format)
            bar = _progress(len(records) // max(state.dp_size(), 1), f"generate ({name})", show)
            gens = generate_responses(model, tokenizer, prompts, settings, vocab_size=len(tokenizer),
                                      max_length=min(max_seq_length, int(arch.max_position_embeddings)), progress=bar)
            if bar is not None:
                bar.close()
            del model, loaded
            rows = score_samples(records, gens, settings, checker)
            summary = dict(path=path, **summarize(rows, settings))
            if heldout is not None:
                summary["heldout"] = heldout(path, tokenizer)
            summary["seconds"] = time.perf_counter() - t0
            rows_by_student[name], summaries[name] = rows, summary
    finally:
        if heldout is not None:
            heldout.close()
    results = dict(
        settings=dict(dataclasses.asdict(settings), data_path=c["data_path"], num_samples=len(records),
                      prompt_format=prompt_format, max_seq_length=max_seq_length,
                      checker=metrics.get("checker"), tensor_model_parallel_size=state.tp_size(),
                      data_parallel_size=state.dp_size()),
        students=summaries,
        paired_differences=compare(rows_by_student, settings),
    )
    if rank0:
        written = write_report(c["output_dir"], results, rows_by_student, plots=bool(c.get("plots", True)))
        print(open(written[[os.path.basename(p) for p in written].index("results.md")]).read(), flush=True)
    if dist.is_initialized():
        dist.barrier()
    return results


def run_from_config(cfg) -> dict:
    """Initialise the parallel state from the launcher's environment (torchrun / srun / a plain process),
    run :func:`evaluate`, tear down."""
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, is_initialized

    c = _plain(cfg)
    if os.environ.get("NEMO_KD_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["NEMO_KD_NUM_THREADS"]))
    owns = not is_initialized()
    if owns:
        initialize_parallel(ParallelConfig.from_dict(dict(c.get("parallel") or {})))
    try:
        return evaluate(c)
    finally:
        if owns:
            destroy_parallel()


def main() -> None:
    """Console entry point ``nemo-kd-evaluate`` (Hydra; overrides as ``key=value``, students as
    ``+students.<name>=<path>``)."""
    import hydra

    @hydra.main(config_path=_default_conf_dir(), config_name="evaluate", version_base=None)
    def _app(cfg) -> None:
        run_from_config(cfg)

    _app()


if __name__ == "__main__":
    main()
