"""nemo_kd.generation.sampling: greedy / sampled decoding and log-probs against independent references.

One tiny Megatron GPT (vocab = the BPE's ~300 tokens, padded to 384 at TP=1 and 512 at TP=2)
whose output layer is scaled up (peaked, not near-uniform, distributions) and whose padding
rows carry huge weights, so any code path that lets a padding id through produces it. The
references run a float64 copy of the same weights, one unpadded sequence at a time.
"""

import pytest
import torch

from dist_utils import WorldOfOne, run_distributed

TEXTS = [f"question {i}: what is {i} plus {i * 3}? answer: {i + i * 3}." for i in range(30)]
PROMPTS = ["what is 1 plus 3?", "hi", "question 7: what is 7 plus 21? answer please", "2", "plus plus", "answer: 4"]


def _megatron(cfg, full, dtype=torch.float32):
    from nemo_kd.models import build_gpt_model, shard_state_dict
    from nemo_kd.parallel import state

    model = build_gpt_model(cfg)
    model.load_state_dict(shard_state_dict(full, cfg, state.tp_rank(), state.tp_size()), strict=False)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def tiny():
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.generation.sampling import prompt_ids
    from nemo_kd.models import GPTModelConfig, build_gpt_model

    tok = train_byte_level_bpe(TEXTS, vocab_size=300)
    V = len(tok)
    cfg = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                         vocab_size=V, max_position_embeddings=64)
    with WorldOfOne(seed=5):
        full = {k: v.clone() for k, v in build_gpt_model(cfg).state_dict().items() if torch.is_tensor(v)}
        w = full["output_layer.weight"]
        assert w.shape[0] > V  # padded
        w[:V] *= 12  # logits of std ~1.5: peaked but far from one-hot
        w[V:] = torch.randn(w.shape[0] - V, w.shape[1], generator=torch.Generator().manual_seed(0)) * 30
        yield dict(tok=tok, V=V, cfg=cfg, full=full, model=_megatron(cfg, full),
                   ref=_megatron(cfg, full, torch.float64), prompts=[prompt_ids(tok, p) for p in PROMPTS])


def _f64(values):
    return torch.tensor(values, dtype=torch.float64)


def _ref_logits(t, seq):
    """float64 next-token logits over the real vocabulary after each position of ``seq`` (one row, no padding)."""
    tokens = torch.tensor([seq])
    with torch.no_grad():
        return t["ref"](tokens, torch.arange(len(seq))[None], None)[0, :, :t["V"]]


def _gen(t, prompts, cfg, **kw):
    from nemo_kd.generation.sampling import generate

    kw.setdefault("eos_id", t["tok"].eos_token_id)
    return generate(t["model"], prompts, cfg, pad_id=t["tok"].pad_token_id, vocab_size=t["V"], **kw)


def _cfg(**kw):
    from nemo_kd.generation.sampling import SamplingConfig

    return SamplingConfig(**kw)


# ----------------------------------------------------------------------------- greedy


def test_greedy_equals_float64_argmax_loop(tiny):
    gens = _gen(tiny, tiny["prompts"], _cfg(temperature=0, max_new_tokens=12), batch_size=4)
    assert any(len(set(g.token_ids)) > 2 for g in gens)  # not a degenerate repeat
    for p, g in zip(tiny["prompts"], gens):
        seq, ref_lp = list(p), []
        for _ in range(12):
            z = _ref_logits(tiny, seq)[-1]
            nxt = int(z.argmax())
            ref_lp.append(torch.log_softmax(z, -1)[nxt].item())
            if nxt == tiny["tok"].eos_token_id:
                break
            seq.append(nxt)
        assert g.token_ids == seq[len(p):]
        assert g.finished == (len(ref_lp) > len(g.token_ids))
        assert g.sampling_logprobs == [0.0] * len(ref_lp)
        torch.testing.assert_close(_f64(g.logprobs), _f64(ref_lp), atol=1e-5, rtol=0)
    # The test is sharp: over the padded vocabulary the argmax would be a padding row.
    padded = tiny["model"](torch.tensor([tiny["prompts"][0]]), torch.arange(len(tiny["prompts"][0]))[None], None)
    assert int(padded[0, -1].argmax()) >= tiny["V"]


# ----------------------------------------------------------------------------- the one-step distribution


N_DRAWS = 3000


def _tv(p, q):
    return 0.5 * (p - q).abs().sum().item()


def _one_step(tiny, cfg):
    """First tokens of N_DRAWS copies of one prompt (sample indices 0..N-1) and the float64 logits."""
    p = tiny["prompts"][0]
    gens = _gen(tiny, [p] * N_DRAWS, cfg, eos_id=None, batch_size=1000)
    ids = torch.tensor([g.token_ids[0] for g in gens])
    assert (ids < tiny["V"]).all()  # never a padding row (they hold the largest raw logits)
    emp = torch.bincount(ids, minlength=tiny["V"]).double() / N_DRAWS
    return gens, ids, emp, _ref_logits(tiny, p)[-1]


def _noise_tv(p):
    """E[TV(empirical, p)] for N_DRAWS samples (normal approximation of each count)."""
    return 0.5 * (p * (1 - p) / N_DRAWS).sqrt().sum().item() * (2 / torch.pi) ** 0.5


def test_sampled_first_token_follows_softmax_over_temperature(tiny):
    T = 0.6
    gens, ids, emp, z = _one_step(tiny, _cfg(temperature=T, max_new_tokens=1, seed=7))
    p_t, p_1 = torch.softmax(z / T, -1), torch.softmax(z, -1)
    tol = 2 * _noise_tv(p_t)
    assert _tv(emp, p_t) < tol, (_tv(emp, p_t), tol)
    # A sampler that ignored the temperature would fail: T=1 is far outside the tolerance.
    assert _tv(p_t, p_1) > 3 * tol and _tv(emp, p_1) > 2 * tol, (_tv(p_t, p_1), _tv(emp, p_1), tol)
    lp = _f64([g.logprobs[0] for g in gens])
    slp = _f64([g.sampling_logprobs[0] for g in gens])
    torch.testing.assert_close(lp, torch.log_softmax(z, -1)[ids], atol=1e-5, rtol=0)
    torch.testing.assert_close(slp, torch.log_softmax(z / T, -1)[ids], atol=1e-5, rtol=0)


@pytest.mark.parametrize("T,top_k,top_p", [(0.8, 5, 1.0), (1.0, 0, 0.7), (1.3, 12, 0.8)])
def test_top_k_top_p_truncate_and_renormalise(tiny, T, top_k, top_p):
    gens, ids, emp, z = _one_step(tiny, _cfg(temperature=T, top_k=top_k, top_p=top_p, max_new_tokens=1, seed=3))
    # Independent float64 reference: temperature, then top-k, then the nucleus of what is left.
    a = z / T
    keep = torch.ones_like(a, dtype=torch.bool)
    if top_k:
        keep &= a >= a.topk(top_k).values[-1]
    if top_p < 1:
        q = torch.softmax(a.masked_fill(~keep, float("-inf")), -1)
        order = sorted(range(len(q)), key=lambda v: (-q[v].item(), v))
        nucleus, mass = set(), 0.0
        for v in order:
            nucleus.add(v)
            mass += q[v].item()
            if mass >= top_p:
                break
        keep &= torch.tensor([v in nucleus for v in range(len(q))])
    log_pi = torch.log_softmax(a.masked_fill(~keep, float("-inf")), -1)
    assert 1 < int(keep.sum()) < tiny["V"] // 4
    assert keep[ids].all(), "a token outside the truncated set was sampled"
    slp = _f64([g.sampling_logprobs[0] for g in gens])
    torch.testing.assert_close(slp, log_pi[ids], atol=1e-5, rtol=0)
    torch.testing.assert_close(_f64([g.logprobs[0] for g in gens]),
                               torch.log_softmax(z, -1)[ids], atol=1e-5, rtol=0)
    tol = 2 * _noise_tv(log_pi.exp())
    assert _tv(emp, log_pi.exp()) < tol
    assert _tv(emp, torch.softmax(a, -1)) > 2 * tol  # sampling from the untruncated distribution would fail


# ----------------------------------------------------------------------------- log-probs and scoring


def test_logprobs_equal_response_scoring_and_float64(tiny):
    from nemo_kd.generation.sampling import response_logprobs

    gens = _gen(tiny, tiny["prompts"], _cfg(temperature=1.0, top_k=40, max_new_tokens=10, seed=1), batch_size=3)
    eos = tiny["tok"].eos_token_id
    responses = [g.token_ids + [eos] * g.finished for g in gens]
    scored = response_logprobs(tiny["model"], tiny["prompts"], responses, batch_size=4, vocab_size=tiny["V"])
    for p, g, r, s in zip(tiny["prompts"], gens, responses, scored):
        assert s.dtype == torch.float32 and s.shape == (len(r),) == (len(g.logprobs),)
        torch.testing.assert_close(s.double(), _f64(g.logprobs), atol=1e-5, rtol=0)
        z = _ref_logits(tiny, p + r)[len(p) - 1:-1]
        ref = torch.log_softmax(z, -1).gather(1, torch.tensor(r)[:, None])[:, 0]
        torch.testing.assert_close(s.double(), ref, atol=1e-5, rtol=0)
    # An empty response scores to an empty tensor.
    (empty,) = response_logprobs(tiny["model"], [tiny["prompts"][0]], [[]], vocab_size=tiny["V"])
    assert empty.shape == (0,)


# ----------------------------------------------------------------------------- reproducibility


def test_independent_of_batch_size_and_offset(tiny):
    cfg = _cfg(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=3)
    one = _gen(tiny, tiny["prompts"], cfg, batch_size=1)
    four = _gen(tiny, tiny["prompts"], cfg, batch_size=4)
    assert [g.token_ids for g in one] == [g.token_ids for g in four]
    assert [g.finished for g in one] == [g.finished for g in four]
    for a, b in zip(one, four):
        torch.testing.assert_close(_f64(a.logprobs), _f64(b.logprobs), atol=1e-6, rtol=0)
        torch.testing.assert_close(_f64(a.sampling_logprobs), _f64(b.sampling_logprobs),
                                   atol=1e-6, rtol=0)
    # The tail of the list generated on its own, at its global offset, draws the same samples.
    tail = _gen(tiny, tiny["prompts"][2:], cfg, batch_size=3, sample_offset=2)
    assert [g.token_ids for g in tail] == [g.token_ids for g in four[2:]]
    # ... and at another offset (or seed) it does not.
    shifted = _gen(tiny, tiny["prompts"][2:], cfg, batch_size=3, sample_offset=0)
    reseeded = _gen(tiny, tiny["prompts"], _cfg(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=4))
    assert [g.token_ids for g in shifted] != [g.token_ids for g in tail]
    assert [g.token_ids for g in reseeded] != [g.token_ids for g in four]


def _sample_and_score(model, vocab_size, prompts, eos, pad):
    from nemo_kd.generation.sampling import SamplingConfig, generate, response_logprobs

    out = {}
    for name, sc in (("sampled", SamplingConfig(temperature=1.0, top_k=50, max_new_tokens=8, seed=11)),
                     ("greedy", SamplingConfig(temperature=0, max_new_tokens=8))):
        gens = generate(model, prompts, sc, eos_id=eos, pad_id=pad, vocab_size=vocab_size, batch_size=4)
        scored = response_logprobs(model, prompts, [g.token_ids for g in gens], batch_size=4, vocab_size=vocab_size)
        out[name] = [(g.token_ids, g.finished, g.logprobs, g.sampling_logprobs, s.tolist())
                     for g, s in zip(gens, scored)]
    return out


def _tp2_worker(rank, world, cfg, full, prompts, eos, pad):
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=world, seed=5))
    try:
        return _sample_and_score(_megatron(cfg, full), cfg.vocab_size, prompts, eos, pad)
    finally:
        destroy_parallel()


@pytest.mark.distributed
def test_tp2_equals_tp1(tiny):
    eos, pad = tiny["tok"].eos_token_id, tiny["tok"].pad_token_id
    assert tiny["cfg"].padded_vocab_size(2) != tiny["cfg"].padded_vocab_size(1)  # different padding per layout
    ref = _sample_and_score(tiny["model"], tiny["V"], tiny["prompts"], eos, pad)
    ranks = run_distributed(_tp2_worker, 2, tiny["cfg"], tiny["full"], tiny["prompts"], eos, pad)
    assert ranks[0] == ranks[1]  # every TP rank returns the same result
    for name in ("sampled", "greedy"):
        for (tok1, fin1, lp1, slp1, sc1), (tok2, fin2, lp2, slp2, sc2) in zip(ref[name], ranks[0][name]):
            assert tok1 == tok2 and fin1 == fin2, name
            for a, b in ((lp1, lp2), (slp1, slp2), (sc1, sc2)):
                torch.testing.assert_close(_f64(a), _f64(b), atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- stopping


def test_end_token_and_length_limits(tiny):
    cfg = _cfg(temperature=1.0, max_new_tokens=10, seed=5)
    free = _gen(tiny, tiny["prompts"], cfg, eos_id=None)
    assert all(len(g.token_ids) == 10 and not g.finished and len(g.logprobs) == 10 for g in free)
    # Make the 4th token of row 0 the end token: the draws are unchanged up to it, so every row
    # stops exactly at its first occurrence of that token and keeps the same log-probs.
    row0 = free[0].token_ids
    eos = next(t for j, t in enumerate(row0) if j >= 3 and t not in row0[:j])
    stopped = _gen(tiny, tiny["prompts"], cfg, eos_id=eos)
    assert stopped[0].finished
    for f, s in zip(free, stopped):
        if eos in f.token_ids:
            k = f.token_ids.index(eos)
            assert s.finished and s.token_ids == f.token_ids[:k] and len(s.logprobs) == k + 1
            torch.testing.assert_close(_f64(s.logprobs), _f64(f.logprobs[:k + 1]), atol=1e-6, rtol=0)
        else:
            assert not s.finished and s.token_ids == f.token_ids
    # max_length caps prompt + completion per row, whatever the batch-mates' lengths.
    lengths = [len(p) for p in tiny["prompts"]]
    cap = sorted(lengths)[-2] + 3  # the longest prompt is already over it
    capped = _gen(tiny, tiny["prompts"], cfg, eos_id=None, max_length=cap, batch_size=6)
    for n, g, f in zip(lengths, capped, free):
        assert len(g.token_ids) == max(0, min(10, cap - n)) and not g.finished
        assert g.token_ids == f.token_ids[:len(g.token_ids)]
    assert any(n > cap for n in lengths) and any(n + 10 > cap > n for n in lengths)


def test_text_and_greedy_generate_wrapper(tiny):
    from nemo_kd.evaluation import greedy_generate

    tok = tiny["tok"]
    gens = _gen(tiny, tiny["prompts"][:3], _cfg(temperature=0, max_new_tokens=6), tokenizer=tok)
    assert [g.text for g in gens] == [tok.decode(g.token_ids, skip_special_tokens=True) for g in gens]
    assert greedy_generate(tiny["model"], tok, PROMPTS[:3], max_new_tokens=6, batch_size=2) == [g.text for g in gens]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.0), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(seed=1.5), "seed"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_refuses_pipeline_parallel_and_bad_inputs(tiny, monkeypatch):
    from nemo_kd.parallel import state

    with pytest.raises(ValueError, match="empty"):
        _gen(tiny, [[]], _cfg())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _gen(tiny, tiny["prompts"], _cfg(), eos_id=tiny["V"])
    monkeypatch.setattr(state, "pp_size", lambda: 2)
    with pytest.raises(ValueError, match="PP=1.*JSONL"):
        _gen(tiny, tiny["prompts"], _cfg())


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_adapter_equals_transformers(tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_kd.generation.sampling import HFCausalLM, response_logprobs

    torch.manual_seed(0)
    V = tiny["V"]
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=V + 20, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    with torch.no_grad():
        hf.lm_head.weight.mul_(40)
    hf.save_pretrained(tmp_path / "hf")
    model = HFCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert model.vocab_size == model.config.vocab_size == V + 20
    hf.eval()
    tokens = torch.tensor([tiny["prompts"][2][:10], tiny["prompts"][0][:10]])
    with torch.no_grad():
        direct = hf(input_ids=tokens).logits
        torch.testing.assert_close(model(tokens, torch.arange(10)[None].expand(2, 10), None), direct, atol=0, rtol=0)
    # Sampling through the adapter: the full-vocabulary HF logits are not mistaken for a TP shard, ids >= V
    # (the HF embedding's extra rows) are never produced, log-probs match the direct float64 computation.
    gens = _gen(dict(tiny, model=model), tiny["prompts"], _cfg(temperature=1.0, max_new_tokens=6, seed=2),
                eos_id=None)
    scored = response_logprobs(model, tiny["prompts"], [g.token_ids for g in gens], vocab_size=V)
    for p, g, s in zip(tiny["prompts"], gens, scored):
        assert max(g.token_ids) < V
        with torch.no_grad():
            z = hf(input_ids=torch.tensor([p + g.token_ids])).logits[0, len(p) - 1:-1, :V].double()
        ref = torch.log_softmax(z, -1).gather(1, torch.tensor(g.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(_f64(g.logprobs), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_decoding_equals_rerunning_the_prefix(tiny, temperature):
    """Megatron's KV cache (prefill to the shortest prompt, then one position per forward; rows inside
    their prompt fed their prompt tokens) draws exactly what re-running the whole prefix draws."""
    cfg = _cfg(temperature=temperature, max_new_tokens=10, seed=11)
    kw = dict(batch_size=4, max_length=24)  # prompts of 2..16 tokens: some rows hit max_length
    cached = _gen(tiny, tiny["prompts"], cfg, use_kv_cache=True, **kw)
    rerun = _gen(tiny, tiny["prompts"], cfg, use_kv_cache=False, **kw)
    assert len({len(p) for p in tiny["prompts"]}) > 3  # prompts of several lengths share a batch
    assert any(len(p) + len(g.token_ids) == 24 for p, g in zip(tiny["prompts"], rerun))  # capped rows
    assert len({len(g.token_ids) for g in rerun}) > 1
    for a, b in zip(cached, rerun):
        assert a.token_ids == b.token_ids and a.finished == b.finished
        torch.testing.assert_close(_f64(a.logprobs), _f64(b.logprobs), rtol=0, atol=1e-5)
        torch.testing.assert_close(_f64(a.sampling_logprobs), _f64(b.sampling_logprobs), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs a Megatron-core GPTModel"):
        from nemo_kd.generation.sampling import generate

        generate(torch.nn.Linear(2, 2), tiny["prompts"][:1], cfg, eos_id=None, pad_id=0, vocab_size=2,
                 use_kv_cache=True)
