"""Attention of the modern families on the local (CPU) spec: sliding windows, attention sinks, YaRN RoPE.

* ``SDPACoreAttention`` with a window (Megatron's ``(left, right)``), sinks (``softmax_type`` off-by-one /
  learnable) and every mask the local spec sees (causal, padding, a packed row's block-diagonal mask, a
  KV-cache decode step) against a float64 reference written here, one query and one head at a time,
  forward and backward;
* the same core attention inside Hugging Face's own attention modules (Mistral's window, gpt-oss's sinks
  and alternating window), same weights, against ``transformers``' eager attention;
* a whole GPT with windows on alternate layers, learnable sinks and YaRN at TP=2 (sinks split by head)
  against TP=1: logits, the sinks' gradients, their distributed-checkpoint sharding;
* YaRN's frequencies and attention factor against ``transformers``' rope init;
* KV-cache generation with a window against re-running the whole prefix;
* the ``GPTModelConfig`` keys: validation and the dict round trip.
"""

import json
import math

import pytest
import torch

from dist_utils import WorldOfOne, run_distributed


@pytest.fixture(scope="module")
def world():
    with WorldOfOne(seed=7):
        yield


def _gpt_cfg(**kw):
    from nemo_kd.models import GPTModelConfig

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                vocab_size=100, max_position_embeddings=64)
    base.update(kw)
    return GPTModelConfig(**base)


def _core(layer_number=1, **kw):
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_kd.models.builder import to_transformer_config
    from nemo_kd.models.layer_spec import SDPACoreAttention

    core = SDPACoreAttention(to_transformer_config(_gpt_cfg(**kw)), layer_number, AttnMaskType.causal, "self")
    if core.softmax_offset is not None and isinstance(core.softmax_offset, torch.nn.Parameter):
        with torch.no_grad():  # sinks of either sign and a few units: they matter
            core.softmax_offset.copy_(torch.tensor([1.5, -2.0, 0.3, 3.0])[: core.softmax_offset.numel()])
    return core


# ----------------------------------------------------------------------------- float64 reference


def _reference(q, k, v, scale, keys_of, sink=None):
    """float64 attention, one (row, head, query) at a time: ``keys_of(b, i)`` lists the key positions query
    ``i`` of row ``b`` sees; ``sink[h]`` one more logit in the denominator. q ``[sq, b, np, hn]``, k/v
    ``[sk, b, ng, hn]`` -> ``[sq, b, np * hn]``."""
    sq, B, H, hn = q.shape
    sk, G = k.shape[0], k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    rows = []
    for i in range(sq):
        per_b = []
        for b in range(B):
            heads = []
            for h in range(H):
                g = h // (H // G)  # Megatron's GQA grouping: consecutive query heads share a kv head
                keys = keys_of(b, i)
                logits = torch.stack([(q[i, b, h] * k[j, b, g]).sum() * scale for j in keys])
                if sink is not None:
                    logits = torch.cat([logits, sink[h].double().view(1)])
                p = torch.softmax(logits, 0)[: len(keys)]
                heads.append(sum(p[n] * v[j, b, g] for n, j in enumerate(keys)))
            per_b.append(torch.cat(heads))
        rows.append(torch.stack(per_b))
    return torch.stack(rows)


def _keys(sq, sk, left=None, padded=None, docs=None):
    """The keys of query ``i`` (position ``sk - sq + i``): causal, within ``left`` before it, not padding,
    in the same packed document."""

    def keys_of(b, i):
        pos = sk - sq + i
        out = [j for j in range(sk) if j <= pos and (left is None or j >= pos - left)]
        if padded is not None:
            out = [j for j in out if not padded[b][j]]
        if docs is not None:
            out = [j for j in out if docs[b][j] == docs[b][pos]]
        return out or list(range(sk))  # fully masked: uniform (Megatron's -10000 fill)

    return keys_of


def _qkv(sq, sk, b=2, np_=4, ng=2, hn=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, np_, hn, generator=g)
    k = torch.randn(sk, b, ng, hn, generator=g)
    v = torch.randn(sk, b, ng, hn, generator=g)
    return q, k, v


@pytest.mark.parametrize("softmax_type", ["vanilla", "off-by-one", "learnable"])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("mask", ["causal", "padding", "packed"])
def test_core_attention_equals_float64_reference(world, softmax_type, window, mask):
    """Forward and backward (q, k, v and the learnable sinks) against the float64 loop."""
    from megatron.core.transformer.enums import AttnMaskType

    s = 12
    core = _core(window_size=None if window is None else [window, 0], softmax_type=softmax_type)
    q, k, v = (t.requires_grad_() for t in _qkv(s, s))
    padded = docs = attention_mask = None
    if mask == "padding":  # right padding, as the padded batches: row 1 has 8 real tokens
        padded = [[False] * s, [False] * 8 + [True] * 4]
        attention_mask = torch.tensor(padded)[:, None, None, :]  # [b, 1, 1, sk], True = masked
    elif mask == "packed":  # two documents in row 0 (7 + 5), three in row 1: block-diagonal mask
        docs = [[0] * 7 + [1] * 5, [0] * 3 + [1] * 6 + [2] * 3]
        d = torch.tensor(docs)
        attention_mask = (d[:, :, None] != d[:, None, :])[:, None]  # [b, 1, sq, sk]
    out = core(q, k, v, attention_mask, AttnMaskType.causal)
    sink = None
    if softmax_type == "learnable":
        sink = core.softmax_offset
    elif softmax_type == "off-by-one":
        sink = torch.zeros(4)
    ref = _reference(q, k, v, core.softmax_scale, _keys(s, s, window, padded, docs), sink)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [q, k, v] + ([core.softmax_offset] if softmax_type == "learnable" else [])
    got = torch.autograd.grad(out, leaves, grad.float())
    want = torch.autograd.grad(ref, leaves, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # fp32 grads of fp32 leaves; the reference ran in float64
    if window is not None:  # the window changed something (the rows are longer than it)
        full = _reference(q, k, v, core.softmax_scale, _keys(s, s, None, padded, docs), sink)
        assert (full - ref).abs().max() > 1e-2


@pytest.mark.parametrize("softmax_type", ["vanilla", "learnable"])
def test_decode_step_sees_its_own_window(world, softmax_type):
    """Megatron's static-batching decode runs the last ``sq`` queries over all ``sk`` cached keys with
    ``no_mask``: the band is bottom-right aligned, as the rows of the full causal computation."""
    from megatron.core.transformer.enums import AttnMaskType

    s, left = 10, 2
    core = _core(window_size=[left, 0], softmax_type=softmax_type)
    q, k, v = _qkv(s, s, seed=3)
    full = core(q, k, v, None, AttnMaskType.causal)
    for sq in (1, 2):
        step = core(q[-sq:], k, v, None, AttnMaskType.no_mask)
        torch.testing.assert_close(step, full[-sq:], atol=1e-6, rtol=0)
    sink = core.softmax_offset if softmax_type == "learnable" else None
    ref = _reference(q[-1:], k, v, core.softmax_scale, _keys(1, s, left), sink)
    torch.testing.assert_close(full[-1:].double(), ref, atol=2e-6, rtol=0)


def test_window_layers_follow_megatron_skip_freq(world):
    """``window_attn_skip_freq`` N: every N-th layer (counting from 1) has full attention; a list: 1 = window."""
    assert [_core(n, num_layers=4, window_size=[5, 0], window_attn_skip_freq=2).window_size
            for n in (1, 2, 3, 4)] == [(5, 0), None, (5, 0), None]
    assert [_core(n, num_layers=4, window_size=[5, 0], window_attn_skip_freq=[0, 0, 1, 1]).window_size
            for n in (1, 2, 3, 4)] == [None, None, (5, 0), (5, 0)]
    assert [_core(n, num_layers=4, window_size=[5, 0]).window_size for n in (1, 4)] == [(5, 0), (5, 0)]


# ----------------------------------------------------------------------------- transformers' eager attention


def _hf_attention_vs_ours(family, layer_idx, seed):
    """(ours, HF eager) outputs of one HF attention module with random weights, the core attention swapped
    for SDPACoreAttention configured as the converted model would be, on a right-padded batch."""
    import transformers.masking_utils as mu

    torch.manual_seed(seed)
    W = 4  # HF sliding_window: the query and the 3 keys before it
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                  max_position_embeddings=64, sliding_window=W, attn_implementation="eager")
    if family == "mistral":
        from transformers import MistralConfig
        from transformers.models.mistral import modeling_mistral as mod

        config = MistralConfig(**common)
        attn = mod.MistralAttention(config, layer_idx)
        rotary = mod.MistralRotaryEmbedding(config)
        sliding, kw = True, dict(window_size=[W - 1, 0])
    else:
        from transformers import GptOssConfig
        from transformers.models.gpt_oss import modeling_gpt_oss as mod

        config = GptOssConfig(**common, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)
        attn = mod.GptOssAttention(config, layer_idx)
        with torch.no_grad():
            attn.sinks.normal_(0, 2)
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                lin.bias.normal_(0, 0.1)
        rotary = mod.GptOssRotaryEmbedding(config)
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        kw = dict(window_size=[W - 1, 0], window_attn_skip_freq=2, softmax_type="learnable")
    attn.eval()
    b, s = 2, 11
    hidden = torch.randn(b, s, 64)
    pad2d = torch.ones(b, s, dtype=torch.long)
    pad2d[1, 8:] = 0  # right padding
    position_ids = torch.arange(s)[None].expand(b, s)
    cos, sin = rotary(hidden, position_ids)
    make = mu.create_sliding_window_causal_mask if sliding else mu.create_causal_mask
    hf_mask = make(config=config, inputs_embeds=hidden, attention_mask=pad2d, cache=None, position_ids=position_ids)
    with torch.no_grad():
        want, _ = attn(hidden, (cos, sin), hf_mask)

        core = _core(layer_idx + 1, **kw)
        if core.softmax_offset is not None:
            core.softmax_offset.copy_(attn.sinks)
        shape = (b, s, -1, 16)
        q = attn.q_proj(hidden).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden).view(shape).transpose(1, 2)
        q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
        sbhd = [t.permute(2, 0, 1, 3) for t in (q, k, v)]  # [b, h, s, d] -> [s, b, h, d]
        mask = (pad2d == 0)[:, None, None, :]
        ctx = core(*sbhd, mask)  # [s, b, h * d]
        got = attn.o_proj(ctx.transpose(0, 1))
    real = pad2d.bool()
    return got[real], want[real], core


@pytest.mark.parametrize("family,layer_idx", [("mistral", 0), ("gpt_oss", 0), ("gpt_oss", 1)])
def test_core_attention_equals_transformers_eager(world, family, layer_idx):
    """Mistral's sliding window (W keys = window_size [W - 1, 0]); gpt-oss's sinks (softmax_offset = sinks)
    on its sliding layer 0 and its full layer 1 (window_attn_skip_freq=2)."""
    got, want, core = _hf_attention_vs_ours(family, layer_idx, seed=layer_idx + 3)
    assert core.window_size == ((3, 0) if layer_idx == 0 else None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- whole model, TP=2


V = 100


def _model_cfg():
    return _gpt_cfg(num_layers=2, window_size=[3, 0], window_attn_skip_freq=2, softmax_type="learnable",
                    position_embedding_type="yarn", yarn_rotary_scaling_factor=4.0,
                    yarn_original_max_position_embeddings=8, yarn_correction_range_round_to_int=False)


def _batch():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, V, (2, 12), generator=g)
    weights = torch.randn(2, 12, 256, generator=g)
    weights[..., V:] = 0
    return tokens, weights


def _step(model, tp_rank, tp):
    tokens, weights = _batch()
    position_ids = torch.arange(12)[None].expand(2, 12)
    logits = model(tokens, position_ids, None)  # [b, s, V_pad / tp]
    width = logits.shape[-1]
    (logits * weights[..., tp_rank * width:(tp_rank + 1) * width]).sum().backward()
    sinks = [model.decoder.layers[i].self_attention.core_attention.softmax_offset for i in range(2)]
    return logits.detach(), [p.detach().clone() for p in sinks], [p.grad.clone() for p in sinks]


def _tp2_worker(rank, world, full):
    import torch.distributed as dist

    from nemo_kd.models import build_gpt_model, shard_state_dict
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=2, seed=3))
    try:
        cfg = _model_cfg()
        model = build_gpt_model(cfg)
        missing, unexpected = model.load_state_dict(shard_state_dict(full, cfg, state.tp_rank(), 2), strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        offset = model.decoder.layers[0].self_attention.core_attention.softmax_offset
        assert offset.shape == (2,) and offset.tensor_model_parallel and offset.partition_dim == 0
        logits, sinks, grads = _step(model, state.tp_rank(), 2)
        parts = [torch.empty_like(logits) for _ in range(2)]
        dist.all_gather(parts, logits.contiguous(), group=state.tp_group())
        sharded = model.sharded_state_dict()["decoder.layers.0.self_attention.core_attention.softmax_offset"]
        layout = (tuple(sharded.global_shape), tuple(sharded.global_offset), tuple(sharded.axis_fragmentations))
        return torch.cat(parts, -1)[..., :V], sinks, grads, layout
    finally:
        destroy_parallel()


def test_sinks_split_by_head_tp2_equals_tp1(world):
    """Windows on alternate layers + learnable sinks + YaRN: TP=2 (each rank 2 of the 4 heads' sinks) gives
    TP=1's logits and sink gradients; dist-checkpointing sees each layer's sinks as one [4] tensor split by
    head (stacked over layers as Megatron stacks every layer's tensors)."""
    from nemo_kd.models import build_gpt_model

    cfg = _model_cfg()
    model = build_gpt_model(cfg)
    full = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    assert full["decoder.layers.0.self_attention.core_attention.softmax_offset"].shape == (4,)
    logits, sinks, grads = _step(model, 0, 1)
    results = run_distributed(_tp2_worker, 2, full)
    for rank, (lg, s2, g2, layout) in enumerate(results):
        torch.testing.assert_close(lg, logits[..., :V], atol=2e-5, rtol=0)
        assert layout == ((2, 4), (0, 2 * rank), (2, 2))  # [layers, heads]: layer 0, this rank's 2 heads
    for layer in range(2):
        torch.testing.assert_close(torch.cat([r[1][layer] for r in results]), sinks[layer], atol=0, rtol=0)
        torch.testing.assert_close(torch.cat([r[2][layer] for r in results]), grads[layer], atol=2e-5, rtol=0)
    assert all(g.abs().min() > 0 for g in grads)  # every head's sink gets a gradient


# ----------------------------------------------------------------------------- YaRN


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_frequencies_equal_transformers(world, truncate):
    """Megatron's YarnRotaryEmbedding as the builder wires it: inv_freq, the attention factor on cos/sin
    (applied by Megatron's attention: the config carries the yarn_* attributes) and the cos/sin
    themselves equal transformers' yarn rope init (gpt-oss's settings, scaled down)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from nemo_kd.models import build_gpt_model

    rope = {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": truncate,
            "original_max_position_embeddings": 32, "rope_theta": 150000.0}
    hf = GptOssConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=256, rope_parameters=rope)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    model = build_gpt_model(_gpt_cfg(kv_channels=16, rotary_base=150000, max_position_embeddings=256,
                                     position_embedding_type="yarn", yarn_rotary_scaling_factor=8.0,
                                     yarn_original_max_position_embeddings=32,
                                     yarn_correction_range_round_to_int=truncate))
    emb, mscale = model.rotary_pos_emb(256)  # [s, 1, 1, dim]: positions * inv_freq, twice
    positions = torch.arange(256, dtype=torch.float32)
    torch.testing.assert_close(emb[1, 0, 0, :8], inv_freq, atol=0, rtol=1e-6)
    assert mscale == pytest.approx(factor, rel=1e-12) and factor == pytest.approx(0.1 * math.log(8.0) + 1.0)
    assert _yarn_get_concentration_factor_from_config(model.config) == pytest.approx(factor, rel=1e-12)
    cos, sin = GptOssRotaryEmbedding(hf)(torch.zeros(1), positions[None].long())  # [1, s, dim / 2] (gpt-oss halves)
    torch.testing.assert_close((emb[:, 0, 0, :8].cos() * mscale), cos[0], atol=2e-5, rtol=0)
    torch.testing.assert_close((emb[:, 0, 0, :8].sin() * mscale), sin[0], atol=2e-5, rtol=0)
    assert inv_freq.shape == (8,) and not torch.allclose(inv_freq, 1 / 150000 ** (torch.arange(0, 16, 2) / 16))


# ----------------------------------------------------------------------------- generation with the KV cache


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_generation_with_window_equals_full_forward(world, temperature):
    """Prompts and completions longer than the window (2 keys back, alternate layers) with sinks and YaRN:
    Megatron's KV cache path draws what re-running the whole prefix draws; its per-step logits equal the
    full forward's."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from nemo_kd.generation.sampling import SamplingConfig, generate
    from nemo_kd.models import build_gpt_model

    cfg = _gpt_cfg(window_size=[2, 0], window_attn_skip_freq=2, softmax_type="learnable",
                   position_embedding_type="yarn", yarn_rotary_scaling_factor=4.0,
                   yarn_original_max_position_embeddings=8)
    torch.manual_seed(0)
    model = build_gpt_model(cfg).eval()
    with torch.no_grad():
        model.output_layer.weight.mul_(20)  # peaked distributions: greedy ties impossible
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3, 3, 4, 50, 60, 70, 80, 90, 11]]
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=9, seed=4)
    kw = dict(eos_id=None, pad_id=0, vocab_size=V, batch_size=3)
    cached = generate(model, prompts, sampling, use_kv_cache=True, **kw)
    rerun = generate(model, prompts, sampling, use_kv_cache=False, **kw)
    for a, b in zip(cached, rerun):
        assert a.token_ids == b.token_ids and len(a.token_ids) == 9
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)

    seq = torch.tensor([prompts[0] + cached[0].token_ids])  # one row, 16 tokens
    n = seq.shape[1]
    with torch.no_grad():
        full = model(seq, torch.arange(n)[None], None)[0, :, :V]
        ctx = StaticInferenceContext(1, n)
        steps = []
        for pos in range(n):
            out = model(seq[:, pos:pos + 1], torch.tensor([[pos]]), None, inference_context=ctx,
                        runtime_gather_output=True)
            ctx.sequence_len_offset += 1
            steps.append(out[0, -1, :V])
    torch.testing.assert_close(torch.stack(steps), full, atol=1e-4, rtol=0)
    no_window = build_gpt_model(_gpt_cfg(softmax_type="learnable", position_embedding_type="yarn",
                                         yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=8))
    no_window.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (no_window.eval()(seq, torch.arange(n)[None], None)[0, :, :V] - full).abs().max() > 1e-2


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw,match", [
    (dict(window_size=4), r"window_size must be null or \[left, right\]"),
    (dict(window_size=[4, 2]), "right must be 0"),
    (dict(window_size=[-1, 0]), "left must be >= 0"),
    (dict(window_attn_skip_freq=2), "set window_size too"),
    (dict(window_size=[4, 0], window_attn_skip_freq=1), "integer >= 2"),
    (dict(window_size=[4, 0], window_attn_skip_freq=[1, 0, 1]), "one 0 .* per layer \\(2\\)"),
    (dict(softmax_type="sink"), "softmax_type must be one of"),
    (dict(position_embedding_type="yarn"), "needs yarn_original_max_position_embeddings"),
    (dict(position_embedding_type="yarn", yarn_original_max_position_embeddings=8, rotary_percent=0.5),
     "rotary_percent=1.0"),
    (dict(position_embedding_type="yarn", yarn_original_max_position_embeddings=8, yarn_rotary_scaling_factor=0.5),
     "yarn_rotary_scaling_factor must be >= 1"),
    (dict(position_embedding_type="yarn", yarn_original_max_position_embeddings=8, yarn_beta_fast=1.0),
     "yarn_beta_fast .* must be greater"),
    (dict(yarn_rotary_scaling_factor=4.0), "position_embedding_type is 'rope'"),
])
def test_config_errors_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        _gpt_cfg(**kw)


def test_config_round_trip_and_defaults_left_out():
    from nemo_kd.models import GPTModelConfig

    cfg = _model_cfg()
    d = cfg.to_dict()
    assert d["window_size"] == [3, 0] and d["softmax_type"] == "learnable" and d["yarn_beta_fast"] == 32.0
    assert GPTModelConfig.from_dict(d) == cfg
    assert GPTModelConfig.from_dict(json.loads(json.dumps(d))) == cfg  # as a checkpoint's JSON holds it
    assert GPTModelConfig.from_dict(dict(d, window_size=(3, 0))).window_size == [3, 0]
    plain = _gpt_cfg().to_dict()  # a model without the features: the dict it had before the keys existed
    assert not any(k.startswith("yarn_") or k in ("window_size", "window_attn_skip_freq", "softmax_type")
                   for k in plain)
    assert GPTModelConfig.from_dict(plain) == _gpt_cfg()
    listed = _gpt_cfg(window_size=[3, 0], window_attn_skip_freq=(1, 0)).to_dict()
    assert listed["window_attn_skip_freq"] == [1, 0] and "softmax_type" not in listed


# ----------------------------------------------------------------------------- Hugging Face conversion


def _windowed_hf_configs():
    from transformers import MistralConfig, Qwen2Config

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    return {
        "mistral": MistralConfig(**common, vocab_size=300, sliding_window=4),  # every layer, W = 4
        # Qwen2: layers from max_window_layers on slide (here layer 1 only), W = 5
        "qwen2": Qwen2Config(**common, vocab_size=150, use_sliding_window=True, sliding_window=5,
                             max_window_layers=1),
    }


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_hf_import_logits_parity(world, tmp_path, family):
    """Mistral / Qwen2 with an active sliding window import as window_size [W - 1, 0] (Qwen2's full layers as
    window_attn_skip_freq 0s): logits equal transformers' (fp32, <= 1e-4) on rows 3x longer than the window,
    and the exported config.json is the one imported."""
    import warnings

    from test_convert_hf import ATOL, _megatron_logits, _randomise, _tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from nemo_kd.convert import (architecture_to_hf_config, build_and_load, convert_hf_to_megatron,
                                 hf_config_to_architecture)

    config = _windowed_hf_configs()[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    _randomise(hf, 1)
    hf_dir = str(tmp_path / "hf")
    hf.save_pretrained(hf_dir)
    _tiny_tokenizer(config.vocab_size).save_pretrained(hf_dir)
    tokens = torch.randint(0, config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(tokens).logits
    arch = convert_hf_to_megatron(hf_dir, str(tmp_path / "megatron"), progress=False)
    W = config.sliding_window
    assert arch.model.window_size == [W - 1, 0]
    assert arch.model.window_attn_skip_freq == (None if family == "mistral" else [0, 1])
    got = _megatron_logits(build_and_load(str(tmp_path / "megatron")).model_chunks, tokens)[..., :config.vocab_size]
    assert (got - want).abs().max().item() <= ATOL
    exported = architecture_to_hf_config(arch)
    assert hf_config_to_architecture(exported).model == arch.model
    assert exported["sliding_window"] == W
    with warnings.catch_warnings():  # the window matters: full attention differs
        warnings.simplefilter("ignore")
        no_window = dict(sliding_window=None, **({} if family == "mistral" else
                                                 dict(use_sliding_window=False, layer_types=None)))
        full = AutoModelForCausalLM.from_config(type(config)(**{**config.to_dict(), **no_window}),
                                                attn_implementation="eager").eval()
    full.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert (full(tokens).logits - want).abs().max().item() > 1e-2
