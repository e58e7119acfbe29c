"""Sampling from mixture-of-experts models (Mixtral, Qwen3-MoE, gpt-oss) through nemo_kd's sampler.

Tiny random ``transformers`` MoE models (4 experts, top-2, hidden 64, 2 layers; every parameter
randomised, routers included; gpt-oss with its sinks, clamped SwiGLU and a 4-token sliding window that
the prompts and decoded positions run past) are converted to Megatron and decoded with
:func:`nemo_kd.generation.sampling.generate` (Megatron's KV cache: prefill, then one position per
forward through the MoE layers and their token dispatcher).

Checked, fp32, prompts of 3, 7 and 12 tokens decoded together, 8 new tokens each:

* greedy decoding equals transformers' own greedy ``generate`` on the HF model token for token, with
  the top-1/top-2 logit margin at every step checked to be far above the Megatron/HF logit difference
  (<= 1e-4), so an agreement is not luck and a disagreement is not a near-tie;
* the per-token log-probs equal a float64 ``log_softmax`` of the HF logits of the produced sequence;
* the same greedy tokens at EP=2 (two gloo processes, 2 of the 4 experts per rank, tokens travel
  through Megatron's all-to-all dispatcher), and seeded temperature-1 sampling at EP=2 draws exactly
  the EP=1 tokens (log-probs within fp32 rounding: the expert outputs are summed in another order);
* seeded temperature-1 draws equal those from transformers' forward (:class:`HFCausalLM`, no cache)
  and from Megatron re-running the prefix;
* token dropping (``moe_expert_capacity_factor``) is active in eval and makes draws depend on the
  batch: the sampler warns, and extraction (a store must be reproducible) refuses such a teacher; the
  one check behind both (``nemo_kd.models.router_terms.check_token_dropping``) reads every form of a model.
"""

import dataclasses
import os
import warnings

import pytest
import torch

from dist_utils import run_distributed
from hf_models import random_hf_model

import safetensors  # noqa: E402,F401  (requirements.txt installs both: missing, the module fails, never skips)
import transformers  # noqa: E402,F401

PROMPT_LENGTHS = (3, 7, 12)
NEW_TOKENS = 8
# The lm_head is scaled so that greedy argmaxes are decided by margins far above the fp32 difference
# between Megatron's and transformers' logits (<= 1e-4, tests/test_convert_moe.py).
LM_HEAD_SCALE = 4.0
MIN_MARGIN = 1e-3  # 10x that difference


def _hf_configs():
    from transformers import GptOssConfig, MixtralConfig, Qwen3MoeConfig

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=2, tie_word_embeddings=False)
    return {
        "mixtral": MixtralConfig(**common, intermediate_size=48, num_local_experts=4, vocab_size=320,
                                 sliding_window=None),
        "qwen3_moe": Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=48, num_experts=4,
                                    vocab_size=300, head_dim=16, mlp_only_layers=[0], decoder_sparse_step=1,
                                    norm_topk_prob=False),
        # sinks, the clamped SwiGLU with biased experts, a 4-token sliding window on layer 0 (the prompts and
        # the decoded positions run past it, so the KV cache must apply the window) and YaRN
        "gpt_oss": GptOssConfig(**common, head_dim=16, intermediate_size=64, num_local_experts=4, vocab_size=320,
                                sliding_window=4, swiglu_limit=1.5, layer_types=["sliding_attention", "full_attention"],
                                rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                                 "truncate": False, "original_max_position_embeddings": 16,
                                                 "rope_theta": 150000.0}),
    }


FAMILIES = list(_hf_configs())




def _hf_greedy(model, prompt):
    """transformers' greedy ``generate`` (no end token: always NEW_TOKENS) and the per-step scores."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    scores = torch.stack([s[0] for s in out.scores])  # [NEW_TOKENS, V]
    return tokens, scores


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Per family: the HF dir, prompts, transformers' greedy tokens and the log-probs of those tokens."""
    root = tmp_path_factory.mktemp("moe_sampling")
    out = {}
    for seed, (family, config) in enumerate(_hf_configs().items()):
        model = random_hf_model(config, seed, LM_HEAD_SCALE)
        hf_dir = str(root / f"{family}_hf")
        model.save_pretrained(hf_dir)
        g = torch.Generator().manual_seed(100 + seed)
        prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
        greedy, margins, logprobs = [], [], []
        with torch.no_grad():
            for p in prompts:
                tokens, scores = _hf_greedy(model, p)
                top2 = scores.topk(2, dim=-1).values
                margins.append((top2[:, 0] - top2[:, 1]).min().item())
                # float64 reference log-probs of the produced tokens, from a full forward of the sequence
                z = model(torch.tensor([p + tokens])).logits[0, len(p) - 1:-1].double()
                logprobs.append(torch.log_softmax(z, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0])
                greedy.append(tokens)
        out[family] = dict(hf_dir=hf_dir, prompts=prompts, greedy=greedy, margins=margins, logprobs=logprobs,
                           vocab_size=config.vocab_size)
    return out


def _sample(hf_dir, prompts, vocab_size, temperature, seed=0, parallel=None):
    """nemo_kd's sampler on the converted model (Megatron KV cache), all prompts in one batch."""
    from nemo_kd.convert import build_and_load
    from nemo_kd.generation.sampling import SamplingConfig, generate

    [model] = build_and_load(hf_dir, parallel).model_chunks
    cfg = SamplingConfig(temperature=temperature, max_new_tokens=NEW_TOKENS, seed=seed)
    gens = generate(model, prompts, cfg, eos_id=None, pad_id=0, vocab_size=vocab_size, batch_size=len(prompts),
                    use_kv_cache=True)
    return [(g.token_ids, g.logprobs) for g in gens]


def _ep1(case, temperature, seed=0):
    from nemo_kd.convert import ensure_parallel

    with ensure_parallel():
        return _sample(case["hf_dir"], case["prompts"], case["vocab_size"], temperature, seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(zoo, family):
    case = zoo[family]
    assert min(case["margins"]) > MIN_MARGIN, case["margins"]  # no near-tied argmax anywhere
    results = _ep1(case, temperature=0.0)
    for p, (tokens, logprobs), ref, ref_lp in zip(case["prompts"], results, case["greedy"], case["logprobs"]):
        assert len(tokens) == NEW_TOKENS
        assert tokens == ref, (len(p), tokens, ref)
        torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64), ref_lp, atol=1e-4, rtol=0)
    # the test can fail: the greedy continuations are not all one repeated token
    assert len({t for ref in case["greedy"] for t in ref}) > 3


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_equals_transformers_forward(zoo, family):
    """Temperature-1 draws through Megatron's KV cache equal the same seeded draws from transformers'
    model re-run on the whole prefix every step (:class:`HFCausalLM`), and Megatron without its cache."""
    from nemo_kd.convert import build_and_load, ensure_parallel
    from nemo_kd.generation.sampling import HFCausalLM, SamplingConfig, generate

    case = zoo[family]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=3)
    kw = dict(eos_id=None, pad_id=0, vocab_size=case["vocab_size"], batch_size=len(case["prompts"]))
    hf = generate(HFCausalLM.from_pretrained(case["hf_dir"]), case["prompts"], cfg, **kw)
    with ensure_parallel():
        [model] = build_and_load(case["hf_dir"]).model_chunks
        cached = generate(model, case["prompts"], cfg, use_kv_cache=True, **kw)
        rerun = generate(model, case["prompts"], cfg, use_kv_cache=False, **kw)
    assert [g.token_ids for g in hf] != case["greedy"]  # sampling, not the greedy path again
    for ref, a, b in zip(hf, cached, rerun):
        assert a.token_ids == ref.token_ids == b.token_ids
        for g in (a, b):
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)


def test_token_dropping_warns(zoo):
    """Token dropping is active in eval (Megatron's router drops by capacity whatever the mode), so the
    draws depend on the batch: the sampler says so instead of silently breaking its contract."""
    from nemo_kd.convert import build_and_load, ensure_parallel
    from nemo_kd.generation.sampling import SamplingConfig, generate

    case = zoo["mixtral"]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=NEW_TOKENS)
    kw = dict(eos_id=None, pad_id=0, vocab_size=case["vocab_size"])
    with ensure_parallel():
        [model] = build_and_load(case["hf_dir"]).model_chunks
        with warnings.catch_warnings(record=True) as caught:  # dropless: no warning
            warnings.simplefilter("always")
            generate(model, case["prompts"][:1], cfg, **kw)
        assert not [w for w in caught if "token dropping" in str(w.message)]
        model.config.moe_expert_capacity_factor = 0.5
        try:
            with pytest.warns(UserWarning, match="moe_expert_capacity_factor=0.5.*batch_size"):
                together = generate(model, case["prompts"], cfg, batch_size=len(case["prompts"]), **kw)
            with pytest.warns(UserWarning):
                alone = generate(model, case["prompts"], cfg, batch_size=1, **kw)
        finally:
            model.config.moe_expert_capacity_factor = None
    # what the warning is about: the same prompts give other tokens when batched differently
    assert [g.token_ids for g in together] != [g.token_ids for g in alone]


def test_check_token_dropping_reads_every_form_of_the_model():
    """The one check (nemo_kd.models.router_terms) finds the capacity factor in a GPTModelConfig, in a Megatron
    model's config through its wrappers, and nowhere else: dropless, dense and non-Megatron models pass
    silently; token dropping warns, or raises with ``refuse``, naming the factor and the remedy."""
    from nemo_kd.models import GPTModelConfig
    from nemo_kd.models.router_terms import check_token_dropping, token_dropping_capacity

    dense = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64)
    dropless = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, num_moe_experts=4,
                              moe_router_topk=2, moe_ffn_hidden_size=16)
    dropping = dataclasses.replace(dropless, moe_expert_capacity_factor=1.25)

    class Wrapper(torch.nn.Module):  # Float16Module / DDP: the model under .module, no .config of its own
        def __init__(self, module):
            super().__init__()
            self.module = module

    class WithConfig(torch.nn.Module):  # a Megatron model: its TransformerConfig under .config
        def __init__(self, config):
            super().__init__()
            self.config = config

    assert token_dropping_capacity(dense) is None and token_dropping_capacity(dropless) is None
    assert token_dropping_capacity(dropping) == 1.25
    assert token_dropping_capacity(Wrapper(Wrapper(WithConfig(dropping)))) == 1.25
    assert token_dropping_capacity(WithConfig(transformers.MixtralConfig())) is None  # an HF model's config
    assert token_dropping_capacity(None) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_token_dropping(Wrapper(WithConfig(dropless)), "using it", "nothing", "nothing")
    with pytest.warns(UserWarning, match=r"^using it from an MoE with token dropping \(moe_expert_capacity_factor="
                                         r"1.25\): .* so rows differ; set the factor: null$"):
        check_token_dropping(dropping, "using it", "rows differ", "the factor: null")
    with pytest.raises(ValueError, match=r"moe_expert_capacity_factor=1.25.*set the factor: null"):
        check_token_dropping(dropping, "using it", "rows differ", "the factor: null", refuse=True)


def test_extraction_refuses_a_token_dropping_teacher(zoo, tmp_path):
    """compute_topk_logits from an MoE teacher that drops tokens stops before writing anything, naming the key
    and where to set it: a stored row's logits would depend on its batch-mates. Checked first that they do (the
    teacher's forward of a row alone and beside other rows differs under a capacity factor, not without)."""
    from nemo_kd.convert import ensure_parallel
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher
    from test_extract import _extract_cfg, _texts, _write_data

    case = zoo["mixtral"]
    tok = train_byte_level_bpe(_texts(), vocab_size=300, save_dir=str(tmp_path / "tok"))
    data, out = str(tmp_path / "data.jsonl"), str(tmp_path / "store")
    _write_data(data)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, case["vocab_size"], (4, 16), generator=g)
    with ensure_parallel():
        teacher = MegatronTeacher(case["hf_dir"])
        model = teacher.model

        def first_row(batch):
            with torch.no_grad():
                return model(batch, torch.arange(batch.shape[1])[None].expand_as(batch), None)[0]

        # dropless: batch-mates change nothing (up to the GEMMs' other shapes)
        torch.testing.assert_close(first_row(rows[:1]), first_row(rows), atol=1e-5, rtol=1e-5)
        model.config.moe_expert_capacity_factor = 0.5
        try:
            assert not torch.allclose(first_row(rows[:1]), first_row(rows), atol=1e-3)
            with pytest.raises(ValueError, match=r"extracting top-k logits from an MoE with token dropping "
                                                 r"\(moe_expert_capacity_factor=0.5\).*batch-mates.*resumed.*"
                                                 r"moe_expert_capacity_factor: null in the teacher checkpoint"):
                compute_topk_logits(_extract_cfg(out, data), teacher, tok)
        finally:
            model.config.moe_expert_capacity_factor = None
    assert not os.path.exists(out)


# ---------------------------------------------------------------- EP=2 over gloo
def _ep2_worker(rank, world, cases, sample_seed):
    from nemo_kd.parallel import ParallelConfig, destroy_parallel

    out = {}
    try:
        for family, case in cases.items():
            for temperature in (0.0, 1.0):
                out[(family, temperature)] = _sample(case["hf_dir"], case["prompts"], case["vocab_size"], temperature,
                                                     sample_seed, ParallelConfig(expert_model_parallel_size=2))
    finally:
        destroy_parallel()
    return out


@pytest.mark.distributed
def test_ep2_equals_ep1_greedy_and_sampled(zoo):
    sample_seed = 7
    cases = {f: {k: zoo[f][k] for k in ("hf_dir", "prompts", "vocab_size")} for f in FAMILIES}
    results = run_distributed(_ep2_worker, 2, cases, sample_seed)
    for family in FAMILIES:
        ep1 = {t: _ep1(zoo[family], t, sample_seed) for t in (0.0, 1.0)}
        # seeded temperature-1 draws differ from greedy (the sampled comparison is not the greedy one again)
        assert [tok for tok, _ in ep1[1.0]] != [tok for tok, _ in ep1[0.0]]
        assert [tok for tok, _ in ep1[0.0]] == zoo[family]["greedy"]
        for rank, per_rank in enumerate(results):
            for t in (0.0, 1.0):
                for i, ((tok2, lp2), (tok1, lp1)) in enumerate(zip(per_rank[(family, t)], ep1[t])):
                    assert tok2 == tok1, (family, t, rank, i, tok2, tok1)
                    torch.testing.assert_close(torch.tensor(lp2), torch.tensor(lp1), atol=1e-5, rtol=0)


def test_online_teacher_with_token_dropping_warns():
    """An online MoE teacher that drops tokens gives a sample KD targets that depend on its micro-batch: the
    engine says so when it takes the teacher (nothing is stored, so a warning; dropless: silent)."""
    from dist_utils import WorldOfOne

    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models import GPTModelConfig
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig

    student = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64)
    dropless = dataclasses.replace(student, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16)
    for teacher, dropping in ((dropless, False), (dataclasses.replace(dropless, moe_expert_capacity_factor=0.5), True)):
        with WorldOfOne(seed=5), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            DistillationEngine(student, DistillationLossConfig(), OptimConfig(), BatchConfig(2, 2, 16), max_steps=1,
                               teacher_cfg=teacher)
        said = [str(x.message) for x in caught if "token dropping" in str(x.message)]
        assert len(said) == dropping, said
        if dropping:
            assert said[0].startswith("the online teacher from an MoE with token dropping "
                                      "(moe_expert_capacity_factor=0.5)") and "micro_batch_size" in said[0]


def test_teacher_server_refuses_a_token_dropping_teacher():
    """The server batches different clients' requests into one forward: a token-dropping MoE teacher is refused
    when the server is built (a dropless one is served)."""
    import types

    from nemo_kd.models import GPTModelConfig
    from nemo_kd.teacher.server import ServeConfig, TeacherServer

    dropless = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, num_moe_experts=4,
                              moe_router_topk=2, moe_ffn_hidden_size=16)

    class WithConfig(torch.nn.Module):  # a Megatron model: its TransformerConfig under .config
        def __init__(self, config):
            super().__init__()
            self.config = config

    def teacher(cfg):
        return types.SimpleNamespace(model=WithConfig(cfg), name="moe-teacher", max_seq_length=16)

    TeacherServer(teacher(dropless), ServeConfig())
    with pytest.raises(ValueError, match=r"serving a teacher from an MoE with token dropping "
                                         r"\(moe_expert_capacity_factor=1.5\).*set moe_expert_capacity_factor: null"):
        TeacherServer(teacher(dataclasses.replace(dropless, moe_expert_capacity_factor=1.5)), ServeConfig())
