"""Hugging Face <-> Megatron conversion: logits parity per family at TP=1/TP=2/PP=2, bit-exact round trip, errors.

Every family gets a tiny random ``transformers`` model built from a config (no download),
with *all* parameters randomised (HF initialises biases to zero and norms to one, which
would hide a mis-mapped bias or norm). Vocabularies (100-300) are not multiples of
Megatron's 128, so padding is exercised; vocab 300 pads to 384 at TP=1 but 512 at TP=2,
which also exercises re-padding when a checkpoint saved at one TP loads at another.
"""

import json
import os
import warnings

import pytest
import torch

from dist_utils import run_distributed

import safetensors  # noqa: E402,F401  (requirements.txt installs both: missing, the module fails, never skips)
import transformers  # noqa: E402,F401

SEQ, BATCH = 12, 2
ATOL = 1e-4


def _hf_configs():
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    return {
        # GQA, untied, Llama-3 RoPE scaling with a short original context so it changes frequencies.
        "llama": LlamaConfig(**common, vocab_size=200, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        # tied embeddings, vocab 300 (TP-dependent padding), no sliding window.
        "mistral": MistralConfig(**common, vocab_size=300, sliding_window=None, tie_word_embeddings=True),
        "qwen2": Qwen2Config(**common, vocab_size=150),  # q/k/v biases
        "qwen3": Qwen3Config(**common, vocab_size=250, head_dim=16),  # qk-norm, head_dim != hidden / heads
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                           attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0),
    }


FAMILIES = list(_hf_configs())


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or ".ln_" in name or name.startswith("ln_") or "ln_f" in name
            p.copy_((1.0 if is_norm and name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))


def _tiny_tokenizer(vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["<unk>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="w1")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return fast


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Per family: HF dir, reference tokens/logits, and the TP=1 Megatron conversion."""
    from transformers import AutoModelForCausalLM

    from nemo_kd.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("convert")
    out = {}
    for seed, (family, config) in enumerate(_hf_configs().items()):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config).eval()
        _randomise(model, seed)
        hf_dir = str(root / f"{family}_hf")
        # llama: a sharded HF checkpoint (index json) to exercise the reader.
        model.save_pretrained(hf_dir, max_shard_size="20KB" if family == "llama" else "5GB")
        _tiny_tokenizer(config.vocab_size).save_pretrained(hf_dir)
        tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logits = model(tokens).logits
        megatron_dir = str(root / f"{family}_megatron")
        convert_hf_to_megatron(hf_dir, megatron_dir, progress=False)
        out[family] = dict(hf_dir=hf_dir, megatron_dir=megatron_dir, tokens=tokens, logits=logits.numpy(),
                           vocab_size=config.vocab_size)
    return out


def _megatron_logits(model_chunks, tokens):
    """Full-vocabulary logits [b, s, padded V] of a single-stage model at the current TP."""
    import torch.distributed as dist

    from nemo_kd.parallel import state

    [model] = model_chunks
    model.eval()
    position_ids = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    with torch.no_grad():
        local = model(tokens, position_ids, None)  # [b, s, V / TP]
    if state.tp_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(state.tp_size())]
    dist.all_gather(parts, local.contiguous(), group=state.tp_group())
    return torch.cat(parts, dim=-1)


def _max_diff(megatron_logits, ref, vocab_size):
    assert megatron_logits.shape[-1] >= vocab_size
    return (megatron_logits[..., :vocab_size] - torch.as_tensor(ref)).abs().max().item()


# ---------------------------------------------------------------- TP=1, in process
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_tp1(zoo, family):
    from nemo_kd.convert import build_and_load, ensure_parallel

    case = zoo[family]
    with ensure_parallel():
        direct = _megatron_logits(build_and_load(case["hf_dir"]).model_chunks, case["tokens"])
        via_checkpoint = _megatron_logits(build_and_load(case["megatron_dir"]).model_chunks, case["tokens"])
    assert _max_diff(direct, case["logits"], case["vocab_size"]) <= ATOL
    assert torch.equal(direct, via_checkpoint)
    # Padding rows are zero: the padded logits columns carry nothing.
    assert direct[..., case["vocab_size"]:].abs().max().item() == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_bit_identical_and_loadable(zoo, tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_kd.convert import SafetensorsReader, convert_megatron_to_hf

    case = zoo[family]
    out_dir = str(tmp_path / "hf_out")
    # A small shard limit on llama: the export writes several shards + index like save_pretrained.
    files = convert_megatron_to_hf(case["megatron_dir"], out_dir, progress=False,
                                   max_shard_bytes=20_000 if family == "llama" else 5 * 1024**3)
    assert (len(files) > 1) == (family == "llama")
    assert os.path.isfile(os.path.join(out_dir, "model.safetensors.index.json")) == (family == "llama")
    original, exported = SafetensorsReader(case["hf_dir"]), SafetensorsReader(out_dir)
    assert sorted(exported.keys()) == sorted(original.keys())
    for key in original.keys():
        a, b = original.get(key), exported.get(key)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out_dir, name)), name
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w3"}], tokenize=False) == "user: w3\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        logits = reloaded(case["tokens"]).logits
    assert torch.equal(logits, torch.as_tensor(case["logits"]))


# ---------------------------------------------------------------- TP=2 / PP=2 over gloo
def _tp2_worker(rank, world, cases, save_root):
    from nemo_kd.convert import build_and_load, save_megatron_checkpoint
    from nemo_kd.parallel import ParallelConfig, destroy_parallel

    diffs = {}
    try:
        for family, case in cases.items():
            loaded = build_and_load(case["hf_dir"], ParallelConfig(tensor_model_parallel_size=2))
            direct = _megatron_logits(loaded.model_chunks, case["tokens"])
            # saved at TP=1 (vocab 300 padded to 384), loaded at TP=2 (padded to 512)
            from_ckpt = _megatron_logits(build_and_load(case["megatron_dir"]).model_chunks, case["tokens"])
            if family in ("mistral", "qwen3"):  # and the other way: saved here at TP=2, loaded at TP=1 by the test
                save_megatron_checkpoint(loaded.model_chunks, loaded.arch, os.path.join(save_root, family))
            diffs[family] = (_max_diff(direct, case["logits"], case["vocab_size"]),
                             _max_diff(from_ckpt, case["logits"], case["vocab_size"]))
    finally:
        destroy_parallel()
    return diffs


def _cases(zoo, families):
    return {f: {k: zoo[f][k] for k in ("hf_dir", "megatron_dir", "tokens", "logits", "vocab_size")} for f in families}


@pytest.mark.distributed
def test_logits_match_hf_tp2(zoo, tmp_path):
    from nemo_kd.convert import build_and_load, ensure_parallel

    results = run_distributed(_tp2_worker, 2, _cases(zoo, FAMILIES), str(tmp_path))
    for family in FAMILIES:
        for rank_diffs in results:
            direct, from_ckpt = rank_diffs[family]
            assert direct <= ATOL and from_ckpt <= ATOL, (family, direct, from_ckpt)
    for family in ("mistral", "qwen3"):
        with ensure_parallel():
            logits = _megatron_logits(build_and_load(str(tmp_path / family)).model_chunks, zoo[family]["tokens"])
        assert _max_diff(logits, zoo[family]["logits"], zoo[family]["vocab_size"]) <= ATOL, family


def _pp2_worker(rank, world, case):
    import torch.distributed as dist

    from nemo_kd.convert import build_and_load
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, state

    out = {}
    try:
        for source in ("hf_dir", "megatron_dir"):
            parallel = ParallelConfig(pipeline_model_parallel_size=2)
            [model] = build_and_load(case[source], parallel).model_chunks
            model.eval()
            tokens = case["tokens"]
            position_ids = torch.arange(tokens.shape[1])[None].expand_as(tokens)
            with torch.no_grad():
                if state.is_pipeline_first_stage():
                    hidden = model(tokens, position_ids, None)  # [s, b, h] to the next stage
                    dist.send(hidden.contiguous(), dst=1)
                else:
                    hidden = torch.empty(tokens.shape[1], tokens.shape[0], 32)
                    dist.recv(hidden, src=0)
                    model.set_input_tensor(hidden)
                    logits = model(tokens, position_ids, None)
                    out[source] = _max_diff(logits, case["logits"], case["vocab_size"])
    finally:
        destroy_parallel()
    return out


@pytest.mark.distributed
def test_logits_match_hf_pp2(zoo):
    results = run_distributed(_pp2_worker, 2, _cases(zoo, ["llama"])["llama"])
    assert results[0] == {}
    assert set(results[1]) == {"hf_dir", "megatron_dir"}
    assert max(results[1].values()) <= ATOL, results[1]


# ---------------------------------------------------------------- config mapping and errors
def _write_config(path, config):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def _llama_config_dict(**changes):
    d = _hf_configs()["llama"].to_dict()
    d.update(architectures=["LlamaForCausalLM"], **changes)
    return d


def test_unsupported_architecture_names_field(tmp_path):
    from nemo_kd.convert import UnsupportedHFConfigError, convert_hf_to_megatron

    hf_dir = _write_config(tmp_path / "falcon", {"architectures": ["FalconForCausalLM"], "model_type": "falcon"})
    with pytest.raises(UnsupportedHFConfigError, match="'architectures'.*FalconForCausalLM.*supported"):
        convert_hf_to_megatron(hf_dir, str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("changes, field", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
     "rope_parameters.original_max_position_embeddings"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "attention_factor": 2.0,
                           "original_max_position_embeddings": 16}), "rope_parameters.attention_factor"),
    (dict(rope_parameters={"rope_type": "longrope", "factor": 4.0, "rope_theta": 10000.0}), "rope_parameters.rope_type"),
    (dict(rope_parameters=None, rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling.rope_type"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_inexpressible_config_names_field(changes, field):
    from nemo_kd.convert import UnsupportedHFConfigError, hf_config_to_architecture

    with pytest.raises(UnsupportedHFConfigError, match=f"'{field}'"):
        hf_config_to_architecture(_llama_config_dict(**changes))


def test_sliding_window_error_or_exact_truncation():
    from nemo_kd.convert import UnsupportedHFConfigError, hf_config_to_architecture

    mistral = _hf_configs()["mistral"].to_dict()
    mistral.update(architectures=["MistralForCausalLM"], sliding_window=16)
    with pytest.raises(UnsupportedHFConfigError, match="'sliding_window'.*truncate"):
        hf_config_to_architecture(mistral, sliding_window="error")
    assert hf_config_to_architecture(mistral, sliding_window="truncate").model.max_position_embeddings == 16
    # default: the window itself (logits parity in tests/test_attention_features.py)
    assert hf_config_to_architecture(mistral).model.window_size == [15, 0]
    mistral["sliding_window"] = 64  # covers max_position_embeddings: full attention, accepted
    assert hf_config_to_architecture(mistral).model.max_position_embeddings == 64


def test_family_mapping_and_config_export():
    from nemo_kd.convert import HFArchitecture, architecture_to_hf_config, hf_config_to_architecture

    archs = {f: hf_config_to_architecture({**json.loads(c.to_json_string()), "architectures": [_ARCH[f]]})
             for f, c in _hf_configs().items()}
    assert archs["qwen2"].model.add_qkv_bias and not archs["qwen2"].model.add_bias_linear
    assert archs["qwen3"].model.qk_layernorm and archs["qwen3"].model.kv_channels == 16
    assert archs["mistral"].model.share_embeddings_and_output_weights
    assert archs["llama"].rope_scaling.rope_type == "llama3" and archs["llama"].model.rotary_base == 500000
    gpt2 = archs["gpt2"]
    assert gpt2.gelu_approximation == "tanh" and gpt2.model.position_embedding_type == "learned_absolute"
    for family, arch in archs.items():
        again = HFArchitecture.from_dict(json.loads(json.dumps(arch.to_dict())))
        assert again == arch, family
        exported = architecture_to_hf_config(arch)
        assert hf_config_to_architecture(exported).model == arch.model, family
        # without the original HF config a complete one is generated
        fresh = HFArchitecture(family=family, model=arch.model, rope_scaling=arch.rope_scaling,
                               gelu_approximation=arch.gelu_approximation)
        assert hf_config_to_architecture(architecture_to_hf_config(fresh)).model == arch.model, family


_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def test_corrupt_and_inconsistent_checkpoints(zoo, tmp_path):
    import shutil

    from nemo_kd.convert import CorruptCheckpointError, SafetensorsReader, build_and_load, ensure_parallel

    src = zoo["qwen2"]["hf_dir"]
    # truncated weights file
    bad = tmp_path / "truncated"
    shutil.copytree(src, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        SafetensorsReader(str(bad))
    # garbage header
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptCheckpointError, match="corrupt safetensors"):
        SafetensorsReader(str(bad))
    # a shard listed in the index is missing
    sharded = tmp_path / "sharded"
    shutil.copytree(zoo["llama"]["hf_dir"], sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    os.remove(sharded / sorted(set(index["weight_map"].values()))[-1])
    with pytest.raises(FileNotFoundError, match="missing"):
        SafetensorsReader(str(sharded))
    # no weights at all
    empty = _write_config(tmp_path / "empty", json.load(open(os.path.join(src, "config.json"))))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        SafetensorsReader(empty)
    # config.json disagrees with the weights
    wrong = tmp_path / "wrong_shape"
    shutil.copytree(src, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["intermediate_size"] = 96
    (wrong / "config.json").write_text(json.dumps(config))
    with ensure_parallel(), pytest.raises(CorruptCheckpointError, match="gate_proj.*config.json implies"):
        build_and_load(str(wrong))


def test_command_line_round_trip_and_error(zoo, tmp_path, capsys):
    from nemo_kd.convert import SafetensorsReader
    from nemo_kd.convert.cli import hf_to_megatron_main, megatron_to_hf_main

    case = zoo["gpt2"]
    megatron_dir, out_dir = str(tmp_path / "mg"), str(tmp_path / "hf")
    assert hf_to_megatron_main(["--hf-dir", case["hf_dir"], "--out", megatron_dir, "--no-progress"]) == 0
    assert megatron_to_hf_main(["--megatron-dir", megatron_dir, "--out", out_dir, "--max-shard-size", "1GB",
                                "--no-progress"]) == 0
    a, b = SafetensorsReader(case["hf_dir"]), SafetensorsReader(out_dir)
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
    bad = _write_config(tmp_path / "bad", {"architectures": ["MambaForCausalLM"]})
    assert hf_to_megatron_main(["--hf-dir", bad, "--out", str(tmp_path / "x")]) == 2
    assert "'architectures'" in capsys.readouterr().err
