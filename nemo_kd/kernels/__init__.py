"""Fused (Triton) kernels for the vocabulary-sized work of the losses, and the small pieces they share with them.

Imported lazily so that ``nemo_kd`` works without Triton: touching an attribute
below imports the module that defines it (the kernels need ``triton``; the last three
modules below need torch only).

* :func:`fused_logprobs_at` – the fused vocab-parallel log-prob primitive
  (``vocab_parallel_logprobs_at(..., impl="fused")``), with optional in-place backward
  (:mod:`nemo_kd.kernels.logprobs_triton`).
* :func:`fused_full_kd_loss` – full-vocabulary forward KL / reverse KL / JSD / skew KLs / AKL against an
  online teacher's vocab shard, plus the label log-prob, in one pass over both shards
  (``full_kd_loss(..., impl="fused")``; :mod:`nemo_kd.kernels.full_kd_triton`).
* :mod:`nemo_kd.kernels.common` – Triton helpers shared by both.
* :class:`KDSettings` (:mod:`nemo_kd.kernels.kd_settings`) – what a KD loss computes (divergence,
  temperatures, top-k convention), the one settings object of every KD entry point.
* :class:`BucketSpace` (:mod:`nemo_kd.kernels.buckets`) – how a divergence sums its buckets
  (replicated or TP-sharded), AKL's head rule.
* :mod:`nemo_kd.kernels.collectives` – the TP group's size / rank and the vocab-parallel
  all-gather / all-reduces (torch.distributed only).
"""

_WHERE = {
    "fused_logprobs_at": "logprobs_triton",
    "FusedVocabParallelLogProbsAt": "logprobs_triton",
    "check_fused_supported": "common",
    "fused_full_kd_loss": "full_kd_triton",
    "FusedFullKD": "full_kd_triton",
    "FUSED_FULL_LOSS_TYPES": "full_kd_triton",
    "KDSettings": "kd_settings",
    "BucketSpace": "buckets",
}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
