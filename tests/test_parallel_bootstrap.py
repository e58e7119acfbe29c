"""Parallel bootstrap, SDPA core attention, model config validation and TP/PP sharding."""

import socket
import types

import pytest
import torch

from dist_utils import run_distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def single_process_env(monkeypatch):
    """A world of one for initialize_parallel's env path, on a port nobody else uses."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    yield
    from nemo_kd.parallel import destroy_parallel

    destroy_parallel()


_WORLD_OF_ONE = """
import os, torch, torch.distributed as dist
from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
initialize_parallel(ParallelConfig())
t = torch.ones(1)
dist.all_reduce(t)
print(int(t.item()), dist.get_world_size(), os.environ.get("MASTER_PORT"))
destroy_parallel()
"""


def test_a_world_of_one_takes_no_port():
    """Single-process runs side by side on one machine (extraction beside training) while another process holds
    port 29500 (the fixed default rendezvous port before): two world-of-one initialisations at once succeed,
    and neither sets MASTER_PORT."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
           and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = socket.socket()
    try:
        holder.bind(("", 29500))
        holder.listen()
    except OSError:  # someone holds it already: the same situation
        pass
    try:
        procs = [subprocess.Popen([sys.executable, "-c", _WORLD_OF_ONE], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        holder.close()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert out.split()[-3:] == ["1", "1", "None"], out


def _tiny_cfg(**overrides):
    from nemo_kd.models import GPTModelConfig

    kw = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
              vocab_size=200, max_position_embeddings=16)
    kw.update(overrides)
    return GPTModelConfig(**kw)


# ---------------------------------------------------------------- bootstrap
def test_init_destroy_cycles(single_process_env):
    import torch.distributed as dist

    from megatron.core import tensor_parallel
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    for cycle in range(3):
        initialize_parallel(ParallelConfig(seed=100 + cycle))
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert state.is_initialized()
        assert (state.tp_size(), state.pp_size(), state.dp_size(), state.world_size()) == (1, 1, 1, 1)
        assert state.tp_rank() == state.pp_rank() == state.dp_rank() == 0
        assert state.is_pipeline_first_stage() and state.is_pipeline_last_stage()
        assert state.tp_group() is not None and state.dp_group() is not None
        # Megatron's RNG tracker is usable (CPU generator states) and deterministic per seed.
        with tensor_parallel.get_cuda_rng_tracker().fork():
            a = torch.rand(3)
        with pytest.raises(RuntimeError, match="already initialised"):
            initialize_parallel(ParallelConfig())
        destroy_parallel()
        assert not state.is_initialized() and not dist.is_initialized()
        initialize_parallel(ParallelConfig(seed=100 + cycle))
        with tensor_parallel.get_cuda_rng_tracker().fork():
            assert torch.equal(torch.rand(3), a)
        destroy_parallel()
    destroy_parallel()  # idempotent


def test_world_size_validation(single_process_env):
    import torch.distributed as dist

    from nemo_kd.parallel import ParallelConfig, initialize_parallel, state

    with pytest.raises(ValueError, match=r"world size 1 is not divisible by .*tensor_model_parallel_size \(2\)"):
        initialize_parallel(ParallelConfig(tensor_model_parallel_size=2))
    assert not state.is_initialized() and not dist.is_initialized()  # nothing left behind
    with pytest.raises(ValueError, match="positive integer"):
        ParallelConfig(pipeline_model_parallel_size=0)
    with pytest.raises(ValueError, match="unknown ParallelConfig keys"):
        ParallelConfig.from_dict({"tensor_parallel_size": 2})


def _ranks_body(rank, world):
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    out = []
    for tp, pp in ((2, 1), (1, 2), (1, 1)):
        initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        out.append((state.tp_rank(), state.pp_rank(), state.dp_rank(), state.is_pipeline_last_stage()))
        destroy_parallel()
    return out


@pytest.mark.distributed
def test_layouts_on_two_processes():
    # Process groups already exist (the spawner made them): initialize_parallel reuses them.
    r0, r1 = run_distributed(_ranks_body, 2)
    assert r0 == [(0, 0, 0, True), (0, 0, 0, False), (0, 0, 0, True)]
    assert r1 == [(1, 0, 0, True), (0, 1, 0, True), (0, 0, 1, True)]


# ---------------------------------------------------------------- SDPA core attention
def _reference_attention(q, k, v, key_padding, scale):
    """float64 causal attention with a key padding mask and GQA, written out by hand.

    q [sq, b, np, hn], k/v [sk, b, ng, hn], key_padding [b, sk] (True = padded key).
    """
    sq, b, np_, hn = q.shape
    ng = k.shape[2]
    out = torch.zeros(sq, b, np_, hn, dtype=torch.float64)
    for bi in range(b):
        for h in range(np_):
            g = h // (np_ // ng)  # Megatron's grouping: consecutive query heads share a kv head
            for i in range(sq):
                allowed = [j for j in range(i + 1) if not key_padding[bi, j]]
                if not allowed:  # fully masked row: Megatron attends uniformly to all keys
                    allowed = list(range(k.shape[0]))
                scores = torch.stack([q[i, bi, h].double() @ k[j, bi, g].double() for j in allowed]) * scale
                p = torch.softmax(scores, dim=0)
                out[i, bi, h] = sum(p[n] * v[j, bi, g].double() for n, j in enumerate(allowed))
    return out.reshape(sq, b, np_ * hn)


def _sdpa(num_heads, num_groups, kv_channels, softmax_scale=None, attn_mask_type=None):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_kd.models import SDPACoreAttention

    config = TransformerConfig(num_layers=1, hidden_size=num_heads * kv_channels, num_attention_heads=num_heads,
                               num_query_groups=num_groups, kv_channels=kv_channels, attention_dropout=0.0)
    tp_of_one = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 1))
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=attn_mask_type or AttnMaskType.causal,
                             attention_type="self", softmax_scale=softmax_scale, pg_collection=tp_of_one)


@pytest.mark.parametrize("num_heads,num_groups", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("softmax_scale", [None, 0.3])
def test_sdpa_matches_float64_reference(num_heads, num_groups, softmax_scale):
    from megatron.core.transformer.enums import AttnMaskType

    g = torch.Generator().manual_seed(num_groups)
    sq, b, hn = 7, 3, 8
    q = torch.randn(sq, b, num_heads, hn, generator=g)
    k = torch.randn(sq, b, num_groups, hn, generator=g)
    v = torch.randn(sq, b, num_groups, hn, generator=g)
    key_padding = torch.zeros(b, sq, dtype=torch.bool)
    key_padding[1, 5:] = True  # right padding
    key_padding[2, :2] = True  # left padding: query rows 0-1 see no key at all
    attention = _sdpa(num_heads, num_groups, hn, softmax_scale)
    scale = softmax_scale if softmax_scale is not None else hn ** -0.5
    ref = _reference_attention(q, k, v, key_padding, scale)

    # Megatron-style padding mask [b, 1, 1, sk] combined with the causal mask type.
    out = attention(q, k, v, key_padding[:, None, None, :])
    assert out.shape == (sq, b, num_heads * hn) and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)

    # The same as an explicit full mask [b, 1, sq, sk] (causal | padding) under 'padding'.
    full_mask = torch.ones(sq, sq, dtype=torch.bool).triu(1)[None, None] | key_padding[:, None, None, :]
    out_full = attention(q, k, v, full_mask, attn_mask_type=AttnMaskType.padding)
    torch.testing.assert_close(out_full.double(), ref, atol=1e-5, rtol=1e-5)

    # No mask at all: plain causal.
    out_causal = attention(q, k, v, None)
    ref_causal = _reference_attention(q, k, v, torch.zeros(b, sq, dtype=torch.bool), scale)
    torch.testing.assert_close(out_causal.double(), ref_causal, atol=1e-5, rtol=1e-5)


def test_sdpa_gradients_and_dropout():
    from megatron.core.transformer.enums import AttnMaskType

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attention = _sdpa(2, 2, 3)
    torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, None), (q, k, v))
    # packed rows come in Megatron's THD layout only (tests/test_packed_attention.py covers it); another layout
    # is refused by name
    from megatron.core.packed_seq_params import PackedSeqParams

    with pytest.raises(NotImplementedError, match="qkv_format must be 'thd'"):
        attention(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
    assert _sdpa(2, 2, 4, attn_mask_type=AttnMaskType.no_mask)._allowed_mask(
        torch.ones(1, 1, 5, 5, dtype=torch.bool), None, AttnMaskType.no_mask, 5, 5, "cpu", torch.float32) is None
    # An additive attention_bias is added to the scores (masked positions stay excluded).
    bias = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    scores = torch.einsum("sbhd,tbhd->bhst", qd, kd) * 3 ** -0.5 + bias
    scores = scores.masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), vd).reshape(4, 1, 6)
    torch.testing.assert_close(attention(qd, kd, vd, None, attention_bias=bias), ref)


# ---------------------------------------------------------------- model config / builder validation
def test_model_config_validation():
    from nemo_kd.models import GPTModelConfig

    cfg = _tiny_cfg()
    assert cfg.kv_channels == 8 and cfg.num_query_groups == 2 and cfg.gated_linear_unit
    assert (cfg.padded_vocab_size(1), cfg.padded_vocab_size(2), cfg.padded_vocab_size(4)) == (256, 256, 512)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by tensor_model_parallel_size \(8\)"):
        cfg.validate_parallel(8, 1)
    with pytest.raises(ValueError, match=r"num_query_groups \(2\) must be divisible by tensor_model_parallel_size \(4\)"):
        cfg.validate_parallel(4, 1)
    with pytest.raises(ValueError, match=r"num_layers \(2\) must be divisible by pipeline_model_parallel_size \(4\)"):
        cfg.validate_parallel(1, 4)
    with pytest.raises(ValueError, match="hidden_size .* divisible by num_attention_heads"):
        _tiny_cfg(hidden_size=30)
    with pytest.raises(ValueError, match="num_query_groups"):
        _tiny_cfg(num_query_groups=3)
    with pytest.raises(ValueError, match="normalization must be one of"):
        _tiny_cfg(normalization="rmsnorm")
    with pytest.raises(ValueError, match="unknown GPTModelConfig keys \\['num_heads'\\]"):
        GPTModelConfig.from_dict(dict(num_layers=1, hidden_size=8, num_heads=2, vocab_size=10))
    from omegaconf import OmegaConf

    node = OmegaConf.create(dict(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=10, params_dtype="bf16"))
    assert GPTModelConfig.from_dict(node).torch_dtype == torch.bfloat16
    assert GPTModelConfig.from_dict(cfg.to_dict()) == cfg


def test_builder_errors_and_norms(single_process_env):
    from nemo_kd.models import build_gpt_model, get_gpt_layer_spec
    from nemo_kd.parallel import ParallelConfig, initialize_parallel

    with pytest.raises(RuntimeError, match="initialize_parallel"):
        build_gpt_model(_tiny_cfg())
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="transformer-engine"):
            get_gpt_layer_spec("transformer_engine")
    with pytest.raises(ValueError, match="transformer_impl"):
        get_gpt_layer_spec("apex")

    initialize_parallel(ParallelConfig(seed=5))
    for norm, activation, pos in (("LayerNorm", "gelu", "learned_absolute"), ("RMSNorm", "swiglu", "rope")):
        cfg = _tiny_cfg(normalization=norm, activation=activation, position_embedding_type=pos, add_bias_linear=True,
                        qk_layernorm=True, share_embeddings_and_output_weights=True)
        model = build_gpt_model(cfg)
        norm_type = torch.nn.LayerNorm if norm == "LayerNorm" else torch.nn.RMSNorm
        assert isinstance(model.decoder.final_layernorm, norm_type)
        assert isinstance(model.decoder.layers[0].self_attention.q_layernorm, norm_type)
        ids = torch.randint(0, 200, (2, 16))
        logits = model(ids, torch.arange(16)[None].expand(2, 16), None)
        assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()
        logits.float().sum().backward()

    # Attention dropout runs under Megatron's RNG tracker (CPU generator states here).
    attention = build_gpt_model(_tiny_cfg(attention_dropout=0.5)).decoder.layers[0].self_attention.core_attention
    q, k, v = torch.randn(6, 2, 4, 8), torch.randn(6, 2, 2, 8), torch.randn(6, 2, 2, 8)
    dropped = attention.train()(q, k, v, None)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, attention.eval()(q, k, v, None))


# ---------------------------------------------------------------- sharding
def _random_full_state(cfg):
    """A full state dict with distinct random values everywhere (so misplaced slices show)."""

    g = torch.Generator().manual_seed(0)
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size(1)
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels
    full = {"embedding.word_embeddings.weight": torch.randn(v, h, generator=g)}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        full.update({
            p + "input_layernorm.weight": torch.randn(h, generator=g),
            p + "self_attention.linear_qkv.weight": torch.randn(qkv_rows, h, generator=g),
            p + "self_attention.linear_qkv.bias": torch.randn(qkv_rows, generator=g),
            p + "self_attention.linear_proj.weight": torch.randn(h, cfg.num_attention_heads * cfg.kv_channels, generator=g),
            p + "self_attention.linear_proj._extra_state": None,
            p + "pre_mlp_layernorm.weight": torch.randn(h, generator=g),
            p + "mlp.linear_fc1.weight": torch.randn(2 * f, h, generator=g),
            p + "mlp.linear_fc2.weight": torch.randn(h, f, generator=g),
        })
    full["decoder.final_layernorm.weight"] = torch.randn(h, generator=g)
    full["output_layer.weight"] = torch.randn(v, h, generator=g)
    return full


def test_sharding_round_trip_and_layout():
    from nemo_kd.models import gather_state_dict, shard_state_dict

    cfg = _tiny_cfg(num_layers=4)
    full = _random_full_state(cfg)
    for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2), (2, 4)):
        shards = [[shard_state_dict(full, cfg, t, tp, p, pp) for t in range(tp)] for p in range(pp)]
        back = gather_state_dict(shards, cfg)
        assert back.keys() == full.keys()
        for key, value in full.items():
            assert value is None and back[key] is None or torch.equal(back[key], value), key

    # Stage contents: PP=2 stage 1 holds layers 2, 3 as 0, 1 plus the final norm and output layer.
    s = shard_state_dict(full, cfg, 1, 2, 1, 2)
    assert "embedding.word_embeddings.weight" not in s and "output_layer.weight" in s
    assert torch.equal(s["decoder.layers.0.input_layernorm.weight"], full["decoder.layers.2.input_layernorm.weight"])
    # qkv: rank 1 holds query group 1 = rows [group_rows, 2 * group_rows) of the interleaved layout.
    group_rows = (cfg.num_attention_heads // cfg.num_query_groups + 2) * cfg.kv_channels
    qkv = full["decoder.layers.3.self_attention.linear_qkv.weight"]
    assert torch.equal(s["decoder.layers.1.self_attention.linear_qkv.weight"], qkv[group_rows:2 * group_rows])
    # SwiGLU fc1 = [gate; up]: rank 1 holds [gate_1; up_1].
    fc1, f = full["decoder.layers.3.mlp.linear_fc1.weight"], cfg.ffn_hidden_size
    expect = torch.cat([fc1[f // 2:f], fc1[f + f // 2:]])
    assert torch.equal(s["decoder.layers.1.mlp.linear_fc1.weight"], expect)
    # Row parallel: dim 1.
    fc2 = full["decoder.layers.3.mlp.linear_fc2.weight"]
    assert torch.equal(s["decoder.layers.1.mlp.linear_fc2.weight"], fc2[:, f // 2:])

    # Vocabulary padding: TP=4 pads 256 -> 512 rows (zeros), gather can unpad to the real vocab.
    cfg4 = _tiny_cfg(num_layers=4, num_query_groups=4)
    full4 = _random_full_state(cfg4)
    shards = [[shard_state_dict(full4, cfg4, t, 4, 0, 1) for t in range(4)]]
    assert shards[0][3]["output_layer.weight"].shape[0] == 128 and not shards[0][3]["output_layer.weight"].any()
    back = gather_state_dict(shards, cfg4, vocab_rows=cfg4.vocab_size)
    assert torch.equal(back["output_layer.weight"], full4["output_layer.weight"][:200])

    # Tied embeddings: single stage has no output layer; the last of two stages holds a copy.
    tied = _tiny_cfg(num_layers=4, share_embeddings_and_output_weights=True)
    full_tied = {k: v for k, v in full.items() if k != "output_layer.weight"}
    assert "output_layer.weight" not in shard_state_dict(full_tied, tied, 0, 1, 0, 1)
    last = shard_state_dict(full_tied, tied, 0, 2, 1, 2)
    assert torch.equal(last["output_layer.weight"], full["embedding.word_embeddings.weight"][:128])
    back = gather_state_dict([[shard_state_dict(full_tied, tied, t, 2, p, 2) for t in range(2)] for p in range(2)], tied)
    assert back.keys() == full_tied.keys()


def _tied_pp2_body(rank, world):
    from nemo_kd.models import build_gpt_model
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    initialize_parallel(ParallelConfig(pipeline_model_parallel_size=2, seed=9))
    try:
        model = build_gpt_model(_tiny_cfg(share_embeddings_and_output_weights=True))
        weight = model.shared_embedding_or_output_weight()
        return state.pp_rank(), weight.detach().numpy().copy()
    finally:
        destroy_parallel()


@pytest.mark.distributed
def test_tied_embeddings_synchronised_across_pipeline_stages():
    # Megatron zero-inits the last stage's copy and all-reduces it with the first stage's
    # embedding (through the CPU shim's Tensor.cuda patch on this machine).
    (r0, w0), (r1, w1) = run_distributed(_tied_pp2_body, 2)
    assert (r0, r1) == (0, 1)
    assert abs(w0).sum() > 0 and (w0 == w1).all()
