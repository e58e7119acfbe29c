"""Fused (Triton) kernels for the vocabulary-sized work of the losses.

Imported lazily so that ``nemo_kd`` works without Triton: touching an attribute
below imports the module that defines it (which needs ``triton``).

* :func:`fused_logprobs_at` – the fused vocab-parallel log-prob primitive
  (``vocab_parallel_logprobs_at(..., impl="fused")``), with optional in-place backward
  (:mod:`nemo_kd.kernels.logprobs_triton`).
* :func:`fused_full_kd_loss` – full-vocabulary forward KL / reverse KL / JSD / skew KLs / AKL against an
  online teacher's vocab shard, plus the label log-prob, in one pass over both shards
  (``full_kd_loss(..., impl="fused")``; :mod:`nemo_kd.kernels.full_kd_triton`).
* :mod:`nemo_kd.kernels.common` – helpers shared by both.
"""

_WHERE = {
    "fused_logprobs_at": "logprobs_triton",
    "FusedVocabParallelLogProbsAt": "logprobs_triton",
    "check_fused_supported": "common",
    "fused_full_kd_loss": "full_kd_triton",
    "FusedFullKD": "full_kd_triton",
    "FUSED_FULL_LOSS_TYPES": "full_kd_triton",
}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
