"""Fused (Triton) kernels for the vocabulary-sized work of the losses.

Imported lazily so that ``nemo_kd`` works without Triton: touching an attribute
below imports :mod:`nemo_kd.kernels.logprobs_triton` (which needs ``triton``).

* :func:`fused_logprobs_at` – the fused vocab-parallel log-prob primitive
  (``vocab_parallel_logprobs_at(..., impl="fused")``), with optional in-place backward.
"""

__all__ = ["fused_logprobs_at", "FusedVocabParallelLogProbsAt", "check_fused_supported"]


def __getattr__(name):
    if name in __all__:
        from . import logprobs_triton

        return getattr(logprobs_triton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
