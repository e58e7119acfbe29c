"""Token-level losses on logits that never exist whole: the output projection done chunk by chunk.

A KD step's largest tensors are the student's logits ``[tokens, V/TP]`` and their
gradient. With a deferred projection the loss receives the output layer's *input*
(hidden states ``[N, H]``, the same on every TP rank) and this rank's vocab-parallel
weight ``W`` ``[V/TP, H]`` (:class:`ProjectedLogits`) instead of ``Z = H·Wᵀ``, and runs
any row-wise function of the logits (:meth:`ProjectedLogits.map_rows`: the objective's
per-token KD / CE / log-prob terms) over token chunks of ``token_chunk`` rows:

* forward: for each chunk ``Z_c = H_c·Wᵀ`` (the weight's dtype, as Megatron's output
  layer computes it), ``f(Z_c)``, drop ``Z_c``. Outputs are per-token ``[N, ...]``.
* backward, given ``G = ∂L/∂f(Z)``: for each chunk recompute ``Z_c``, differentiate
  ``f`` on it (``∂L/∂Z_c``, written over ``Z_c`` itself when ``f`` has one reader of
  the logits), then ``∂L/∂H_c = ∂L/∂Z_c · W`` and ``∂L/∂W += (∂L/∂Z_c)ᵀ · H_c``
  (accumulated over chunks in fp32, fp64 for fp64 weights).

Peak extra memory is one or two chunks of logits, whatever the sequence length; the
price is one more ``[chunk, H] × [H, V/TP]`` matmul per chunk (the recompute): four
output-layer matmuls instead of three. Liger-Kernel's fused-linear losses avoid the
fourth by computing the gradient during the forward, which needs ``∂L/∂f`` before the
loss exists; here ``f``'s outputs feed reductions the chunk cannot see (global-batch
normalisers, sequence sums of the preference terms), so the gradient waits for backward.

Tensor parallelism: each rank projects onto its own vocab shard and ``f`` does its own
TP reductions (every rank runs the same chunks in the same order); ``∂L/∂H`` is this
rank's partial, summed over TP by the caller (``_CopyToTensorParallelRegion``
on the hidden states, :mod:`nemo_kd.models.deferred_projection`), as Megatron's
``ColumnParallelLinear`` does for its input gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from nemo_kd.losses.vocab_parallel import accumulation_dtype

DEFAULT_PROJECTION_CHUNK = 2048

# f(z_chunk [c, V/TP], *row_chunks, backward: bool) -> tuple of per-row outputs ([c, ...] or None).
# ``backward`` is True when f runs inside the projection's backward: it may then write its
# gradient over z (the chunk is the projection's own) and skip its no-grad metrics.
RowFunction = Callable[..., Tuple[Optional[torch.Tensor], ...]]


def _project(hidden_chunk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.matmul(hidden_chunk.to(weight.dtype), weight.t())


def _row_slices(rows: Sequence[Optional[torch.Tensor]], s: int, e: int):
    return [r[s:e] if r is not None else None for r in rows]


class _ProjectRowwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, fn, token_chunk, layout, *rows):
        n = hidden.shape[0]
        pieces = []
        for s in range(0, max(n, 1), token_chunk):
            e = min(n, s + token_chunk)
            pieces.append(tuple(fn(_project(hidden[s:e], weight), *_row_slices(rows, s, e), backward=False)))
        present = [o is not None for o in pieces[0]]
        layout.extend(present)  # the caller restores fn's Nones from it
        outs = [torch.cat([p[i] for p in pieces]) for i, keep in enumerate(present) if keep]
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        ctx.save_for_backward(hidden, weight, *rows)
        ctx.fn, ctx.token_chunk, ctx.present = fn, token_chunk, present
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, *rows = ctx.saved_tensors
        n = hidden.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=accumulation_dtype(weight.dtype), device=weight.device) \
            if want_w else None
        for s in range(0, n, ctx.token_chunk):
            e = min(n, s + ctx.token_chunk)
            h = hidden[s:e].to(weight.dtype)
            with torch.enable_grad():
                z = torch.matmul(h, weight.t()).requires_grad_()
                # grads[j] belongs to the j-th output present in the forward; with backward=True fn
                # may return None at a metric's place (no gradient goes there anyway).
                outs = [o for o, keep in zip(ctx.fn(z, *_row_slices(rows, s, e), backward=True), ctx.present)
                        if keep]
                pairs = [(o, g[s:e]) for o, g in zip(outs, grads)
                         if o is not None and g is not None and o.requires_grad and o.is_floating_point()]
                if not pairs:
                    continue
                (grad_z,) = torch.autograd.grad([o for o, _ in pairs], [z], [g.to(o.dtype) for o, g in pairs])
            if want_h:
                grad_h[s:e] = torch.matmul(grad_z, weight).to(hidden.dtype)
            if want_w:
                if grad_w.dtype == weight.dtype:
                    grad_w.addmm_(grad_z.t(), h)
                else:  # bf16/fp16: each chunk's product in the weight's dtype, the sum over chunks in fp32
                    grad_w += torch.matmul(grad_z.t(), h)
            del z, grad_z
        if want_w:
            grad_w = grad_w.to(weight.dtype)
        return (grad_h, grad_w, None, None, None) + (None,) * len(rows)


@dataclass
class ProjectedLogits:
    """This rank's logits shard ``hidden @ weight.T`` ``[N, V/TP]``, computed only chunk by chunk.

    ``hidden`` ``[N, H]`` (any float dtype; cast to the weight's for the matmul) is the
    output layer's full input on every TP rank; ``weight`` ``[V/TP, H]`` its vocab shard.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    token_chunk: int = DEFAULT_PROJECTION_CHUNK

    def __post_init__(self):
        if self.hidden.dim() != 2 or self.weight.dim() != 2 or self.hidden.shape[1] != self.weight.shape[1]:
            raise ValueError(f"hidden [N, H] and weight [V/TP, H] expected, got {tuple(self.hidden.shape)} and "
                             f"{tuple(self.weight.shape)}")
        if self.token_chunk < 1:
            raise ValueError(f"token_chunk must be >= 1, got {self.token_chunk}")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.hidden.shape[0], self.weight.shape[0]))

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def requires_grad(self) -> bool:
        return self.hidden.requires_grad or self.weight.requires_grad

    def materialize(self) -> torch.Tensor:
        """The whole logits shard (differentiable): for references and tests only."""
        return _project(self.hidden, self.weight)

    def map_rows(self, fn: RowFunction, *rows: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
        """``fn(Z, *rows, backward=False)`` computed chunk by chunk, differentiable w.r.t. hidden and weight.

        ``fn`` must be row-wise: output row ``i`` depends on logits row ``i`` and row ``i``
        of each of ``rows`` (``[N, ...]`` tensors or None, never differentiated) only, and
        return the same tuple layout (per-row tensors or None) for every chunk. TP
        collectives inside ``fn`` are fine (all ranks run the same chunks). Integer
        outputs (an argmax) are returned without gradient.
        """
        for r in rows:
            if r is not None and r.shape[0] != self.hidden.shape[0]:
                raise ValueError(f"row input with {r.shape[0]} rows for {self.hidden.shape[0]} tokens")
            if r is not None and r.requires_grad:
                raise ValueError("map_rows differentiates the projection only; detach the row inputs")
        layout = []
        outs = iter(_ProjectRowwise.apply(self.hidden, self.weight, fn, int(self.token_chunk), layout, *rows))
        return tuple(next(outs) if present else None for present in layout)
