"""Next-token label shift and per-sequence log-probabilities.

A causal LM reads ``tokens[:, :t+1]`` and predicts ``tokens[:, t+1]``. For a batch of
``tokens [B, T]`` with a ``loss_mask [B, T]`` marking the *completion* tokens (1)
versus prompt / padding (0)::

    inputs[:, t]     = tokens[:, t]          t = 0 … T−2
    labels[:, t]     = tokens[:, t + 1]
    label_mask[:, t] = loss_mask[:, t + 1]

so the mask always travels with the token being *predicted*: a prompt token is
never a target, and the first completion token is predicted from the last prompt
position.

The log-probability of a sequence ``y`` is ``log π(y) = Σ_t m_t·log π(y_t | y_<t)``
(the sum), its length ``|y| = Σ_t m_t`` and its length-normalised form
``log π(y)/|y|`` (the mean) used by SimPO / DPKD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from nemo_kd.losses.reduction import mask_count, masked_sum
from nemo_kd.losses.vocab_parallel import DEFAULT_TOKEN_CHUNK, ProcessGroup, vocab_parallel_logprobs_at


def shift_for_next_token(
    tokens: torch.Tensor, loss_mask: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs, labels, label_mask)``, each ``[B, T−1]``: see the module docstring.

    ``label_mask`` keeps ``loss_mask``'s dtype.
    """
    if tokens.shape != loss_mask.shape or tokens.dim() != 2:
        raise ValueError(f"tokens and loss_mask must both be [B, T], got {tuple(tokens.shape)}, {tuple(loss_mask.shape)}")
    return tokens[:, :-1], tokens[:, 1:], loss_mask[:, 1:]


@dataclass(frozen=True)
class SequenceLogProbs:
    """Per-sequence log-probabilities, each ``[B]``.

    ``sum``: ``log π(y) = Σ_t m_t·log π(y_t|…)``; ``mean``: ``sum / length``;
    ``length``: ``|y| = Σ_t m_t`` (int64). A zero-length sequence has
    ``sum = mean = 0`` with zero gradient (never NaN): callers that must not
    train on it should drop it by ``length > 0``.
    """

    sum: torch.Tensor
    mean: torch.Tensor
    length: torch.Tensor


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor, segments: Optional[torch.Tensor] = None,
                      num_segments: Optional[int] = None) -> SequenceLogProbs:
    """Reduce ``[B, T]`` per-token log-probs over the masked positions of each row, or with
    ``segments`` ``[B, T]`` (the sequence ``0..num_segments−1`` each position belongs to, −1 none:
    packed rows) of each segment: ``[num_segments]``."""
    if token_logprobs.shape != mask.shape:
        raise ValueError(f"token_logprobs {tuple(token_logprobs.shape)} and mask {tuple(mask.shape)} differ")
    if segments is not None:
        if segments.shape != mask.shape:
            raise ValueError(f"segments {tuple(segments.shape)} and mask {tuple(mask.shape)} differ")
        keep = mask.reshape(-1) & (segments.reshape(-1) >= 0)
        seg = segments.reshape(-1)[keep]
        total = token_logprobs.new_zeros(num_segments).index_add(0, seg, token_logprobs.reshape(-1)[keep])
        length = torch.zeros(num_segments, dtype=torch.long, device=mask.device).index_add(
            0, seg, torch.ones_like(seg))
        mean = total / length.clamp(min=1).to(total.dtype)
        return SequenceLogProbs(sum=total, mean=mean, length=length)
    total = masked_sum(token_logprobs, mask, dim=-1)
    length = mask_count(mask, dim=-1)
    mean = total / length.clamp(min=1).to(total.dtype)
    return SequenceLogProbs(sum=total, mean=mean, length=length)


def vocab_parallel_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logits_scale: float = 1.0,
    group: ProcessGroup = None,
    sequence_first: bool = False,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
) -> torch.Tensor:
    """``log q(labels)`` per token, ``[B, T]``, from vocab-parallel logits.

    Args:
        logits: ``[B, T, V_local]``, or ``[T, B, V_local]`` (Megatron's layout) with
            ``sequence_first=True`` — then the big tensor is not transposed, only
            the small ``[B, T]`` labels / results are.
        labels: ``[B, T]`` global ids (already shifted, see :func:`shift_for_next_token`).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got {tuple(labels.shape)}")
    ordered_labels = labels.t() if sequence_first else labels
    if logits.shape[:-1] != ordered_labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} (sequence_first={sequence_first})"
        )
    logprobs, _ = vocab_parallel_logprobs_at(
        logits.reshape(-1, logits.shape[-1]),
        ordered_labels.reshape(-1),
        scale=logits_scale,
        group=group,
        token_chunk=token_chunk,
    )
    logprobs = logprobs.view(ordered_labels.shape)
    return logprobs.t() if sequence_first else logprobs


def vocab_parallel_sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    logits_scale: float = 1.0,
    group: ProcessGroup = None,
    sequence_first: bool = False,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
) -> SequenceLogProbs:
    """:func:`sequence_logprobs` of :func:`vocab_parallel_token_logprobs` (``mask``: ``[B, T]``)."""
    token_logprobs = vocab_parallel_token_logprobs(logits, labels, logits_scale, group, sequence_first, token_chunk)
    return sequence_logprobs(token_logprobs, mask)
