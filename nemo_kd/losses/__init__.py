"""Distillation, SFT and preference losses: small pure modules, math in the docstrings.

* :mod:`nemo_kd.losses.vocab_parallel` – the vocab-parallel log-prob primitive (TP-sharded logits).
* :mod:`nemo_kd.losses.divergences`   – forward/reverse KL, JSD, skew KL, adaptive KL.
* :mod:`nemo_kd.losses.kd`             – top-k and full-vocabulary token-level KD (one ``KDSettings``).
* :mod:`nemo_kd.losses.token_stats`    – top-k / log-sum-exp / label log-prob / log tail of a logits shard.
* :mod:`nemo_kd.losses.cross_entropy`  – SFT cross-entropy (Megatron label-smoothing convention).
* :mod:`nemo_kd.losses.sequence`       – sequence log-probabilities, length normalisation.
* :mod:`nemo_kd.losses.preference`     – DPO / DPKD / IPO / CPO / SimPO.
* :mod:`nemo_kd.losses.reduction`      – how per-token losses become one scalar across micro-batches/DP.
* :mod:`nemo_kd.losses.objective`      – the joint objective the trainers call.
"""
