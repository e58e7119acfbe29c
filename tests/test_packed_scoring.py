"""Packed teacher-forced scoring (``response_logprobs(pack_length=...)``, the pipelines' ``pack_sequences``).

References: each pair scored alone, unpadded, by a float64 copy of the same weights, and the padded path
(``pack_length=None``) at float32; TP=2 over gloo against TP=1; an MoE (dropless) model; and the DASD
pipeline's scores, selection and training files packed vs padded. The pairs are of uneven length (a few
tokens to longer than a row) so that the plan makes several rows, most holding several pairs.
"""

import json
import shutil

import pytest
import torch

from dist_utils import WorldOfOne, run_distributed

V = 300
PACK = 40
# (prompt, response) lengths: several packs of 40 positions, an empty response, one pair (57 positions) longer
# than a row (scored whole, alone, as padded), a one-token prompt
LENGTHS = [(3, 5), (10, 30), (1, 1), (4, 2), (20, 12), (2, 56), (7, 9), (5, 0), (12, 3), (6, 25), (9, 9), (1, 14)]


def _cfg(**kw):
    from nemo_kd.models import GPTModelConfig

    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                vocab_size=V, max_position_embeddings=64)
    return GPTModelConfig(**{**base, **kw})


def _full_state(cfg):
    """Random weights with a scaled output layer (peaked distributions) and huge padding rows: a path that lets
    a padding column into the normalisation moves every log-prob."""
    from nemo_kd.models import build_gpt_model

    with WorldOfOne(seed=5):
        full = {k: v.clone() for k, v in build_gpt_model(cfg).state_dict().items() if torch.is_tensor(v)}
    w = full["output_layer.weight"]
    assert w.shape[0] > V
    w[:V] *= 8
    w[V:] = torch.randn(w.shape[0] - V, w.shape[1], generator=torch.Generator().manual_seed(0)) * 30
    return full


def _model(cfg, full, dtype=torch.float32):
    from nemo_kd.models import build_gpt_model, shard_state_dict
    from nemo_kd.parallel import state

    model = build_gpt_model(cfg)
    model.load_state_dict(shard_state_dict(full, cfg, state.tp_rank(), state.tp_size()), strict=False)
    return model.to(dtype).eval()


def _pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randint(0, V, (p,), generator=g).tolist() for p, _ in LENGTHS],
            [torch.randint(0, V, (r,), generator=g).tolist() for _, r in LENGTHS])


def _float64_reference(model64, prompts, responses):
    """Each pair alone, unpadded, in float64: log-softmax over the real vocabulary at the response's positions."""
    out = []
    for p, r in zip(prompts, responses):
        seq = torch.tensor([p + r])
        with torch.no_grad():
            logits = model64(seq, torch.arange(seq.shape[1])[None], None)[0, :, :V]
        lp = torch.log_softmax(logits, -1)
        out.append(torch.stack([lp[len(p) - 1 + j, t] for j, t in enumerate(r)]) if r else torch.zeros(0))
    return out


class _Forwards:
    """The token count of every forward of ``model`` (packed: ``[1, rows·width]``) and whether it was packed."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append((args[0].numel(), kwargs.get("packed_seq_params") is not None))

    def tokens(self):
        return sum(n for n, _ in self.calls)


def _score(model, prompts, responses, **kw):
    from nemo_kd.generation.sampling import response_logprobs

    return response_logprobs(model, prompts, responses, vocab_size=V, **kw)


def _close(got, want, atol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.float32 and a.shape == b.shape, (i, a.shape, b.shape)
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=0, msg=lambda m: f"pair {i}: {m}")


@pytest.mark.parametrize("position_embedding_type", ["rope", "learned_absolute"])
def test_packed_equals_padded_and_float64_per_pair(position_embedding_type):
    from nemo_kd.data.packing import pack_plan

    cfg = _cfg(position_embedding_type=position_embedding_type)
    full = _full_state(cfg)
    prompts, responses = _pairs()
    with WorldOfOne(seed=5):
        model = _model(cfg, full)
        ref = _float64_reference(_model(cfg, full, torch.float64), prompts, responses)
        padded_fw, padded = _Forwards(model), _score(model, prompts, responses, batch_size=4)
        padded_fw.handle.remove()
        packed_fw, packed = _Forwards(model), _score(model, prompts, responses, batch_size=3, pack_length=PACK)
        packed_fw.handle.remove()
        one_row_a_forward = _score(model, prompts, responses, batch_size=1, pack_length=PACK)
    _close(padded, ref, 2e-5)
    _close(packed, ref, 2e-5)
    _close(packed, padded, 1e-5)
    _close(one_row_a_forward, packed, 1e-5)  # batching does not change a pair's scores
    # it did pack: several rows of several pairs, the long pair alone, fewer positions than padded
    positions = [p + r - 1 for p, r in LENGTHS]
    fit = [i for i, (n, (_, r)) in enumerate(zip(positions, LENGTHS)) if r and n <= PACK]
    plan = pack_plan([positions[i] for i in fit], PACK, shuffle=False)
    assert len(plan) >= 3 and sum(len(p) > 1 for p in plan) >= 2 and max(positions) > PACK
    assert all(packed for _, packed in packed_fw.calls) and not any(packed for _, packed in padded_fw.calls)
    assert len(packed_fw.calls) == -(-(len(plan) + 1) // 3)  # the plan's rows and the long pair's, 3 a forward
    assert packed_fw.tokens() < 0.75 * padded_fw.tokens(), (packed_fw.tokens(), padded_fw.tokens())


def test_packed_scoring_refusals():
    from nemo_kd.generation.sampling import HFCausalLM

    cfg = _cfg()
    full = _full_state(cfg)
    with WorldOfOne(seed=5):
        model = _model(cfg, full)
        for bad in (0, -3, 2.5, True):
            with pytest.raises(ValueError, match="pack_length must be a positive integer"):
                _score(model, [[1]], [[2]], pack_length=bad)

    class Tiny(torch.nn.Module):  # an HF-style model: no packed_seq_params
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)

    hf = HFCausalLM.__new__(HFCausalLM)  # no transformers model needed: refused before any forward
    torch.nn.Module.__init__(hf)
    with pytest.raises(ValueError, match="packed scoring needs a Megatron-core GPTModel.*HFCausalLM"):
        _score(hf, [[1]], [[2]], pack_length=8)
    with pytest.raises(ValueError, match="packed scoring needs a Megatron-core GPTModel.*Tiny"):
        _score(Tiny(), [[1]], [[2]], pack_length=8)


def _tp_worker(rank, world, cfg, full, prompts, responses):
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=world, seed=5))
    try:
        model = _model(cfg, full)
        return (_score(model, prompts, responses, batch_size=2, pack_length=PACK),
                _score(model, prompts, responses, batch_size=5))
    finally:
        destroy_parallel()


@pytest.mark.distributed
def test_packed_at_tp2_equals_tp1():
    cfg = _cfg()
    assert cfg.padded_vocab_size(2) != cfg.padded_vocab_size(1)  # the shards' padding columns differ from TP=1's
    full = _full_state(cfg)
    prompts, responses = _pairs(seed=1)
    with WorldOfOne(seed=5):
        tp1 = _score(_model(cfg, full), prompts, responses, batch_size=4)
    ranks = run_distributed(_tp_worker, 2, cfg, full, prompts, responses)
    for packed, padded in ranks:
        _close(packed, tp1, 2e-5)
        _close(padded, tp1, 2e-5)
    _close(ranks[1][0], ranks[0][0], 0.0)  # every TP rank returns the same scores


def test_packed_moe_equals_padded():
    """A dropless MoE (4 experts, top-2): each token's experts and weights are its own, so packing (other
    batch-mates, no padding tokens routed) gives the padded scores."""
    cfg = _cfg(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_token_dispatcher_type="alltoall")
    full = _full_state(cfg)
    prompts, responses = _pairs(seed=2)
    with WorldOfOne(seed=5):
        model = _model(cfg, full)
        padded = _score(model, prompts, responses, batch_size=4)
        packed = _score(model, prompts, responses, batch_size=2, pack_length=PACK)
        ref = _float64_reference(_model(cfg, full, torch.float64), prompts, responses)
    _close(packed, padded, 1e-5)
    _close(packed, ref, 2e-5)


# ----------------------------------------------------------------------------- the DASD pipeline

from test_dasd_pipeline import world  # noqa: E402,F401  (the module-scoped tiny teacher/student assets)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_dasd_scores_and_selection_packed_equal_padded(world, tmp_path, monkeypatch):  # noqa: F811
    """The student's scores of the same teacher candidates, padded then packed (``pack_sequences``): the same
    filter verdicts, divergence sentence counts, selection and training files; mean log-probs to float32
    rounding. The packed run resumes from the padded run's teacher samples (packing is not a stage setting:
    it changes no output beyond rounding)."""
    from test_dasd_pipeline import _cfg as dasd_cfg

    from nemo_kd.generation import dasd_pipeline, sampling

    calls = []
    real = sampling.response_logprobs

    def spy(*a, **kw):
        calls.append(kw.get("pack_length"))
        return real(*a, **kw)

    monkeypatch.setattr(sampling, "response_logprobs", spy)
    padded_out, packed_out = tmp_path / "padded", tmp_path / "packed"
    with WorldOfOne():
        padded_report = dasd_pipeline.run(dasd_cfg(world, padded_out))
    assert calls and set(calls) == {None}
    for st in ("low", "high"):
        (packed_out / st).mkdir(parents=True)
        for name in ("teacher_responses.jsonl", "teacher_responses.jsonl.meta.json"):
            shutil.copy(padded_out / st / name, packed_out / st / name)
    calls.clear()
    cfg = dasd_cfg(world, packed_out, pack_sequences=True, batch_size=4)
    assert cfg.pack_sequences and cfg.scoring_pack_length("student") == cfg.max_seq_length
    with WorldOfOne():
        packed_report = dasd_pipeline.run(cfg)
    assert calls and set(calls) == {cfg.max_seq_length}
    strip = lambda rep: {k: v for k, v in rep.items() if k != "seconds"}  # noqa: E731
    assert strip(packed_report) == strip(padded_report)
    for st in ("low", "high"):
        a, b = _jsonl(padded_out / st / "scored.jsonl"), _jsonl(packed_out / st / "scored.jsonl")
        assert sum(r["divergence"] is not None for r in a) >= 5
        assert [{k: v for k, v in r.items() if k != "student_mean_logprob"} for r in a] == \
               [{k: v for k, v in r.items() if k != "student_mean_logprob"} for r in b]
        for ra, rb in zip(a, b):
            assert ("student_mean_logprob" in ra) == ("student_mean_logprob" in rb)
            if "student_mean_logprob" in ra:
                assert abs(ra["student_mean_logprob"] - rb["student_mean_logprob"]) < 1e-5
        for name in ("selected.jsonl", "train.jsonl"):
            assert (padded_out / st / name).read_text() == (packed_out / st / name).read_text()


@pytest.mark.parametrize("pipeline", ["dasd", "preference"])
def test_pipeline_packing_keys(pipeline):
    """``pack_sequences`` / ``pack_length`` (null: max_seq_length) in both pipelines' configs; refused where the
    scorer cannot pack (an HF model), with a row shorter than a sample may be, or a bad length."""
    if pipeline == "dasd":
        from nemo_kd.generation.dasd_pipeline import DASDPipelineConfig as Config

        scorer = "student"
    else:
        from nemo_kd.generation.preference_pipeline import PreferencePipelineConfig as Config

        scorer = "teacher"
    base = dict(prompts="p.jsonl", output_dir="o", teacher=dict(checkpoint="t"), student=dict(checkpoint="s"),
                max_seq_length=512)
    if pipeline == "preference":
        base["score"] = "teacher_logprob"
    cfg = Config.from_dict(base)
    assert not cfg.pack_sequences and cfg.scoring_pack_length(scorer) is None
    cfg = Config.from_dict(dict(base, pack_sequences=True))
    assert cfg.scoring_pack_length(scorer) == 512
    cfg = Config.from_dict(dict(base, pack_sequences=True, pack_length=2048))
    assert cfg.scoring_pack_length(scorer) == 2048
    with pytest.raises(ValueError, match="pack_length .*256.* max_seq_length .*512"):
        Config.from_dict(dict(base, pack_sequences=True, pack_length=256))
    with pytest.raises(ValueError, match="pack_length"):
        Config.from_dict(dict(base, pack_sequences=True, pack_length="long"))
    with pytest.raises(ValueError, match=f"pack_sequences.*{scorer}.backend=hf"):
        Config.from_dict(dict(base, pack_sequences=True, **{scorer: dict(checkpoint="m", backend="hf")}))
