"""The local layer spec under Megatron's sequence parallelism (``parallel.sequence_parallel``).

With ``sequence_parallel`` Megatron splits the activations outside the tensor-parallel linears
(norms, dropout, residuals) along the sequence over the TP ranks: the embedding reduce-scatters,
every ``ColumnParallelLinear`` all-gathers its input along the sequence (the output layer too, so
the loss sees the whole sequence of logits, ``[b, s, V/TP]``, as without SP), every
``RowParallelLinear`` reduce-scatters its output. A norm then sees only its rank's positions, so
its weight's gradient is a partial sum, which Megatron's ``finalize_model_grads`` all-reduces over
TP for every parameter marked ``sequence_parallel`` (TE's and apex's norms mark theirs).

Megatron's ``WrappedTorchNorm`` (the torch norm of the local spec) refuses sequence parallelism
(megatron-core 0.16.1: ``assert not config.sequence_parallel``) although the torch norm itself is
position-wise and runs unchanged on a sequence shard. :class:`SequenceParallelTorchNorm` is the
same torch norm with its parameters marked, and :func:`with_sequence_parallel_norms` puts it in
place of every ``WrappedTorchNorm`` of a block spec.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["SequenceParallelTorchNorm", "with_sequence_parallel_norms"]


class SequenceParallelTorchNorm:
    """``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` (by ``config.normalization``), its parameters
    marked ``sequence_parallel`` so that their gradients are summed over TP (``WrappedTorchNorm``'s
    constructor signature and checks, less its refusal of sequence parallelism)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError("the torch norm supports none of layernorm_zero_centered_gamma, persist_layer_norm, "
                             "memory_efficient_layer_norm")
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization must be one of {sorted(norms)}, got {config.normalization!r}")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel  # finalize_model_grads: all-reduce over TP
        return norm


def with_sequence_parallel_norms(spec):
    """``spec`` (a ``ModuleSpec`` / ``TransformerBlockSubmodules`` tree) with every ``WrappedTorchNorm``
    replaced by :class:`SequenceParallelTorchNorm`; the tree is modified in place and returned."""
    if isinstance(spec, (list, tuple)):
        return type(spec)(with_sequence_parallel_norms(s) for s in spec)
    if isinstance(spec, ModuleSpec):
        if spec.module is WrappedTorchNorm:
            spec.module = SequenceParallelTorchNorm
        spec.submodules = with_sequence_parallel_norms(spec.submodules)
        return spec
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for field in dataclasses.fields(spec):
            value = getattr(spec, field.name)
            if value is WrappedTorchNorm:
                setattr(spec, field.name, SequenceParallelTorchNorm)
            elif isinstance(value, (ModuleSpec, list, tuple)) or (dataclasses.is_dataclass(value)
                                                                   and not isinstance(value, type)):
                setattr(spec, field.name, with_sequence_parallel_norms(value))
        return spec
    return spec
