"""Cross-tokenizer KD in training: dataset/collate, objective, engine (TP=1/TP=2, offline and online).

One tiny Megatron teacher with a byte-level BPE + ChatML tokenizer; the student uses
either the same tokenizer (identity checks) or a SentencePiece unigram with the Llama-2
template (cross-family). Stores come from the real ``compute_topk_logits``.
"""

import math
import os
import sys

import numpy as np
import pytest
import torch

from dist_utils import WorldOfOne, run_distributed
from test_align_store import CORPUS, MAX_LEN, RESPONSES, write_data

K = 6
SEQ = MAX_LEN
STUDENT_VOCAB = 512  # a multiple of 128·TP for TP ∈ {1, 2}: no padding columns that differ between layouts


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import AutoTokenizer

    from nemo_kd.data.sentencepiece_builder import train_sentencepiece_unigram
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher, save_full_checkpoint

    d = tmp_path_factory.mktemp("xtrain")
    train_byte_level_bpe(CORPUS, vocab_size=400, template="chatml", save_dir=str(d / "t_tok"))
    train_sentencepiece_unigram(CORPUS, vocab_size=400, save_dir=str(d / "s_tok"))
    t_tok, s_tok = AutoTokenizer.from_pretrained(str(d / "t_tok")), AutoTokenizer.from_pretrained(str(d / "s_tok"))
    data = str(d / "data.jsonl")
    write_data(data, n=8)
    tcfg = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                          vocab_size=len(t_tok), max_position_embeddings=128)
    with WorldOfOne():
        full = {k: v for k, v in build_gpt_model(tcfg).state_dict().items() if torch.is_tensor(v)}
        full["output_layer.weight"] = full["output_layer.weight"] * 30
        save_full_checkpoint(str(d / "teacher"), full, tcfg)
        teacher = MegatronTeacher(str(d / "teacher"))
        base = dict(data_path=data, top_k=K, max_seq_length=MAX_LEN, values_dtype="float32", batch_size=4,
                    progress=False)
        compute_topk_logits(ExtractConfig(output_path=str(d / "v1"), **base), teacher, t_tok)
        compute_topk_logits(ExtractConfig(output_path=str(d / "ident"), align_teacher_template=True, **base),
                            teacher, t_tok, student_tokenizer=t_tok)
        compute_topk_logits(ExtractConfig(output_path=str(d / "cross"), align_teacher_template=True, **base),
                            teacher, t_tok, student_tokenizer=s_tok)
    return dict(dir=d, t_tok=t_tok, s_tok=s_tok, data=data, tcfg=tcfg, teacher=str(d / "teacher"))


def _dataset(env, store_name=None, student="t_tok", online=False):
    from nemo_kd.data import read_records
    from nemo_kd.data.kd_dataset import DistillationDataset
    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.teacher.store import StoreReader

    ct = ConversationTokenizer(env[student], "chat", MAX_LEN)
    store = StoreReader(str(env["dir"] / store_name)) if store_name else None
    teacher_ct = ConversationTokenizer(env["t_tok"], "chat", MAX_LEN) if online else None
    return DistillationDataset(read_records(env["data"]), ct, store=store, k=K, teacher_tokenizer=teacher_ct,
                               student_vocab_size=STUDENT_VOCAB, teacher_vocab_size=env["tcfg"].vocab_size)


def _microbatches(ds, micro=2):
    from nemo_kd.data.kd_dataset import collate

    return [collate([ds[i] for i in range(j, j + micro)], SEQ, 0) for j in range(0, len(ds), micro)]


# ----------------------------------------------------------------------------- identity


@pytest.mark.parametrize("loss_type,convention", [("forward_kl", "exact_tail"), ("jsd", "renormalized"),
                                                  ("reverse_kl", "exact_tail")])
def test_identity_cross_path_equals_same_tokenizer_objective(env, loss_type, convention):
    """Equal tokenizers and templates through store v2 + alignment + cross loss == the v1 top-k path."""
    from nemo_kd.align import CrossTokenizerTeacher
    from nemo_kd.losses.objective import DistillationLossConfig, DistillationObjective, objective_normalisers
    from nemo_kd.models.engine import _objective_batch

    same, cross = _microbatches(_dataset(env, "v1")), _microbatches(_dataset(env, "ident"))
    cfg = DistillationLossConfig(kd_loss_type=loss_type, topk_convention=convention, kd_loss_weight=1.0,
                                 sft_loss_weight=0.3)
    obj = DistillationObjective(cfg)
    g = torch.Generator().manual_seed(0)
    b_same, b_cross = [_objective_batch(mb, None) for mb in same], [_objective_batch(mb, None) for mb in cross]
    assert all(isinstance(b.teacher, CrossTokenizerTeacher) for b in b_cross)
    n_same, n_cross = objective_normalisers(cfg, b_same), objective_normalisers(cfg, b_cross)
    assert float(n_same.kd) == float(n_cross.kd) > 0  # every completion token is aligned one-to-one
    for mb_s, mb_c, bs, bc in zip(same, cross, b_same, b_cross):
        assert torch.equal(mb_s["inputs"], mb_c["inputs"]) and torch.equal(mb_s["loss_mask"], mb_c["loss_mask"])
        logits = (torch.randn(*mb_s["inputs"].shape, STUDENT_VOCAB, generator=g) * 2).requires_grad_(True)
        out_s = obj(logits, bs, n_same)
        grad_s, = torch.autograd.grad(out_s.loss, logits)
        out_c = obj(logits, bc, n_cross)
        grad_c, = torch.autograd.grad(out_c.loss, logits)
        torch.testing.assert_close(out_c.loss, out_s.loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad_c, grad_s, rtol=1e-5, atol=1e-8)
        for key in ("kd_loss", "sft_loss", "teacher_student_kd_sum", "kd_tokens", "token_agreement"):
            torch.testing.assert_close(out_c.metrics[key].float(), out_s.metrics[key].float(), rtol=1e-6, atol=1e-7)
        assert float(out_c.metrics["xtok_one_to_one"]) == float(out_c.metrics["xtok_completion_tokens"]) > 0
        assert float(out_c.metrics["xtok_vocab_coverage"]) == 1.0


def test_cross_family_collate_is_consistent(env):
    """Student rows / teacher rows of the collated batch agree with the per-sample alignment."""
    ds = _dataset(env, "cross", student="s_tok")
    assert ds.cross_tokenizer and not ds.vocab_map.is_identity
    mbs = _microbatches(ds)
    total_s = total_t = 0
    for j, mb in enumerate(mbs):
        samples = [ds[i] for i in range(2 * j, 2 * j + 2)]
        n_t = sum(len(s.xtok.teacher_completion_ids) for s in samples)
        assert mb["xtok_teacher_values"].shape == (n_t, K) and mb["xtok_teacher_logprobs"].shape == (n_t,)
        rows = torch.cat([mb["xtok_o2o_student_rows"], mb["xtok_chain_student_rows"]])
        flat_mask = mb["loss_mask"].reshape(-1).bool()
        assert flat_mask[rows].all()  # KD rows are completion label rows
        # chain targets are the student's labels at those rows
        labels = mb["labels"].reshape(-1)
        assert torch.equal(labels[mb["xtok_chain_student_rows"]], mb["xtok_chain_student_targets"])
        assert int(mb["xtok_counts"][0]) == int(mb["loss_mask"].sum())
        total_s += int(mb["xtok_counts"][0])
        total_t += n_t
    assert total_t != total_s  # genuinely different tokenisations


# ----------------------------------------------------------------------------- engine: TP, online


def _engine_run(rank, world, tp, steps, microbatches, full, online_teacher=None, tcfg=None, pp=1):
    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models import GPTModelConfig, shard_state_dict
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    model = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                           ffn_hidden_size=64, vocab_size=STUDENT_VOCAB, max_position_embeddings=SEQ)
    loss = DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail")
    batch = BatchConfig(micro_batch_size=2, global_batch_size=len(microbatches[0]) * 2, seq_length=SEQ)
    initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=7))
    try:
        teacher_model = None
        if online_teacher:
            from nemo_kd.teacher.teachers import load_full_checkpoint

            teacher_model, _ = load_full_checkpoint(online_teacher, state.tp_rank(), tp, state.pp_rank(), pp)
        engine = DistillationEngine(model, loss, OptimConfig(lr=3e-3, clip_grad=1.0), batch, max_steps=steps,
                                    teacher_cfg=tcfg if online_teacher else None, teacher_model=teacher_model,
                                    cross_tokenizer=bool(online_teacher))
        if full is None:
            full = {k: v.detach().clone() for k, v in engine.module.state_dict().items() if torch.is_tensor(v)}
        engine.module.load_state_dict(shard_state_dict(full, model, state.tp_rank(), tp, state.pp_rank(), pp),
                                      strict=False)
        history = [engine.train_step(microbatches[s % len(microbatches)]) for s in range(steps)]
        return history, full
    finally:
        destroy_parallel()


def _steps(mbs):
    return [mbs[i:i + 2] for i in range(0, len(mbs) - 1, 2)]  # 2 microbatches per step


@pytest.fixture(scope="module")
def cross_steps(env):
    return _steps(_microbatches(_dataset(env, "cross", student="s_tok")))


@pytest.fixture(scope="module")
def online_steps(env):
    """The co-located teacher's steps: its own rendering travels with the batch, no stored top-k."""
    return _steps(_microbatches(_dataset(env, None, student="s_tok", online=True)))


def _one_process_runs(rank, world, cross_steps, online_steps, teacher, tcfg):
    """Every one-process run in one launch (each sets up and tears down its own parallel state): the TP=1
    offline reference, the online teacher at TP=1 from the reference's weights, and the refusal message."""
    reference = _engine_run(rank, world, 1, 3, cross_steps, None)
    return dict(tp1=reference, online_tp1=_engine_run(rank, world, 1, 2, online_steps, reference[1], teacher, tcfg),
                refusal=_module_body(rank, world, tcfg))


def _two_process_runs(rank, world, full, cross_steps, online_steps, teacher, tcfg):
    """Every two-process layout in one launch, from the TP=1 reference's weights."""
    return dict(tp2=_engine_run(rank, world, 2, 3, cross_steps, full),
                online_tp2=_engine_run(rank, world, 2, 2, online_steps, full, teacher, tcfg),
                pp2_offline=_engine_run(rank, world, 1, 2, cross_steps, full, None, None, 2),
                pp2_online=_engine_run(rank, world, 1, 2, online_steps, full, teacher, tcfg, 2))


@pytest.fixture(scope="module")
def one_process(env, cross_steps, online_steps):
    return run_distributed(_one_process_runs, 1, cross_steps, online_steps, env["teacher"], env["tcfg"])[0]


@pytest.fixture(scope="module")
def tp1(one_process):
    return one_process["tp1"]


@pytest.fixture(scope="module")
def two_process(env, tp1, cross_steps, online_steps):
    return run_distributed(_two_process_runs, 2, tp1[1], cross_steps, online_steps, env["teacher"], env["tcfg"])[0]


def test_offline_cross_tokenizer_engine_logs_metrics(tp1):
    history, _ = tp1
    for m in history:
        assert math.isfinite(m["loss"]) and abs(m["loss"] - (m["kd_loss"] + 0.5 * m["sft_loss"])) < 1e-5
        assert 0 < m["xtok_one_to_one_frac"] < 1 and 0 < m["xtok_vocab_coverage"] < 1
        assert m["xtok_kl"] > 0 and abs(m["xtok_kl"] - m["teacher_student_kd"]) < 1e-12


@pytest.mark.distributed
def test_tp2_matches_tp1_cross_tokenizer_step(tp1, two_process):
    ref, full = tp1
    got, _ = two_process["tp2"]
    for r, g in zip(ref, got):
        for key in ("loss", "kd_loss", "sft_loss", "grad_norm", "xtok_kl", "xtok_one_to_one_frac", "token_agreement"):
            assert abs(r[key] - g[key]) < 1e-5 * max(1.0, abs(r[key])), (key, r[key], g[key])


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_online_teacher_own_tokenisation_matches_offline_store(request, tp1, online_steps, tp):
    """A co-located teacher on its own rendering gives the same step as its offline v2 store."""
    ref, full = tp1
    assert "xtok_teacher_inputs" in online_steps[0][0] and "xtok_teacher_values" not in online_steps[0][0]
    runs = request.getfixturevalue("one_process" if tp == 1 else "two_process")
    got, _ = runs[f"online_tp{tp}"]
    for r, g in zip(ref[:2], got):
        for key in ("loss", "kd_loss", "grad_norm", "xtok_kl", "xtok_one_to_one_frac"):
            assert abs(r[key] - g[key]) < 1e-4 * max(1.0, abs(r[key])), (key, r[key], g[key])


@pytest.mark.distributed
@pytest.mark.parametrize("online", [False, True])
def test_pp2_matches_tp1_cross_tokenizer(tp1, two_process, online):
    """Pipeline parallel (PP=2): the cross-tokenizer objective runs on the last stage (offline store),
    and the online teacher's own-tokenisation logits travel through its pipeline; both repeat TP=1."""
    ref, full = tp1
    got, _ = two_process["pp2_online" if online else "pp2_offline"]
    for r, g in zip(ref[:2], got):
        for key in ("loss", "kd_loss", "grad_norm", "xtok_kl", "xtok_one_to_one_frac"):
            assert abs(r[key] - g[key]) < 1e-4 * max(1.0, abs(r[key])), (key, r[key], g[key])


def test_online_requires_cross_tokenizer_flag_for_other_vocab(one_process):
    """Without cross_tokenizer=True an online teacher with another vocabulary is refused, with the fix named."""
    assert "cross_tokenizer=True" in one_process["refusal"]


def _module_body(rank, world, tcfg):
    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models import GPTModelConfig
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelConfig())
    try:
        model = GPTModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                               vocab_size=STUDENT_VOCAB + 128, max_position_embeddings=SEQ)
        DistillationEngine(model, DistillationLossConfig(), OptimConfig(), BatchConfig(1, 1, SEQ), 1,
                           teacher_cfg=tcfg)
    except ValueError as e:
        return str(e)
    finally:
        destroy_parallel()
    return ""


# ----------------------------------------------------------------------------- end to end


def test_tiny_cross_family_distillation_end_to_end(tmp_path):
    """BPE/ChatML teacher → SentencePiece/Llama-2 student (and the same-tokenizer runs on the same data):
    the full pipeline (teachers' SFT, stores, students, held-out metrics, PNG) runs, and the KD runs'
    loss curves fall and stay finite without spikes."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "bench_cross_tokenizer_e2e.py")
    spec = importlib.util.spec_from_file_location("bench_cross_tokenizer_e2e", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(bench)
    results = bench.run(str(tmp_path), bench.E2EConfig(**bench.TINY))
    assert os.path.getsize(tmp_path / "loss_curves.png") > 10_000
    runs = {k: v for k, v in results.items() if isinstance(v, dict) and "heldout" in v}
    assert len(runs) == 5  # BPE→BPE, BPE→SentencePiece, SentencePiece→SentencePiece, two SFT-only baselines
    runs = {k: v for k, v in runs.items() if not k.startswith("no teacher")}
    for name, r in runs.items():
        h = results["histories"][name]
        assert all(math.isfinite(x) for x in h["loss"] + h["xtok_kl"]), name
        assert r["train_loss_last10"] < 0.6 * r["train_loss_first10"], (name, r)
        assert r["train_kl_last10"] < r["train_kl_first10"], (name, r)
        half = h["loss"][len(h["loss"]) // 2:]
        assert max(half) < r["train_loss_first10"], (name, "a spike in the second half")
        held = r["heldout"]
        assert math.isfinite(held["kl_aligned"]) and held["kl_aligned"] >= 0
        assert 0 <= held["exact_match"] <= 1 and math.isfinite(held["reference_nll_per_sample"])
    cross = [v for k, v in results["extraction"].items() if k.startswith("cross")]
    assert all(0.3 < v["one_to_one"] < 1 for v in cross)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_nemo_model_cross_tokenizer_fit(env, tmp_path, mode):
    """The NeMo model class trains a SentencePiece/Llama-2 student from the BPE/ChatML teacher: from the
    cross-tokenizer store (offline) and from the co-located teacher on its own rendering (online,
    ``teacher.tokenizer``); the KD term falls and the cross-tokenizer metrics are logged."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.parallel.strategy import MegatronStrategy

    ds = dict(file_path=env["data"], tokenizer=str(env["dir"] / "s_tok"), max_seq_length=MAX_LEN, micro_batch_size=2,
              global_batch_size=4, seed=1, logits_store=str(env["dir"] / "cross") if mode == "offline" else None)
    teacher = dict(mode="offline") if mode == "offline" else dict(
        mode="online", checkpoint=env["teacher"], tokenizer=str(env["dir"] / "t_tok"), top_k=K)
    cfg = OmegaConf.create(dict(
        student=dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                     vocab_size=STUDENT_VOCAB, max_position_embeddings=128),
        teacher=teacher, kd=dict(kd_loss_weight=1.0, sft_loss_weight=0.1, topk_convention="exact_tail"),
        optim=dict(lr=1e-2, warmup_steps=1), parallel=dict(seed=3), data=dict(train_ds=ds), max_steps=8))

    rows = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    with WorldOfOne():
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MegatronStrategy(), max_steps=8,
                             use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, callbacks=[Record()], default_root_dir=str(tmp_path))
        model = GPTDistillationModel(cfg, trainer=trainer)
        trainer.fit(model)
    assert len(rows) == 8
    assert 0 < rows[-1]["xtok_one_to_one_frac"] < 1 and 0 < rows[-1]["xtok_vocab_coverage"] < 1
    kd = [r["kd_loss"] for r in rows]
    assert all(math.isfinite(x) for x in kd) and sum(kd[-2:]) < 0.8 * sum(kd[:2]), kd
