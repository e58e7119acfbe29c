"""Segment-wise attention for packed rows (Megatron's THD layout, ``PackedSeqParams``) on the local spec.

* ``packed_seq_params`` of ``segment_ids``: the runs of a row, by hand;
* ``SDPACoreAttention`` given the rows flattened with ``packed_seq_params`` (segments bucketed by length,
  one SDPA batch per bucket) against the dense path with the block-diagonal mask on the same rows and
  against a float64 loop, per segment: outputs and the gradients of q, k, v (and of learnable sinks), with
  a sliding window and sinks, segment lengths in several buckets (1 to 33 tokens) and GQA;
* a whole GPT (RoPE: Megatron's THD rotary restarts positions per segment) flattened with
  ``packed_seq_params`` == the same rows with the block-diagonal mask and restarted ``position_ids``.
The training, online-teacher and extraction paths through it are tests/test_packing.py's.
"""

import pytest
import torch

from test_attention_features import _core, _keys, _reference, world  # noqa: F401  (module fixture)


def test_packed_seq_params_are_the_runs_of_each_row():
    from nemo_kd.data.packing import packed_seq_params

    seg = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    p = packed_seq_params(seg)
    assert p.qkv_format == "thd" and p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_q.tolist() == [0, 3, 5, 6, 7, 12, 18] and p.cu_seqlens_kv is p.cu_seqlens_q
    assert p.max_seqlen_q == p.max_seqlen_kv == 6


def test_bucket_length_pads_at_most_a_quarter_above_eight():
    from nemo_kd.models.layer_spec import bucket_length

    for n in range(1, 5000):
        L = bucket_length(n)
        assert L >= n and (L % 8 == 0) and (n < 64 or L <= 1.25 * n), (n, L)
    assert [bucket_length(n) for n in (1, 8, 9, 64, 65, 81, 300, 4096)] == [8, 8, 16, 64, 80, 96, 320, 4096]


# rows of 40 positions: segment lengths 1..33 (buckets of 8, 16, 24, 40), a padding tail as a segment of its own
ROWS = [[1, 9, 17, 13], [33, 5, 2]]


def _segments():
    seg = []
    for lengths in ROWS:
        row = [i for i, n in enumerate(lengths) for _ in range(n)]
        seg.append(row + [-1] * (40 - len(row)))
    return torch.tensor(seg)


@pytest.mark.parametrize("softmax_type", ["vanilla", "off-by-one", "learnable"])
@pytest.mark.parametrize("window", [None, 4])
def test_segment_attention_equals_masked_path_and_float64(world, softmax_type, window):  # noqa: F811
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_kd.data.packing import packed_attention_mask, packed_seq_params

    seg = _segments()
    b, s = seg.shape
    core = _core(window_size=None if window is None else [window, 0], softmax_type=softmax_type)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(s, b, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(s, b, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(s, b, 2, 16, generator=g, requires_grad=True)
    weight = torch.randn(s, b, 64, generator=g)  # a random cotangent

    def grads(out):
        params = [q, k, v] + ([core.softmax_offset] if softmax_type == "learnable" else [])
        return torch.autograd.grad((out * weight).sum(), params)

    # dense: [s, b] rows with the block-diagonal mask
    dense = core(q, k, v, packed_attention_mask(seg), AttnMaskType.causal)
    dense_grads = grads(dense)
    # THD: the rows flattened row after row ([b * s, heads, d], Megatron's squeezed layout)
    flat = [x.transpose(0, 1).reshape(b * s, x.shape[2], x.shape[3]) for x in (q, k, v)]
    packed = core(*flat, None, AttnMaskType.causal, packed_seq_params=packed_seq_params(seg))
    assert packed.shape == (b * s, 64)
    packed = packed.view(b, s, 64).transpose(0, 1)
    torch.testing.assert_close(packed, dense, atol=2e-6, rtol=1e-5)
    packed_grads = grads(packed)
    for got, ref in zip(packed_grads, dense_grads):
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)

    # float64, one query and head at a time (keys: its segment, causal, the window)
    sink = core.softmax_offset.detach() if core.softmax_offset is not None else None
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _reference(qd, kd, vd, core.softmax_scale, _keys(s, s, left=window, docs=seg.tolist()), sink=sink)
    torch.testing.assert_close(packed.double(), ref, atol=1e-5, rtol=1e-5)
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), [qd, kd, vd])
    for got, r in zip(packed_grads[:3], ref_grads):
        torch.testing.assert_close(got.double(), r, atol=1e-5, rtol=1e-5)


def test_segment_attention_refuses_what_it_cannot_do(world):  # noqa: F811
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    core = _core()
    q, k = torch.zeros(10, 4, 16), torch.zeros(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="qkv_format must be 'thd'"):
        core(q, k, k, None, AttnMaskType.causal, packed_seq_params=PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu))
    with pytest.raises(NotImplementedError, match="causal only"):
        core(q, k, k, None, AttnMaskType.padding, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu))
    other = torch.tensor([0, 5, 10], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="cu_seqlens_kv == cu_seqlens_q"):
        core(q, k, k, None, AttnMaskType.causal,
             packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=other))
    with pytest.raises(ValueError, match="cu_seqlens_q ends at 12, the packed sequence has 10 tokens"):
        core(q, k, k, None, AttnMaskType.causal,
             packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 12])))


@pytest.mark.parametrize("kw", [dict(position_embedding_type="rope"),
                                dict(position_embedding_type="rope", window_size=[5, 0], softmax_type="learnable")],
                         ids=["rope", "rope-window-sinks"])
def test_gpt_with_packed_seq_params_equals_masked_rows(world, kw):  # noqa: F811
    """The model's THD path (Megatron's squeeze, THD RoPE per segment, this core attention) == the dense
    path on the same rows (block-diagonal mask, positions restarting per segment): logits and gradients."""
    from test_attention_features import _gpt_cfg

    from nemo_kd.data.packing import ModelInputs, packed_attention_mask
    from nemo_kd.models import build_gpt_model

    torch.manual_seed(0)
    model = build_gpt_model(_gpt_cfg(vocab_size=100, max_position_embeddings=40, **kw))
    seg = _segments()
    b, s = seg.shape
    ids = torch.randint(0, 100, (b, s), generator=torch.Generator().manual_seed(1))
    pos = torch.zeros(b, s, dtype=torch.long)
    for r in range(b):
        for i in seg[r].unique():
            where = (seg[r] == i).nonzero().squeeze(1)
            pos[r, where] = torch.arange(len(where))

    def run(packed):
        model.zero_grad()
        if packed:
            x = ModelInputs.of(ids, pos, seg)
            out = x.rows(model(*x.args, **x.kwargs))
        else:
            out = model(ids, pos, packed_attention_mask(seg))
        (out.float().square().mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    dense, dense_grads = run(False)
    packed, packed_grads = run(True)
    torch.testing.assert_close(packed, dense, atol=2e-5, rtol=1e-4)
    for name, g in dense_grads.items():
        torch.testing.assert_close(packed_grads[name], g, atol=2e-6, rtol=1e-4, msg=name)
