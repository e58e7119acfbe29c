"""Vocab-parallel (SFT / LM) cross-entropy on the student's vocabulary shard.

Per token, with ``q = softmax(s·z)`` over the full (TP-sharded) vocabulary of size
``V``, target ``y`` and label smoothing ``ε``::

    CE  = −log q_y                                               (ε = 0)
    CE_ε = (1 − ε')·(−log q_y) − (ε'/V)·Σ_v log q_v,   ε' = ε·V/(V − 1)

i.e. the target distribution puts ``1 − ε`` on ``y`` and ``ε/(V − 1)`` on every
other id. This is Megatron-core's convention
(``tensor_parallel.vocab_parallel_cross_entropy``, taken from NeMo's
``SmoothedCrossEntropyLoss``); PyTorch's ``F.cross_entropy(label_smoothing=ε_t)``
spreads ``ε_t`` over all ``V`` ids including ``y`` and equals ours for
``ε_t = ε·V/(V − 1)``. Unlike Megatron (0.16.1), whose smoothing term uses the
*local* shard's size and mean at TP > 1 (so ranks disagree), ours uses the global
``V`` and the global sum: the loss is the same at every TP size.

The smoothing sum needs no full-vocabulary copy either:
``Σ_v log q_v = s·Σ_v z_v − V·LSE``, where ``Σ_v z_v`` is a local row sum completed by
a differentiable all-reduce (:func:`~nemo_kd.losses.vocab_parallel.all_reduce_sum`,
identity backward).
"""

from __future__ import annotations

from typing import Optional

import torch

from nemo_kd.losses.vocab_parallel import (
    DEFAULT_TOKEN_CHUNK,
    ProcessGroup,
    accumulation_dtype,
    all_reduce_sum,
    tp_world_size,
    valid_vocab_columns,
    vocab_parallel_logprobs_at,
    vocab_shard_range,
)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    logits_scale: float = 1.0,
    group: ProcessGroup = None,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    impl: str = "torch",
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-token cross-entropy of ``softmax(logits_scale·logits)`` against global ``labels``.

    Args:
        logits: ``[..., V_local]`` this TP rank's vocabulary shard, any float dtype.
        labels: ``[...]`` global token ids (any shard). Ids outside ``[0, V)`` (e.g.
            ``-100`` padding) give a finite, meaningless value: mask them out.
        label_smoothing: ``ε`` in ``[0, 1)``, Megatron's convention (module docstring).
        logits_scale: inverse temperature ``s``.
        group: the tensor-parallel group (``None``: one rank).
        impl: the log-prob primitive, ``"torch"`` or ``"fused"`` (Triton).
        vocab_size: the real vocabulary ``V`` when the shards carry Megatron's padding columns
            (ids ``>= vocab_size``, masked by the caller so they carry no probability): the
            smoothing term spreads over the real ids only. None: every column counts.

    Returns:
        ``[...]`` per-token losses in fp32 (fp64 for fp64 logits); differentiable
        w.r.t. ``logits`` with a gradient of ``logits``' dtype. Backward keeps only
        the logits and per-token statistics (no fp32 ``[N, V]`` copy).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}")
    lead_shape, v_local = labels.shape, logits.shape[-1]
    flat_logits = logits.reshape(-1, v_local)
    logprob_y, lse = vocab_parallel_logprobs_at(
        flat_logits, labels.reshape(-1), scale=logits_scale, group=group, token_chunk=token_chunk, impl=impl
    )
    loss = -logprob_y
    if label_smoothing > 0.0:
        vocab = v_local * tp_world_size(group) if vocab_size is None else vocab_size
        smoothing = label_smoothing * vocab / (vocab - 1)
        real = valid_vocab_columns(v_local, vocab_shard_range(v_local, group)[0], vocab_size)
        logit_sum = all_reduce_sum(flat_logits[:, :real].sum(dim=-1, dtype=accumulation_dtype(logits.dtype)), group)
        mean_logprob = logits_scale * logit_sum / vocab - lse  # (1/V)·Σ_v log q_v
        loss = (1.0 - smoothing) * loss - smoothing * mean_logprob
    return loss.reshape(lead_shape)
