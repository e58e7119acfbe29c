"""Hugging Face <-> Megatron conversion of gpt-oss (``GptOssForCausalLM``), MXFP4 expert weights included.

A tiny random ``transformers`` gpt-oss (hidden 64, 2 layers: layer 0 a 4-token sliding window, layer 1 full
attention; 4 experts, top-2; YaRN with ``truncate=false``; every parameter randomised: q/k/v/o biases, the
sinks, the router's weight and bias, the experts' interleaved gate/up columns and biases) with
``swiglu_limit=1.5``, so the clamp of the SwiGLU changes the logits (checked: the same model without
the clamp differs by > 1).

Checked: logits parity with transformers fp32 (<= 1e-4 max abs) at TP=1, TP=2 (expert TP 1: Megatron's
biased experts cannot split over TP) and EP=2, an EP=2 checkpoint loading at EP=1, HF -> Megatron -> HF
bit-identical tensors and config fields; MXFP4: the library's dequantisation equals a bit-level decoding
written here from the OCP MX spec and transformers' own (``convert_moe_packed_tensors``), and a whole
checkpoint with MXFP4 experts (packed by the spec here) imports to the logits of the dequantised bf16
checkpoint, exactly, and loads at EP=2 (and TP=2, expert TP 1) with each rank's experts equal to
transformers' dequantisation and the EP=1 / transformers logits; the refusals name their field.
"""

import json
import math
import os

import pytest
import torch

from dist_utils import run_distributed
from hf_models import (check_loads_at_ep1, check_logits_match_hf_tp1, check_parallel_results,
                       check_round_trip_bit_identical, hf_logits, max_diff, megatron_logits,
                       parallel_conversion_worker, random_hf_model)

import safetensors  # noqa: E402,F401  (requirements.txt installs both: missing, the module fails, never skips)
import transformers  # noqa: E402,F401

SEQ, BATCH = 12, 2
VOCAB = 320
ATOL = 1e-4
LIMIT = 1.5


def _hf_config(**overrides):
    from transformers import GptOssConfig

    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB,
                  max_position_embeddings=64, sliding_window=4, swiglu_limit=LIMIT,
                  layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                   "truncate": False, "original_max_position_embeddings": 16, "rope_theta": 150000.0})
    fields.update(overrides)
    return GptOssConfig(**fields)


def _random_model(seed=0, **overrides):
    return random_hf_model(_hf_config(**overrides), seed)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from nemo_kd.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("convert_gpt_oss")
    model = _random_model()
    hf_dir = str(root / "hf")
    model.save_pretrained(hf_dir)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    logits = hf_logits(model, tokens)
    for layer in model.model.layers:  # the clamp must matter, or parity would not test it
        layer.mlp.experts.limit = 1e9
    assert (hf_logits(model, tokens) - logits).abs().max().item() > 1.0
    megatron_dir = str(root / "megatron")
    convert_hf_to_megatron(hf_dir, megatron_dir, progress=False)
    return dict(root=root, hf_dir=hf_dir, megatron_dir=megatron_dir, tokens=tokens, logits=logits.numpy(),
                vocab_size=VOCAB)


def _max_diff(logits, ref):
    return max_diff(logits, ref, VOCAB)


def test_architecture_mapping(case):
    from nemo_kd.convert import hf_config_to_architecture, read_hf_config

    arch = hf_config_to_architecture(read_hf_config(case["hf_dir"]))
    m = arch.model
    assert arch.family == "gpt_oss" and arch.swiglu_limit == LIMIT
    assert (m.num_moe_experts, m.moe_router_topk, m.moe_ffn_hidden_size, m.kv_channels) == (4, 2, 64, 16)
    assert m.moe_layer_pattern() == [1, 1] and not m.moe_router_pre_softmax
    assert m.add_bias_linear and m.add_qkv_bias and m.softmax_type == "learnable" and not m.qk_layernorm
    assert m.window_size == [3, 0] and m.window_attn_skip_freq == [1, 0]
    assert m.position_embedding_type == "yarn" and m.rotary_base == 150000
    assert (m.yarn_rotary_scaling_factor, m.yarn_original_max_position_embeddings) == (4.0, 16)
    assert m.yarn_correction_range_round_to_int is False
    overrides = arch.transformer_config_overrides()
    assert (overrides["glu_linear_offset"], overrides["activation_func_clamp_value"]) == (1.0, LIMIT)
    x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    assert torch.equal(overrides["activation_func"](x), x * torch.sigmoid(1.702 * x))


def test_logits_match_hf_tp1(case):
    check_logits_match_hf_tp1(case, ATOL)


def test_round_trip_bit_identical(case, tmp_path):
    check_round_trip_bit_identical(case, str(tmp_path / "hf_out"), (
        "num_local_experts", "num_experts_per_tok", "intermediate_size", "layer_types", "sliding_window",
        "swiglu_limit", "swiglu_alpha", "attention_bias", "head_dim", "rope_parameters", "architectures",
        "model_type"))


# ---------------------------------------------------------------- MXFP4
# The OCP MX v1.0 definition, written out here independently of nemo_kd.convert.mxfp4: an E2M1 code is
# sign (bit 3), exponent (bits 2..1, bias 1; 0 = subnormal), mantissa (bit 0); a group of 32 shares an
# E8M0 scale 2^(s - 127); two codes per byte, the even element in the low nibble.
def _e2m1_decode(code: int) -> float:
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 1
    magnitude = mantissa * 0.5 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return sign * magnitude


_E2M1_MAGNITUDES = sorted({abs(_e2m1_decode(c)) for c in range(8)})


def _quantise_mxfp4(w: torch.Tensor):
    """``w [*prefix, rows, cols]`` -> (blocks uint8 [*prefix, rows, cols/32, 16], scales uint8 [..., cols/32]):
    per group the scale 2^e with e = ceil(log2(amax / 6)) (so every |x| / 2^e <= 6), each element rounded to
    the nearest E2M1 magnitude (ties to the smaller), sign kept."""
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32).to(torch.float64)
    amax = groups.abs().amax(-1)
    exponent = torch.ceil(torch.log2(torch.clamp(amax, min=2.0 ** -120) / 6.0)).to(torch.int64)
    scaled = groups / torch.pow(2.0, exponent).unsqueeze(-1)
    magnitudes = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float64)
    index = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(-1)  # argmin takes the first (smaller) tie
    codes = index | torch.where(scaled < 0, 0b1000, 0)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exponent + 127).to(torch.uint8)


def _dequantise_by_spec(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Element by element from the bits (float64), no table shared with the library."""
    flat_blocks, flat_scales = blocks.reshape(-1, 16).tolist(), scales.reshape(-1).tolist()
    out = []
    for row, s in zip(flat_blocks, flat_scales):
        for byte in row:
            out += [_e2m1_decode(byte & 0xF) * 2.0 ** (s - 127), _e2m1_decode(byte >> 4) * 2.0 ** (s - 127)]
    return torch.tensor(out, dtype=torch.float64).reshape(*scales.shape[:-1], scales.shape[-1] * 32)


def test_mxfp4_dequantisation_matches_spec_and_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from nemo_kd.convert.mxfp4 import dequantize_mxfp4

    g = torch.Generator().manual_seed(3)
    # [experts, rows, cols], groups with very different magnitudes (scales from 2^-10 to 2^6)
    w = torch.randn(3, 8, 96, generator=g) * torch.pow(2.0, torch.randint(-8, 8, (3, 8, 1), generator=g).float())
    blocks, scales = _quantise_mxfp4(w)
    assert blocks.shape == (3, 8, 3, 16) and scales.shape == (3, 8, 3)
    reference = _dequantise_by_spec(blocks, scales)
    ours = dequantize_mxfp4(blocks, scales, torch.float64)
    assert torch.equal(ours, reference)
    # a real quantiser: every element within half the widest E2M1 gap (2 -> 1 scale unit) of the input
    error = (ours - w.double()).reshape(3, 8, 3, 32).abs()
    assert (error <= torch.pow(2.0, scales.double() - 127).unsqueeze(-1)).all()
    assert len(set(blocks.flatten().tolist())) > 100  # every code appears in both nibbles
    for dtype in (torch.float32, torch.bfloat16):  # transformers dequantises [E, rows, cols] and transposes
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)
        assert torch.equal(dequantize_mxfp4(blocks, scales, dtype), theirs), dtype
    with pytest.raises(ValueError, match="E8M0 NaN"):
        dequantize_mxfp4(blocks, torch.full_like(scales, 255), name="experts.down_proj")
    with pytest.raises(ValueError, match=r"experts.down_proj_blocks \(3, 8, 3, 8\) must be"):
        dequantize_mxfp4(blocks[..., :8], scales, name="experts.down_proj")


def _save_mxfp4_checkpoint(model, out_dir):
    """``model``'s checkpoint with every layer's expert weights as MXFP4 blocks/scales (the rest bf16), and
    the model with those weights replaced by their dequantised values (the bf16 twin)."""
    from safetensors.torch import save_file

    tensors = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = _quantise_mxfp4(p.transpose(1, 2))  # stored output-rows-first
                tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
                p.copy_(_dequantise_by_spec(blocks, scales).transpose(1, 2).to(p.dtype))
            else:
                tensors[name] = p.detach().to(torch.bfloat16).contiguous()
            p.copy_(p.to(torch.bfloat16).to(p.dtype))  # the bf16 twin holds bf16 values everywhere
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = {**model.config.to_dict(), "architectures": ["GptOssForCausalLM"]}
    config.update(dtype="bfloat16", quantization_config={"quant_method": "mxfp4",
                                                         "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                    "model.layers.*.mlp.router",
                                                                                    "model.embed_tokens", "lm_head"]})
    config.pop("torch_dtype", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def mxfp4(case, tmp_path_factory):
    """A gpt-oss checkpoint with MXFP4 experts (packed by the spec here), its dequantised bf16 twin, transformers'
    fp32 logits of the twin and the MXFP4 checkpoint's logits loaded at EP=1 (fp32)."""
    from nemo_kd.convert import build_and_load, ensure_parallel

    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    model = _random_model(seed=4)
    mxfp4_dir, bf16_dir = str(root / "mxfp4"), str(root / "bf16")
    _save_mxfp4_checkpoint(model, mxfp4_dir)
    ref = hf_logits(model, case["tokens"])  # fp32 (before the cast below rounds the RoPE buffers too)
    model.to(torch.bfloat16).save_pretrained(bf16_dir)
    with ensure_parallel():
        ep1 = megatron_logits(build_and_load(mxfp4_dir, params_dtype="fp32").model_chunks, case["tokens"])
    return dict(root=root, hf_dir=mxfp4_dir, bf16_dir=bf16_dir, tokens=case["tokens"], logits=ref.numpy(),
                vocab_size=VOCAB, hf_options={"params_dtype": "fp32"}, ep1_logits=ep1)


def test_mxfp4_checkpoint_loads_like_its_dequantised_twin(mxfp4, tmp_path):
    from nemo_kd.convert import (SafetensorsReader, build_and_load, convert_hf_to_megatron, convert_megatron_to_hf,
                                 ensure_parallel, read_hf_config)

    mxfp4_dir, bf16_dir = mxfp4["hf_dir"], mxfp4["bf16_dir"]
    assert "model.layers.0.mlp.experts.gate_up_proj" not in SafetensorsReader(mxfp4_dir)
    with ensure_parallel():
        from_bf16 = megatron_logits(build_and_load(bf16_dir, params_dtype="fp32").model_chunks, mxfp4["tokens"])
    assert torch.equal(mxfp4["ep1_logits"], from_bf16)
    assert _max_diff(mxfp4["ep1_logits"], mxfp4["logits"]) <= ATOL
    # export writes the dequantised experts dense in the checkpoint's dtype (bf16), no quantization_config
    megatron_dir, out_dir = str(tmp_path / "megatron"), str(tmp_path / "hf_out")
    convert_hf_to_megatron(mxfp4_dir, megatron_dir, progress=False)
    convert_megatron_to_hf(megatron_dir, out_dir, progress=False)
    exported, twin = SafetensorsReader(out_dir), SafetensorsReader(bf16_dir)
    assert sorted(exported.keys()) == sorted(twin.keys())
    for key in twin.keys():
        assert exported.get(key).dtype == torch.bfloat16 and torch.equal(exported.get(key), twin.get(key)), key
    assert "quantization_config" not in read_hf_config(out_dir)


def test_mxfp4_corrupt_scales_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from nemo_kd.convert import CorruptCheckpointError, build_and_load, ensure_parallel

    model = _random_model(seed=5)
    _save_mxfp4_checkpoint(model, str(tmp_path))
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.experts.down_proj_scales"][2, 0, 0] = 255
    save_file(tensors, path, metadata={"format": "pt"})
    with ensure_parallel(), pytest.raises(CorruptCheckpointError,
                                          match=r"expert 2: MXFP4 model.layers.1.mlp.experts.down_proj: .* 255"):
        build_and_load(str(tmp_path))


# ---------------------------------------------------------------- TP=2 (expert TP 1), EP=2 over gloo
LAYOUTS = {"tp2": dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1),
           "ep2": dict(expert_model_parallel_size=2)}


@pytest.fixture(scope="module")
def parallel_loads(case, mxfp4):
    """One 2-process run: the bf16 checkpoint (and its TP=1 conversion) and the MXFP4 one loaded at TP=2 with
    expert TP 1 and at EP=2; each rank returns its logits and expert tensors, the EP=2 loads are saved."""
    cases = {"bf16": {k: case[k] for k in ("hf_dir", "megatron_dir", "tokens", "logits", "vocab_size")},
             "mxfp4": {k: mxfp4[k] for k in ("hf_dir", "tokens", "logits", "vocab_size", "hf_options")}}
    save_root = str(case["root"] / "saved_at_ep2")
    return dict(ranks=run_distributed(parallel_conversion_worker, 2, cases, LAYOUTS, save_root, ("bf16", "mxfp4")),
                save_root=save_root)


@pytest.mark.distributed
def test_logits_match_hf_tp2_and_ep2(case, mxfp4, parallel_loads):
    """TP=2 with expert TP 1 (Megatron's biased experts cannot split over TP: every TP rank holds the 4 experts
    whole) and EP=2 (2 experts a rank) load to transformers' logits, from HF and from the TP=1 conversion, the
    MXFP4 checkpoint too; the EP=2 loads, saved, load at EP=1."""
    check_parallel_results(parallel_loads["ranks"], ATOL)
    for results in parallel_loads["ranks"]:
        assert sorted(results) == sorted((layout, name) for layout in LAYOUTS for name in ("bf16", "mxfp4"))
        for (layout, name), r in results.items():
            assert r["experts"] == ({0, 1} if layout == "ep2" else {0, 1, 2, 3}), (layout, name)
        fc1 = results[("tp2", "bf16")]["tensors"]["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"]
        assert tuple(fc1.shape) == (128, 64)  # expert TP 1: the whole [2 * ffn, hidden]
    check_loads_at_ep1(os.path.join(parallel_loads["save_root"], "bf16"), case, ATOL)
    check_loads_at_ep1(os.path.join(parallel_loads["save_root"], "mxfp4"), mxfp4, ATOL)


@pytest.mark.distributed
def test_mxfp4_experts_at_ep2_equal_transformers_dequantisation(mxfp4, parallel_loads):
    """The MXFP4 checkpoint at EP=2: each rank holds its 2 experts (global ``2 * rank + j`` as local ``j``)
    dequantised exactly as transformers dequantises the checkpoint's blocks/scales (``convert_moe_packed_tensors``,
    fp32, then gpt-oss's interleaved gate/up columns split into Megatron's [gate; up] rows, written out here),
    biases included; at expert TP 1 under TP=2 each rank holds all 4 the same. Its logits equal the EP=1 load's
    (fp32 rounding: the experts' outputs are summed in another order) and transformers' (1e-4)."""
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    source = load_file(os.path.join(mxfp4["hf_dir"], "model.safetensors"))
    want = {}  # global expert -> Megatron local-expert tensor suffix -> tensor, per layer
    for layer in range(2):
        hf = f"model.layers.{layer}.mlp.experts."
        gate_up = convert_moe_packed_tensors(source[hf + "gate_up_proj_blocks"], source[hf + "gate_up_proj_scales"],
                                             dtype=torch.float32)  # [E, hidden, 2 * ffn], gate/up interleaved
        down = convert_moe_packed_tensors(source[hf + "down_proj_blocks"], source[hf + "down_proj_scales"],
                                          dtype=torch.float32)  # [E, ffn, hidden]
        gate_up_bias, down_bias = source[hf + "gate_up_proj_bias"].float(), source[hf + "down_proj_bias"].float()
        for e in range(4):
            want[(layer, e)] = {
                "linear_fc1.weight": torch.cat([gate_up[e][:, 0::2].t(), gate_up[e][:, 1::2].t()]),
                "linear_fc1.bias": torch.cat([gate_up_bias[e][0::2], gate_up_bias[e][1::2]]),
                "linear_fc2.weight": down[e].t(), "linear_fc2.bias": down_bias[e]}
    for rank, results in enumerate(parallel_loads["ranks"]):
        for layout, experts_per_rank in (("ep2", 2), ("tp2", 4)):
            tensors = results[(layout, "mxfp4")]["tensors"]
            first = rank * experts_per_rank if layout == "ep2" else 0
            assert len(tensors) == 2 * experts_per_rank * 4, sorted(tensors)
            for key, got in tensors.items():
                prefix, rest = key.split(".mlp.experts.local_experts.")
                local, suffix = rest.split(".", 1)
                expected = want[(int(prefix.split(".")[-1]), first + int(local))][suffix]
                assert got.dtype == torch.float32 and torch.equal(got, expected), (layout, rank, key)
        ep2 = results[("ep2", "mxfp4")]["logits"]
        torch.testing.assert_close(ep2[..., :VOCAB], mxfp4["ep1_logits"][..., :VOCAB], atol=1e-5, rtol=1e-5)
        assert _max_diff(ep2, mxfp4["logits"]) <= ATOL


# ---------------------------------------------------------------- refusals
def test_refusals_name_the_field(case):
    from nemo_kd.convert import (UnsupportedHFConfigError, architecture_to_hf_config, hf_config_to_architecture,
                                 read_hf_config)

    hf = read_hf_config(case["hf_dir"])
    for field, value, message in (
            ("swiglu_alpha", 1.5, "quick_gelu has the sigmoid gain 1.702"),
            ("attention_bias", False, "router and experts always have biases"),
            ("quantization_config", {"quant_method": "fp8"}, "only MXFP4"),
            ("layer_types", ["sliding_attention"], "one 'full_attention' / 'sliding_attention' per layer")):
        with pytest.raises(UnsupportedHFConfigError, match=message):
            hf_config_to_architecture({**hf, field: value})
    with pytest.raises(UnsupportedHFConfigError, match="'sliding_window'"):
        hf_config_to_architecture(hf, sliding_window="error")
    truncated = hf_config_to_architecture(hf, sliding_window="truncate").model
    assert truncated.window_size is None and truncated.max_position_embeddings == 4
    arch = hf_config_to_architecture(hf)
    arch.family = "mixtral"
    with pytest.raises(ValueError, match="cannot export as mixtral: HFArchitecture.swiglu_limit=1.5"):
        architecture_to_hf_config(arch)
    arch.family, arch.swiglu_limit = "gpt_oss", None
    with pytest.raises(ValueError, match="cannot export as gpt_oss: its experts' SwiGLU is clamped"):
        architecture_to_hf_config(arch)
    arch.swiglu_limit = LIMIT
    arch.model.softmax_type = "vanilla"
    with pytest.raises(ValueError, match="GPTModelConfig.softmax_type is 'vanilla'"):
        architecture_to_hf_config(arch)
    arch.model.softmax_type = "learnable"
    written = architecture_to_hf_config(arch)
    assert written["layer_types"] == ["sliding_attention", "full_attention"] and written["sliding_window"] == 4
    assert math.isclose(written["swiglu_limit"], LIMIT) and json.loads(json.dumps(written)) == written


# ---------------------------------------------------------------- a gpt-oss student's .nemo at TP = 2 (expert TP 1)
@pytest.mark.distributed
def test_gpt_oss_nemo_restores_and_saves_at_tp2_with_expert_tp1(case, tmp_path):
    """A gpt-oss-initialised student's .nemo restores at TP=2 with expert TP 1 (each rank takes its attention /
    embedding shards and every expert whole) to transformers' logits, and save_to there writes the full model
    once: the re-saved .nemo restores at TP=1 to the TP=1 logits exactly (before, restore cut the experts by TP
    and save_to concatenated the TP ranks' whole copies)."""
    from dist_utils import WorldOfOne
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from test_convert_moe import _student_world, restore_and_save
    from test_distillation_model import _cfg

    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe

    tok_dir = str(tmp_path / "tok")
    tok = train_byte_level_bpe([f"what is {i} plus {i * 3}? {4 * i} because adding numbers" for i in range(64)],
                               vocab_size=300, save_dir=tok_dir)
    w = _student_world({"tok_dir": tok_dir, "tok": tok}, tmp_path)
    over = {"student_init": case["hf_dir"], "teacher.mode": "none", "kd.kd_loss_weight": 0.0,
            "data.train_ds.logits_store": None, "data.validation_ds": None}
    path, resaved = str(tmp_path / "tp1.nemo"), str(tmp_path / "tp2.nemo")
    with WorldOfOne(seed=5):
        model = GPTDistillationModel(_cfg(w, **over))
        want = megatron_logits([model.student], case["tokens"])
        assert _max_diff(want, case["logits"]) <= ATOL
        model.save_to(path)
    layout = dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1)
    for logits, experts in run_distributed(restore_and_save, 2, layout, path, resaved, case["tokens"]):
        # whole experts on each TP rank, all 4 of them
        assert experts["decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"] == (128, 64)
        assert _max_diff(logits, case["logits"]) <= ATOL
        torch.testing.assert_close(logits[..., :VOCAB], want[..., :VOCAB], atol=1e-5, rtol=1e-5)
    with WorldOfOne(seed=5):
        again = GPTDistillationModel.restore_from(resaved, map_location=torch.device("cpu"))
        assert torch.equal(megatron_logits([again.student], case["tokens"])[..., :VOCAB], want[..., :VOCAB])
