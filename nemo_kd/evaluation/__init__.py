"""Evaluation of distilled students: greedy generation, exact match, held-out loss and KL."""

from nemo_kd.evaluation.generate import greedy_generate
from nemo_kd.evaluation.metrics import exact_match, heldout_metrics, normalize_answer

__all__ = ["greedy_generate", "exact_match", "heldout_metrics", "normalize_answer"]
