"""Token-level losses on logits that never exist whole: the output projection done chunk by chunk.

A KD step's largest tensors are the student's logits ``[tokens, V/TP]`` and their
gradient. With a deferred projection the loss receives the output layer's *input*
(hidden states ``[N, H]``, the same on every TP rank) and this rank's vocab-parallel
weight ``W`` ``[V/TP, H]`` (:class:`ProjectedLogits`) instead of ``Z = H·Wᵀ``, and runs
any row-wise function of the logits (the objective's per-token KD / CE / log-prob terms) over token chunks of ``token_chunk`` rows.

Two modes, by what the caller knows when the loss runs:

* :meth:`ProjectedLogits.linear_loss` — the loss is ``Σ_j Σ_i c_j[i]·f(Z)_j[i]`` with
  coefficients known up front (the token-level KD / CE terms: masks, row weights and
  global-batch normalisers). For each chunk: ``Z_c = H_c·Wᵀ`` (the weight's dtype, as
  Megatron's output layer computes it), ``f(Z_c)``, ``∂L/∂Z_c`` (written over ``Z_c`` when
  ``f`` has one reader of the logits), ``∂L/∂H_c = ∂L/∂Z_c · W``, ``∂L/∂W += (∂L/∂Z_c)ᵀ·H_c``
  (summed over chunks in fp32, fp64 for fp64 weights); drop ``Z_c``. Backward only scales
  the stored gradients. Three matmuls per token, as the materialised output layer does
  (Liger-Kernel's fused-linear losses work this way).
* :meth:`ProjectedLogits.map_rows` — ``f``'s outputs feed something the chunk cannot see
  (sequence sums of the preference terms), so ``∂L/∂f`` exists only in backward: the
  forward computes ``f(Z_c)`` and drops ``Z_c``; the backward recomputes ``Z_c`` and then
  proceeds as above. Four matmuls per token.

Peak extra memory is one or two chunks of logits plus the weight's gradient, whatever
the sequence length.

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

from nemo_kd.losses.vocab_parallel import accumulation_dtype, fill_padded_vocab_

DEFAULT_PROJECTION_CHUNK = 2048

# f(z_chunk [c, V/TP], *row_chunks, differentiate: bool, metrics: bool) -> tuple of per-row outputs
# ([c, ...] or None, the same layout for every chunk). ``differentiate``: z will be differentiated
# right after this call and is the projection's own, so f may write its gradient over z (when a
# single pass reads it); ``metrics``: compute the no-grad outputs (an argmax) too, else None there.
RowFunction = Callable[..., Tuple[Optional[torch.Tensor], ...]]


def _project(hidden_chunk: torch.Tensor, weight: torch.Tensor, valid_columns: Optional[int] = None) -> torch.Tensor:
    """``hidden_chunk @ weight.T``; columns from ``valid_columns`` on (Megatron's padded vocabulary
    rows of this shard) filled with :data:`~nemo_kd.losses.vocab_parallel.PADDED_VOCAB_LOGIT`."""
    z = torch.matmul(hidden_chunk.to(weight.dtype), weight.t())
    return fill_padded_vocab_(z, valid_columns) if valid_columns is not None else z


def _row_slices(rows: Sequence[Optional[torch.Tensor]], s: int, e: int):
    return [r[s:e] if r is not None else None for r in rows]


def _chunks(n: int, token_chunk: int):
    for s in range(0, max(n, 1), token_chunk):
        yield s, min(n, s + token_chunk)


class _ProjectionGrads:
    """``∂L/∂hidden`` and ``∂L/∂weight`` accumulated chunk by chunk from ``∂L/∂Z_c``."""

    def __init__(self, hidden, weight, want_h: bool, want_w: bool, valid_columns: Optional[int] = None):
        self.weight, self.valid_columns = weight, valid_columns
        self.hidden = torch.zeros_like(hidden) if want_h else None
        # fp32 (fp64) sum over chunks; for fp32/fp64 weights this is the returned gradient itself.
        self.weight_grad = torch.zeros(weight.shape, dtype=accumulation_dtype(weight.dtype),
                                       device=weight.device) if want_w else None

    def differentiate(self, fn, hidden, rows, s, e, coeffs, present, metrics: bool):
        """Run ``fn`` on chunk ``[s, e)`` with gradient, pull ``coeffs`` (per-output ``∂L/∂out``, aligned
        with the outputs present in ``present``) back to ``Z_c`` and on to hidden and weight.
        Returns fn's outputs, detached."""
        w = self.weight
        h = hidden[s:e].to(w.dtype)
        with torch.enable_grad():
            z = _project(h, w, self.valid_columns).requires_grad_()
            outs = tuple(fn(z, *_row_slices(rows, s, e), differentiate=True, metrics=metrics))
            kept = [o for o, keep in zip(outs, present) if keep] if present is not None else list(outs)
            pairs = [(o, g[s:e]) for o, g in zip(kept, coeffs)
                     if o is not None and g is not None and o.requires_grad and o.is_floating_point()]
            grad_z = torch.autograd.grad([o for o, _ in pairs], [z], [g.to(o.dtype) for o, g in pairs])[0] \
                if pairs else None
        if grad_z is not None:
            if self.hidden is not None:
                self.hidden[s:e] = torch.matmul(grad_z, w).to(self.hidden.dtype)
            if self.weight_grad is not None:
                if self.weight_grad.dtype == w.dtype:
                    self.weight_grad.addmm_(grad_z.t(), h)
                else:  # bf16/fp16: each chunk's product in the weight's dtype, the sum over chunks in fp32
                    self.weight_grad += torch.matmul(grad_z.t(), h)
        return tuple(o.detach() if o is not None else None for o in outs)

    def result(self):
        w = self.weight_grad.to(self.weight.dtype) if self.weight_grad is not None else None
        return self.hidden, w


def _cat_outputs(pieces, layout):
    present = [o is not None for o in pieces[0]]
    layout.extend(present)  # the caller restores fn's Nones from it
    return present, [torch.cat([p[i] for p in pieces]) for i, keep in enumerate(present) if keep]


class _ProjectRowwise(torch.autograd.Function):
    """Outputs of ``fn`` over chunks; backward recomputes each chunk (4 matmuls in all)."""

    @staticmethod
    def forward(ctx, hidden, weight, fn, token_chunk, valid_columns, layout, *rows):
        pieces = [tuple(fn(_project(hidden[s:e], weight, valid_columns), *_row_slices(rows, s, e), differentiate=False,
                           metrics=True))
                  for s, e in _chunks(hidden.shape[0], token_chunk)]
        present, outs = _cat_outputs(pieces, layout)
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        ctx.save_for_backward(hidden, weight, *rows)
        ctx.fn, ctx.token_chunk, ctx.valid_columns, ctx.present = fn, token_chunk, valid_columns, present
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, *rows = ctx.saved_tensors
        acc = _ProjectionGrads(hidden, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.valid_columns)
        for s, e in _chunks(hidden.shape[0], ctx.token_chunk):
            # grads[j] belongs to the j-th output present in the forward (None at a metric's place).
            acc.differentiate(ctx.fn, hidden, rows, s, e, grads, ctx.present, metrics=False)
        return acc.result() + (None, None, None, None) + (None,) * len(rows)


class _ProjectRowwiseLinear(torch.autograd.Function):
    """``L = Σ_j Σ_i coeffs_j[i] · out_j[i]`` with its gradient computed in the forward (3 matmuls).

    Returns ``(L, *outputs detached)``; backward scales the stored ``∂L/∂hidden``,
    ``∂L/∂weight`` by the incoming scalar gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, fn, token_chunk, valid_columns, layout, coeffs, *rows):
        acc = _ProjectionGrads(hidden, weight, hidden.requires_grad, weight.requires_grad, valid_columns)
        pieces, loss = [], torch.zeros((), dtype=torch.float64, device=hidden.device)
        for s, e in _chunks(hidden.shape[0], token_chunk):
            outs = acc.differentiate(fn, hidden, rows, s, e, coeffs, None, metrics=True)
            for o, c in zip(outs, coeffs):
                if o is not None and c is not None:
                    loss += (o.double() * c[s:e].double()).sum()
            pieces.append(outs)
        _, outs = _cat_outputs(pieces, layout)
        grad_h, grad_w = acc.result()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(*outs)
        return (loss.to(accumulation_dtype(weight.dtype)), *outs)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grads = [g * grad_loss.to(g.dtype) if g is not None else None for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 7)


@dataclass
class ProjectedLogits:
    """This rank's logits shard ``hidden @ weight.T`` ``[N, V/TP]``, computed only chunk by chunk.

    ``hidden`` ``[N, H]`` (any float dtype; cast to the weight's for the matmul) is the
    output layer's full input on every TP rank; ``weight`` ``[V/TP, H]`` its vocab shard.
    ``valid_columns``: how many of the shard's columns are real vocabulary (None: all); the
    rest, Megatron's padding rows, read as
    :data:`~nemo_kd.losses.vocab_parallel.PADDED_VOCAB_LOGIT` in every chunk, as
    :func:`~nemo_kd.losses.vocab_parallel.mask_padded_vocab_` does to materialised logits.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    token_chunk: int = DEFAULT_PROJECTION_CHUNK
    valid_columns: Optional[int] = None

    @classmethod
    def of_hidden_states(cls, hidden: torch.Tensor, weight: torch.Tensor, token_chunk: int,
                         valid_columns: Optional[int] = None) -> "ProjectedLogits":
        """From a model's final hidden states ``[..., H]`` (e.g. ``[b, s, H]``; rows flattened in order)."""
        return cls(hidden.reshape(-1, hidden.shape[-1]), weight, token_chunk, valid_columns)

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

    def project_rows(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """Logits of some rows of the hidden states (no gradient): a frozen teacher's chunk."""
        with torch.no_grad():
            return _project(hidden_rows, self.weight, self.valid_columns)

    def materialize(self) -> torch.Tensor:
        """The whole logits shard (differentiable): for references and tests only."""
        return _project(self.hidden, self.weight, self.valid_columns)

    def map_rows(self, fn: RowFunction, *rows: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
        """``fn(Z, *rows)`` computed chunk by chunk, differentiable w.r.t. hidden and weight.

        ``fn`` must be row-wise: output row ``i`` depends on logits row ``i`` and row ``i``
        of each of ``rows`` (``[N, ...]`` tensors or None, never differentiated) only, and
        return the same tuple layout (per-row tensors or None) for every chunk. TP
        collectives inside ``fn`` are fine (all ranks run the same chunks). Integer
        outputs (an argmax) are returned without gradient.
        """
        self._check_rows(rows)
        layout = []
        outs = iter(_ProjectRowwise.apply(self.hidden, self.weight, fn, int(self.token_chunk), self.valid_columns,
                                          layout, *rows))
        return tuple(next(outs) if present else None for present in layout)

    def linear_loss(self, fn: RowFunction, coeffs: Sequence[Optional[torch.Tensor]],
                    *rows: Optional[torch.Tensor]):
        """``(L, outputs)`` with ``L = Σ_j Σ_i coeffs[j][i] · fn(Z)_j[i]`` and ``fn``'s outputs (detached).

        For a loss that is linear in ``fn``'s per-row outputs, with coefficients known before
        the logits exist (global-batch normalisers, masks, term weights): each chunk's
        ``∂L/∂Z_c`` is taken while ``Z_c`` is live, so the projection costs three matmuls
        like the materialised output layer (no backward recompute). ``coeffs[j]``: ``[N]``
        (or None) for output ``j``. ``L`` is differentiable w.r.t. hidden and weight; the
        outputs are for metrics. Same contract on ``fn`` as :meth:`map_rows`.
        """
        self._check_rows(rows)
        layout = []
        loss, *outs = _ProjectRowwiseLinear.apply(self.hidden, self.weight, fn, int(self.token_chunk),
                                                  self.valid_columns, layout,
                                                  tuple(coeffs), *rows)
        outs = iter(outs)
        return loss, tuple(next(outs) if present else None for present in layout)

    def _check_rows(self, rows):
        for r in rows:
            if r is not None and r.shape[0] != self.hidden.shape[0]:
                raise ValueError(f"row input with {r.shape[0]} rows for {self.hidden.shape[0]} tokens")
            if r is not None and r.requires_grad:
                raise ValueError("the projection differentiates hidden and weight only; detach the row inputs")
