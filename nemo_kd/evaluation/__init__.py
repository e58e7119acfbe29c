"""Evaluation of distilled students: generation, ROUGE-L / exact match with bootstrap intervals, held-out loss and KL."""

from nemo_kd.evaluation.generate import greedy_generate
from nemo_kd.evaluation.metrics import exact_match, exact_match_scores, heldout_metrics, normalize_answer, rouge_l_scores
from nemo_kd.evaluation.stats import Interval, bootstrap_interval, length_statistics, paired_difference

__all__ = ["greedy_generate", "exact_match", "exact_match_scores", "heldout_metrics", "normalize_answer",
           "rouge_l_scores", "Interval", "bootstrap_interval", "length_statistics", "paired_difference"]
