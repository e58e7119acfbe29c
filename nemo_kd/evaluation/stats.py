"""How much a score moves: bootstrap intervals of per-sample means, paired differences, length statistics.

Percentile bootstrap. For per-sample scores ``x_1..x_n`` (ROUGE-L, exact match 0/1, a
length), ``B`` resamples of ``n`` indices drawn with replacement from a fixed-seed NumPy
generator give ``B`` resampled means; the ``(1-c)/2`` and ``(1+c)/2`` quantiles of those
are the interval at confidence ``c`` (default 95%). The point estimate is the plain mean.
The interval describes the evaluation set's sampling noise only: a fresh set of prompts
from the same distribution would give a mean inside it about 95% of the time
(``tests/test_evaluation.py`` measures the coverage on synthetic draws). It says nothing
about training noise (another seed of the same method): that needs several runs
(``benchmarks/bench_methods.py``).

Paired differences. Two students scored on the *same* prompts: the interval of
``mean(a) - mean(b)`` resamples prompt indices once for both, i.e. the bootstrap of the
per-prompt differences ``a_i - b_i``. Prompt difficulty is shared and cancels, so the paired
interval is much narrower than two separate intervals suggest when the students agree on
what is hard; a difference is called significant at ``c`` when its interval excludes 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["Interval", "bootstrap_interval", "paired_difference", "length_statistics"]

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
_CHUNK_ELEMENTS = 1 << 22  # resampled indices held at once (32 MiB of int64)


@dataclass(frozen=True)
class Interval:
    """``mean`` of ``n`` values with its bootstrap interval ``[low, high]`` at ``confidence``."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (for a difference: the two differ at this confidence)."""
        return not (self.low <= 0.0 <= self.high)

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)

    def format(self, scale: float = 1.0, digits: int = 3) -> str:
        """``mean [low, high]`` (times ``scale``, e.g. 100 for ROUGE-L as the papers print it)."""
        if self.n == 0:
            return "n/a"
        return f"{self.mean * scale:.{digits}f} [{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]"


def _resampled_means(values: np.ndarray, num_resamples: int, seed: int, weights=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(values)
    per_chunk = max(1, _CHUNK_ELEMENTS // n)
    means = np.empty(num_resamples, dtype=np.float64)
    weighted = None if weights is None else values * weights
    for start in range(0, num_resamples, per_chunk):
        rows = min(per_chunk, num_resamples - start)
        idx = rng.integers(0, n, size=(rows, n))
        if weights is None:
            means[start:start + rows] = values[idx].mean(axis=1)
        else:  # the ratio estimator sum(w x) / sum(w) of each resample of whole samples
            means[start:start + rows] = weighted[idx].sum(axis=1) / weights[idx].sum(axis=1)
    return means


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, num_resamples: int = DEFAULT_RESAMPLES,
                       seed: int = DEFAULT_SEED, weights: Optional[Sequence[float]] = None) -> Interval:
    """Percentile-bootstrap interval of the mean of ``values`` (see the module docstring).

    ``weights`` (one per value, > 0): the weighted mean ``sum(w_i x_i) / sum(w_i)`` instead, resampling
    whole samples (value and weight together); e.g. a held-out CE that is a per-token mean over samples of
    different lengths: ``x_i`` the sample's per-token CE, ``w_i`` its token count.

    Deterministic in ``seed``. No values: NaNs with ``n=0``; one value (or all equal): a zero-width
    interval at it. NaN values are refused (a score that could not be computed is no score)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape != x.shape:
            raise ValueError(f"{w.size} weights for {x.size} values")
        if x.size and not (w > 0).all():
            raise ValueError(f"weights must be > 0: {int((~(w > 0)).sum())} of {w.size} are not")
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence)
    if np.isnan(x).any():
        raise ValueError(f"{int(np.isnan(x).sum())} of {x.size} values are NaN")
    means = _resampled_means(x, num_resamples, seed, w)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    mean = x.mean() if w is None else (x * w).sum() / w.sum()
    return Interval(float(mean), float(low), float(high), int(x.size), confidence)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                      num_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Interval:
    """Interval of ``mean(a) - mean(b)`` for two students scored on the same prompts (``a[i]``, ``b[i]``:
    prompt ``i``), resampling prompts jointly."""
    x, y = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired scores need the same prompts: {x.size} vs {y.size} values")
    return bootstrap_interval(x - y, confidence, num_resamples, seed)


def length_statistics(lengths: Sequence[float]) -> Dict[str, float]:
    """``mean``, ``std``, ``min``, ``median``, ``p90``, ``max`` of response lengths (NaNs when there are none)."""
    x = np.asarray(lengths, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return {k: math.nan for k in ("mean", "std", "min", "median", "p90", "max")}
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "median": float(np.median(x)), "p90": float(np.quantile(x, 0.9)), "max": float(x.max())}
