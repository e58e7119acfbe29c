"""An exact reference context-parallel core attention for the CPU tests (TE's is GPU-only).

:class:`ReferenceCPAttention` has the constructor and ``forward`` of Megatron's core attention (query
``[s_local, b, np, hn]``, key/value ``[s_local, b, ng, hn]``, output ``[s_local, b, np·hn]``) and attends
across the context-parallel group the simplest way there is: it all-gathers every rank's keys and values
into whole rows (global order), and each of this rank's queries attends every key at or before its
*global* position (causal mask in the global positions of Megatron's load-balanced chunks). The global
order comes from Megatron's own ``get_batch_on_this_cp_rank`` applied to ``arange(S)``, not from the
code under test. Backward: the gathered keys' and values' gradients are summed over the group (gloo has
no reduce-scatter of this layout: an all-reduce, then each rank keeps its own chunks).

:func:`reference_cp_attention` is a context in which the local spec builds it (a ModuleSpec swap through
:func:`nemo_kd.models.layer_spec.local_core_attention`), so the local spec's CP refusal is lifted only there.
No dropout, sliding window, sinks or packed rows.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule


def global_order(seq_length: int, cp_group) -> torch.Tensor:
    """The global positions each CP rank holds, as Megatron cuts them: ``[CP, S / CP]``."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    class _Rank:  # get_batch_on_this_cp_rank reads the group's size and rank only
        def __init__(self, r):
            self.r = r

        def size(self):
            return dist.get_world_size(cp_group)

        def rank(self):
            return self.r

    positions = torch.arange(seq_length)[None]
    return torch.cat([get_batch_on_this_cp_rank({"p": positions.clone()}, _Rank(r))["p"]
                      for r in range(dist.get_world_size(cp_group))])


class _GatherSequence(torch.autograd.Function):
    """``[s_local, ...]`` of every CP rank -> ``[S, ...]`` in global order; backward: sum over the group, keep mine."""

    @staticmethod
    def forward(ctx, x, cp_group, order):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(cp_group))]
        dist.all_gather(parts, x.contiguous(), group=cp_group)
        full = torch.empty((order.numel(),) + tuple(x.shape[1:]), dtype=x.dtype)
        for r, part in enumerate(parts):
            full[order[r]] = part
        ctx.cp_group, ctx.mine = cp_group, order[dist.get_rank(cp_group)]
        return full

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.cp_group)
        return grad[ctx.mine], None, None


class ReferenceCPAttention(MegatronModule):
    supports_context_parallel = True

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        from megatron.core import parallel_state

        if config.window_size is not None or config.softmax_type != "vanilla":
            raise NotImplementedError("ReferenceCPAttention: full causal attention without sinks only")
        if (config.attention_dropout if attention_dropout is None else attention_dropout) > 0:
            raise NotImplementedError("ReferenceCPAttention: no attention dropout")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.num_heads, self.num_groups = config.num_attention_heads // tp, config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.cp_group = parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("ReferenceCPAttention: no packed rows, no attention bias")
        sq, b = query.shape[:2]
        cp = dist.get_world_size(self.cp_group)
        order = global_order(sq * cp, self.cp_group)
        k = _GatherSequence.apply(key, self.cp_group, order)
        v = _GatherSequence.apply(value, self.cp_group, order)
        q_pos = order[dist.get_rank(self.cp_group)]
        allowed = torch.arange(sq * cp)[None, :] <= q_pos[:, None]  # [sq, S]: causal in global positions
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, k, v))  # [b, h, s, d]
        if self.num_heads // self.num_groups > 1:
            k = k.repeat_interleave(self.num_heads // self.num_groups, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None, None], scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)


def reference_cp_attention():
    """The local spec builds :class:`ReferenceCPAttention` as its core attention inside this context."""
    from nemo_kd.models.layer_spec import local_core_attention

    return local_core_attention(ReferenceCPAttention)
