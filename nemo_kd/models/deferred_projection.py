"""Defer a Megatron GPT's output projection into the loss (``kd.fuse_output_layer``).

Inside :class:`DeferredOutputProjection` the model's ``output_layer`` (a vocab-parallel
``ColumnParallelLinear``) returns its input instead of ``input · Wᵀ``, so the model's
output is the final hidden states ``[b, s, H]`` rather than the logits ``[b, s, V/TP]``,
and the context remembers the weight the layer was given (the tied embedding weight or
its own). The loss then computes the logits chunk by chunk
(:class:`~nemo_kd.losses.projection.ProjectedLogits`): the step never holds the whole
logits, Megatron's ``[s, b] → [b, s]`` copy of them, their fp32 upcast (``Float16Module``)
or their gradient; those copies happen to the hidden states instead.

What the replaced forward keeps of ``ColumnParallelLinear.forward`` (megatron-core 0.16.1):
the input's tensor-parallel mapping — identity forward and all-reduce of the input gradient
over TP (as ``copy_to_tensor_model_parallel_region``, see :class:`_CopyToTensorParallelRegion`) or, with sequence parallelism,
``gather_from_sequence_parallel_region`` (all-gather forward, reduce-scatter backward) —
so each rank's partial ``∂L/∂hidden`` from its vocab shard is summed as Megatron sums it.
The weight's gradient flows to the parameter through autograd (DDP's gradient hooks see it
as usual). Output layers with a bias are refused. Generation and anything else that runs
the model outside the context get real logits.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


class _CopyToTensorParallelRegion(torch.autograd.Function):
    """Identity forward; backward all-reduces the input gradient over TP.

    Megatron's ``copy_to_tensor_model_parallel_region`` does the same through
    ``mappings._reduce``, which all-reduces ``grad.contiguous()`` in place and returns
    ``grad``: for a non-contiguous gradient the reduced copy is dropped (megatron-core
    0.16.1). The hidden states' gradient arrives here through the model's
    ``[s, b] → [b, s]`` transpose, non-contiguous for micro-batch > 1, so the reduction
    is done on a contiguous tensor that is also what is returned.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if ctx.group is not None and torch.distributed.get_world_size(ctx.group) > 1:
            torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _output_layer(model: torch.nn.Module):
    """The GPT's output layer through DDP / Float16Module wrappers (None off the last stage)."""
    while not hasattr(model, "output_layer") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "output_layer", None)


class DeferredOutputProjection:
    """Context manager: while active, ``model``'s output layer returns its (TP-mapped) input.

    Reusable; :attr:`weight` is the weight of the latest forward inside the context.
    """

    def __init__(self, model: torch.nn.Module):
        self.layer = _output_layer(model)
        if self.layer is not None and getattr(self.layer, "bias", None) is not None:
            raise ValueError("fuse_output_layer: the output layer has a bias, which the deferred projection omits")
        self.weight: Optional[torch.Tensor] = None

    def _forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None, runtime_gather_output=None):
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        from nemo_kd.parallel import state

        layer = self.layer
        self.weight = weight if weight is not None else layer.weight
        if layer.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True,
                                                          group=layer.tp_group)
        else:
            group = layer.tp_group if layer.tp_group is not None else state.tp_group()
            hidden = _CopyToTensorParallelRegion.apply(input_, group)
        return hidden, None

    def __enter__(self) -> "DeferredOutputProjection":
        if self.layer is not None:
            self.weight = None
            self.layer.forward = self._forward  # the instance attribute shadows the class's forward
        return self

    def __exit__(self, *exc) -> None:
        if self.layer is not None:
            del self.layer.forward


def run_model(model: torch.nn.Module, deferred: Optional[DeferredOutputProjection], *inputs, **kwargs
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(model(*inputs, **kwargs), None)``, or with ``deferred``: ``(final hidden states, output weight)``
    from a forward inside it (build the loss's :class:`~nemo_kd.losses.projection.ProjectedLogits`
    with ``ProjectedLogits.of_hidden_states``)."""
    if deferred is None:
        return model(*inputs, **kwargs), None
    with deferred:
        out = model(*inputs, **kwargs)
    return out, deferred.weight
