"""Held-out metrics: exact match of generations, and loss / teacher–student KL via the engine.

:func:`heldout_metrics` runs :meth:`DistillationEngine.eval_step` over held-out batches
that carry the teacher's top-k (a logits store built on the held-out set) with an
*evaluation* objective – ``kd_loss_weight=1, sft_loss_weight=1`` – swapped in for the
duration, whatever the engine was trained with (SFT-only engines included). Token-
weighted over all batches it returns:

* ``loss`` – cross-entropy of the reference completions (nats/token);
* ``kl`` – forward KL(teacher ‖ student) per completion token over the teacher's top-k
  (``exact_tail`` convention: the tail mass is kept as one bucket);
* ``token_agreement`` – fraction of tokens where the student's argmax is the teacher's.
"""

from __future__ import annotations

import math
import re
from typing import Dict, Iterable, List, Optional, Sequence

__all__ = ["normalize_answer", "exact_match", "heldout_metrics"]


def normalize_answer(text: str) -> str:
    """Collapse whitespace and strip: generations are compared modulo spacing."""
    return re.sub(r"\s+", " ", text).strip()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference (after :func:`normalize_answer`)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return math.nan
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(predictions)


def heldout_metrics(engine, batches: Iterable[List[dict]], loss_type: str = "forward_kl",
                    topk_convention: str = "exact_tail") -> Dict[str, float]:
    """Token-weighted held-out ``loss``, ``kl`` and ``token_agreement`` (see the module doc).

    ``batches``: each a list of ``engine.num_microbatches`` microbatches from
    :func:`nemo_kd.data.kd_dataset.collate` *with* teacher fields.
    """
    from nemo_kd.losses.objective import DistillationLossConfig, DistillationObjective
    from nemo_kd.parallel import state

    eval_cfg = DistillationLossConfig(kd_loss_type=loss_type, topk_convention=topk_convention,
                                      kd_loss_weight=1.0, sft_loss_weight=1.0)
    saved = engine.loss_cfg, engine.objective
    engine.loss_cfg, engine.objective = eval_cfg, DistillationObjective(eval_cfg, group=state.tp_group())
    tot = {"loss": 0.0, "kl": 0.0, "token_agreement": 0.0}
    n_tokens = 0.0
    try:
        for mbs in batches:
            tokens = float(sum(mb["loss_mask"].sum() for mb in mbs))
            m = engine.eval_step(mbs)
            tot["loss"] += m["sft_loss"] * tokens
            tot["kl"] += m["kd_loss"] * tokens
            tot["token_agreement"] += m["token_agreement"] * tokens
            n_tokens += tokens
    finally:
        engine.loss_cfg, engine.objective = saved
    if n_tokens == 0:
        return {k: math.nan for k in tot}
    return {k: v / n_tokens for k, v in tot.items()}
