"""Sequence packing (nemo_kd.data.packing): the plan, the rows, and packed == padded training.

The reference for packed rows is the padded layout of the same samples (one sample per row):
Megatron's schedule, DDP and optimizer run both, and loss, terms, gradient norm and the
updated weights must agree step by step (offline top-k KD + SFT and an online teacher; TP=1,
TP=2, PP=2). The plan is checked against first-fit decreasing done by hand.
"""

import numpy as np
import pytest
import torch

from dist_utils import run_distributed

SEQ, VOCAB, K = 24, 256, 6
LENGTHS = [7, 19, 5, 12, 9, 16, 6, 11]  # tokens per sample (positions packed: n − 1)
PAIR_LENGTHS = [7, 5, 12, 9, 19, 6, 6, 5]  # preference pairs (0, 1), (2, 3), ...: positions 10, 19, 23, 9


# ----------------------------------------------------------------------------- the plan


def test_pack_plan_is_first_fit_decreasing_per_window():
    from nemo_kd.data.packing import pack_plan

    # window 1 (in order): lengths 10 4 7 3 9 -> sorted 10 9 7 4 3 into rows of 16:
    # 10 -> r0 (6 left), 9 -> r1 (7), 7 -> r1 (0), 4 -> r0 (2), 3 -> r2; window 2: 8 8 -> one row
    lengths = [10, 4, 7, 3, 9, 8, 8]
    assert pack_plan(lengths, 16, window=5, shuffle=False) == [[0, 1], [4, 2], [3], [5, 6]]
    # one window: FFD over all: 10 9 8 8 7 4 3 -> [10 4] [9 7] [8 8] [3]... (10→r0, 9→r1, 8→r2, 8→r2 (0 left),
    # 7→r1 (0 left), 4→r0 (2 left), 3→r3)
    assert pack_plan(lengths, 16, window=100, shuffle=False) == [[0, 1], [4, 2], [5, 6], [3]]
    rng = np.random.default_rng(0)
    many = rng.integers(1, 60, size=500).tolist()
    plan = pack_plan(many, 64, window=50, seed=3)
    assert plan == pack_plan(many, 64, window=50, seed=3)  # deterministic
    assert sorted(i for p in plan for i in p) == list(range(500))  # every sample exactly once
    assert all(sum(many[i] for i in p) <= 64 for p in plan)
    assert plan != pack_plan(many, 64, window=50, seed=4)
    with pytest.raises(ValueError, match=r"sample 2 needs 70 positions, more than the row length 64"):
        pack_plan([3, 4, 70], 64)


def _samples(n_samples=len(LENGTHS), with_teacher=True, seed=0, pairs=False):
    """``pairs``: samples ``2p`` (chosen) and ``2p + 1`` (rejected) form preference pair ``p``."""
    from nemo_kd.data.kd_dataset import DistillationSample
    from nemo_kd.data.records import ROLE_CHOSEN, ROLE_REJECTED, ROLE_SINGLE
    from nemo_kd.teacher.store import TeacherTopK

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_samples):
        n = (PAIR_LENGTHS if pairs else LENGTHS)[i % len(LENGTHS)]
        ids = torch.randint(0, VOCAB, (n,), generator=g).numpy()
        mask = np.zeros(n, dtype=np.int8)
        mask[3:] = 1  # 3 prompt tokens
        teacher = None
        if with_teacher:
            m = int(mask.sum())
            z = torch.randn(m, VOCAB, generator=g) * 2
            vals, tid = z.topk(K, dim=-1)
            teacher = TeacherTopK(i, vals, tid, torch.logsumexp(z, -1), -3.0 * float(i) - 20.0)
        role = (ROLE_REJECTED if i % 2 else ROLE_CHOSEN) if pairs else ROLE_SINGLE
        out.append(DistillationSample(i, ids, mask, teacher, role=role, pair=i // 2 if pairs else -1))
    return out


class _Kept:
    """The part of a DistillationDataset that PackedDataset reads: kept samples, pairs or not."""

    def __init__(self, samples, pairs):
        self.samples, self.valid_indices = samples, list(range(len(samples)))
        self.group_size, self.cross_tokenizer, self.store = (2 if pairs else 1), False, None

    def __getitem__(self, i):
        return self.samples[self.valid_indices[i]]


def _pack(samples, pairs=False, seq=SEQ):
    from nemo_kd.data.packing import PackedDataset

    ds = PackedDataset(_Kept(samples, pairs), seq, shuffle=False)
    return ds.packs, [ds[p] for p in range(len(ds))]


def test_packed_rows_hold_each_sample_as_its_padded_row_does():
    """Sample by sample, a packed row's positions hold what the padded row holds at 0..n−2."""
    from nemo_kd.data.kd_dataset import collate
    from nemo_kd.data.packing import collate_packed, pack_plan, packed_attention_mask, sample_positions

    samples = _samples()
    plan = pack_plan([sample_positions(len(s.input_ids)) for s in samples], SEQ, shuffle=False)
    packed = collate_packed([[samples[i] for i in p] for p in plan], SEQ, pad_id=0)
    padded = collate(samples, SEQ, pad_id=0)
    assert packed["inputs"].shape == (len(plan), SEQ) and len(plan) < len(samples)
    assert packed["num_tokens"].sum() == padded["num_tokens"].sum() == sum(LENGTHS)
    for row, p in enumerate(plan):
        o = 0
        for j, i in enumerate(p):
            n = len(samples[i].input_ids) - 1
            sl = slice(o, o + n)
            for key in ("inputs", "labels", "loss_mask", "teacher_values", "teacher_ids", "teacher_lse"):
                assert torch.equal(packed[key][row, sl], padded[key][i, :n]), key
            assert torch.equal(packed["position_ids"][row, sl], torch.arange(n))
            assert (packed["segment_ids"][row, sl] == j).all()
            o += n
        assert (packed["segment_ids"][row, o:] == -1).all() and (packed["loss_mask"][row, o:] == 0).all()
    mask = packed_attention_mask(packed["segment_ids"])
    assert mask.shape == (len(plan), 1, SEQ, SEQ) and mask.dtype == torch.bool
    seg = packed["segment_ids"][0]
    assert torch.equal(~mask[0, 0], seg[:, None] == seg[None, :])


def test_preference_pairs_are_packed_whole_and_their_per_sample_fields_follow_them():
    """Both sides of a pair share a row, in order; roles, pair ids and the teacher's sequence log-probs are
    one a sample (``sample_of_position`` names each position's sample); the objective's per-sample
    sequence log-probs equal the padded rows' (float64)."""
    from nemo_kd.data.kd_dataset import collate
    from nemo_kd.data.packing import collate_packed
    from nemo_kd.losses.objective import ObjectiveBatch

    samples = _samples(pairs=True)
    plan, packs = _pack(samples, pairs=True)
    # pairs' positions 6+4=10, 11+8=19, 18+5=23, 5+4=9 in rows of 24: FFD -> [2] [1] [0, 3]
    assert plan == [[4, 5], [2, 3], [0, 1, 6, 7]]
    packed = collate_packed(packs, SEQ, pad_id=0)
    padded = collate(samples, SEQ, pad_id=0)
    order = [i for p in plan for i in p]
    assert packed["roles"].tolist() == padded["roles"][order].tolist() == [1, 2, 1, 2, 1, 2, 1, 2]
    assert packed["pair_ids"].tolist() == [2, 2, 1, 1, 0, 0, 3, 3]
    assert torch.equal(packed["teacher_seq_logprob"], padded["teacher_seq_logprob"][order])
    assert packed["sample_of_position"][2, :6].eq(4).all() and packed["sample_of_position"][2, 6:10].eq(5).all()
    assert packed["sample_of_position"][2].max() == 7 and packed["sample_of_position"][2, 19:].eq(-1).all()
    g = torch.Generator().manual_seed(0)
    token_lp = -torch.rand(len(samples), SEQ, generator=g, dtype=torch.float64)  # per padded position
    packed_lp = torch.zeros(len(plan), SEQ, dtype=torch.float64)
    for row, p in enumerate(plan):
        o = 0
        for i in p:
            n = len(samples[i].input_ids) - 1
            packed_lp[row, o:o + n] = token_lp[i, :n]
            o += n
    ref = ObjectiveBatch(padded["labels"], padded["loss_mask"]).sequence_logprobs(token_lp)
    got = ObjectiveBatch(packed["labels"], packed["loss_mask"], samples=packed["sample_of_position"]) \
        .sequence_logprobs(packed_lp)
    hand = [float((token_lp[i] * padded["loss_mask"][i].double()).sum()) for i in order]
    assert torch.allclose(got.sum, torch.tensor(hand, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(got.sum, ref.sum[order], rtol=0, atol=1e-12)
    assert torch.equal(got.length, ref.length[order]) and got.length.tolist()[:2] == [16, 3]


def test_what_is_not_packed_is_refused_with_the_reason():
    from nemo_kd.data.kd_dataset import collate_rows
    from nemo_kd.data.packing import PackedDataset

    with pytest.raises(ValueError, match=r"preference pair 2 \(samples 4, 5\) needs 23 positions, more than the "
                                         r"row length 20: both sides of a pair share a row"):
        PackedDataset(_Kept(_samples(pairs=True), pairs=True), 20)
    a, b = _samples(2)
    with pytest.raises(ValueError, match=r"packed row 0: its samples need more than seq_length = 20 positions"):
        collate_rows([[a, b]], 20, 0, packed=True)  # 6 + 18 positions


# ----------------------------------------------------------------------------- packed == padded training


def _engine_run(rank, world, tp, pp, packed, online, steps, full=None, pairs=False):
    from nemo_kd.data.kd_dataset import collate
    from nemo_kd.data.packing import collate_packed
    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models import GPTModelConfig, build_gpt_model, shard_state_dict
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    samples = _samples(with_teacher=not online, pairs=pairs)
    if packed:
        plan, packs = _pack(samples, pairs)
        mbs = [collate_packed([pack], SEQ, 0) for pack in packs]  # one row per microbatch
        batch_cfg = BatchConfig(micro_batch_size=1, global_batch_size=len(plan), seq_length=SEQ)
    else:
        mbs = [collate(samples[i:i + 2], SEQ, 0) for i in range(0, len(samples), 2)]
        batch_cfg = BatchConfig(micro_batch_size=2, global_batch_size=len(samples), seq_length=SEQ)
    model_cfg = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=64, vocab_size=VOCAB, max_position_embeddings=SEQ,
                               position_embedding_type="rope")
    teacher_cfg = GPTModelConfig(num_layers=2, hidden_size=48, num_attention_heads=4, ffn_hidden_size=96,
                                 vocab_size=VOCAB, max_position_embeddings=SEQ, position_embedding_type="rope") \
        if online else None
    loss_cfg = DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail",
                                      kd_loss_type="forward_kl" if not online else "jsd")
    if pairs:  # DPKD with the teacher as reference (stored or online), role-weighted KD, SFT on chosen only
        loss_cfg = DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail",
                                          kd_loss_type="forward_kl" if not online else "jsd", dpo_loss_weight=0.7,
                                          preference_loss_type="dpkd", positive_kd_weight=1.0,
                                          negative_kd_weight=0.3)
    initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=5))
    try:
        teacher = build_gpt_model(teacher_cfg) if online else None
        engine = DistillationEngine(model_cfg, loss_cfg, OptimConfig(lr=1e-2, warmup_steps=0, clip_grad=1.0),
                                    batch_cfg, max_steps=steps, teacher_cfg=teacher_cfg, teacher_model=teacher)
        if full is None:
            full = {"student": {k: v.detach().clone() for k, v in engine.module.state_dict().items()
                                if torch.is_tensor(v)}}
            if online:
                full["teacher"] = {k: v.detach().clone() for k, v in teacher.state_dict().items() if torch.is_tensor(v)}

        def load(module, weights, cfg):
            module.load_state_dict(shard_state_dict(weights, cfg, state.tp_rank(), tp, state.pp_rank(), pp),
                                   strict=False)

        load(engine.module, full["student"], model_cfg)
        if online:
            load(teacher, full["teacher"], teacher_cfg)
        history = [engine.train_step([dict(mb) for mb in mbs]) for _ in range(steps)]
        return history, engine.eval_step([dict(mb) for mb in mbs]), full
    finally:
        destroy_parallel()


KEYS = ("loss", "kd_loss", "sft_loss", "grad_norm", "token_agreement", "kd_tokens", "teacher_student_kd",
        "preference_loss", "preference_accuracy")


def _same(ref, got, tol=2e-5):
    for r, g in zip(ref, got):
        for key in KEYS:
            if key in r:
                assert abs(r[key] - g[key]) <= tol * max(1.0, abs(r[key])), (key, r[key], g[key])


@pytest.mark.distributed
@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
def test_packed_equals_padded_step_by_step(online):
    """Three optimizer steps on the same 8 samples, padded (8 rows) and packed (fewer rows):
    same loss, KD and SFT terms, token agreement, KD token count and gradient norm each step
    (so the same updates), at TP=1; then packed at TP=2 and PP=2 against the same reference."""
    ref_history, ref_eval, full = run_distributed(_engine_run, 1, 1, 1, False, online, 3)[0]
    assert ref_history[-1]["loss"] < ref_history[0]["loss"]
    history, evals, _ = run_distributed(_engine_run, 1, 1, 1, True, online, 3, full)[0]
    _same(ref_history, history)
    _same([ref_eval], [evals])
    for tp, pp in ((2, 1), (1, 2)):
        history, evals, _ = run_distributed(_engine_run, tp * pp, tp, pp, True, online, 3, full)[0]
        _same(ref_history, history)


@pytest.mark.distributed
@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
def test_packed_preference_pairs_equal_padded_step_by_step(online):
    """Preference pairs (DPKD against the stored / online teacher's sequence log-probs, KD weighted by
    role, SFT on the chosen side): 8 samples = 4 pairs, padded (a pair per microbatch of 2 rows) and
    packed (whole pairs in 3 rows, 2 pairs in one): same loss, terms, preference accuracy,
    gradient norm, three steps; packed at TP=2 and PP=2 too."""
    ref_history, ref_eval, full = run_distributed(_engine_run, 1, 1, 1, False, online, 3, None, True)[0]
    assert ref_history[0]["preference_loss"] > 0 and "preference_accuracy" in ref_history[0]
    assert ref_history[-1]["loss"] < ref_history[0]["loss"]
    history, evals, _ = run_distributed(_engine_run, 1, 1, 1, True, online, 3, full, True)[0]
    _same(ref_history, history)
    _same([ref_eval], [evals])
    for tp, pp in ((2, 1), (1, 2)):
        history, _, _ = run_distributed(_engine_run, tp * pp, tp, pp, True, online, 3, full, True)[0]
        _same(ref_history, history)


# ----------------------------------------------------------------------------- cross-tokenizer

# module-scoped: tokenizers, teacher, v2 stores. It starts a world of one, so this section runs before the
# in-process recipe tests below (they leave Megatron's parallel state set up).
from test_align_training import env  # noqa: E402,F401


def _xtok_run(rank, world, tp, steps, microbatches, rows_per_mb, full, teacher_dir=None, tcfg=None, pp=1):
    """``steps`` optimizer steps on one global batch (``microbatches``), the test_align_training student
    (RoPE: rows of any length up to two samples' ``SEQ``)."""
    from test_align_training import SEQ as XSEQ, STUDENT_VOCAB

    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models import GPTModelConfig, shard_state_dict
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    model = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                           ffn_hidden_size=64, vocab_size=STUDENT_VOCAB, max_position_embeddings=2 * XSEQ,
                           position_embedding_type="rope")
    loss = DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail")
    batch = BatchConfig(micro_batch_size=rows_per_mb, global_batch_size=rows_per_mb * len(microbatches),
                        seq_length=microbatches[0]["inputs"].shape[1])
    initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=7))
    try:
        teacher_model = None
        if teacher_dir:
            from nemo_kd.teacher.teachers import load_full_checkpoint

            teacher_model, _ = load_full_checkpoint(teacher_dir, state.tp_rank(), tp, state.pp_rank(), pp)
        engine = DistillationEngine(model, loss, OptimConfig(lr=3e-3, clip_grad=1.0), batch, max_steps=steps,
                                    teacher_cfg=tcfg if teacher_dir else None, teacher_model=teacher_model,
                                    cross_tokenizer=bool(teacher_dir))
        if full is None:
            full = {k: v.detach().clone() for k, v in engine.module.state_dict().items() if torch.is_tensor(v)}
        engine.module.load_state_dict(shard_state_dict(full, model, state.tp_rank(), tp, state.pp_rank(), pp),
                                      strict=False)
        return [engine.train_step([dict(mb) for mb in microbatches]) for _ in range(steps)], full
    finally:
        destroy_parallel()


XTOK_KEYS = ("loss", "kd_loss", "sft_loss", "grad_norm", "xtok_kl", "xtok_one_to_one_frac", "token_agreement")


@pytest.mark.distributed
@pytest.mark.parametrize("online", [False, True], ids=["offline_store", "online_teacher"])
def test_packed_cross_tokenizer_equals_padded_step_by_step(env, online):  # noqa: F811
    """Cross-tokenizer KD (SentencePiece student, byte-level BPE teacher; the v2 store, or the teacher
    online on its own renderings packed into the same rows): 8 samples packed (rows of 2·SEQ, 2 samples a
    row, one row a microbatch) and padded (the same samples, a row of SEQ each, 2 rows a microbatch): the same loss, KD / SFT terms,
    cross-tokenizer KL and one-to-one fraction, token agreement and gradient norm, three steps; packed at TP=2
    and PP=2 too."""
    from test_align_training import SEQ as XSEQ, _dataset

    from nemo_kd.data.kd_dataset import collate
    from nemo_kd.data.packing import PackedDataset, collate_packed

    ds = _dataset(env, None if online else "cross", student="s_tok", online=online)
    rows = PackedDataset(ds, 2 * XSEQ, shuffle=False)
    packed = [collate_packed([rows[p]], 2 * XSEQ, 0) for p in range(len(rows))]
    assert len(ds) == 8 and len(rows) == 4 and min(len(p) for p in rows.packs) == 2, rows.packs  # 2 a row
    # the padded microbatches hold the packs' samples (a row each): the engine weighs each microbatch's
    # cross-tokenizer token agreement (a fraction of its one-to-one tokens) by its KD tokens, so that
    # metric depends on how samples are grouped into microbatches, packed or not
    padded = [collate(rows[p], XSEQ, 0) for p in range(len(rows))]
    if online:
        mb = packed[0]
        assert "xtok_teacher_segment_ids" in mb and mb["xtok_teacher_inputs"].shape == mb["inputs"].shape
        # the teacher's renderings restart their positions per sample, as the student's
        assert (mb["xtok_teacher_position_ids"][0] == 0).sum() == len(rows.packs[0]) + \
            int((mb["xtok_teacher_segment_ids"][0] == -1).sum())
    teacher = (env["teacher"], env["tcfg"]) if online else (None, None)
    ref, full = run_distributed(_xtok_run, 1, 1, 3, padded, 2, None, *teacher)[0]
    assert ref[-1]["loss"] < ref[0]["loss"] and ref[0]["xtok_kl"] > 0
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        got, _ = run_distributed(_xtok_run, tp * pp, tp, 3, packed, 1, full, *teacher, pp)[0]
        for r, g in zip(ref, got):
            for key in XTOK_KEYS:
                assert abs(r[key] - g[key]) <= 2e-5 * max(1.0, abs(r[key])), (tp, pp, key, r[key], g[key])


# ----------------------------------------------------------------------------- the recipe: packed, preempted, resumed

from test_distillation_model import world  # noqa: E402,F401  (the module-scoped assets fixture)


def test_packed_recipe_resumed_mid_epoch_continues_with_the_same_packs(world, tmp_path, monkeypatch, caplog):  # noqa: F811
    """``model.data.train_ds.pack_sequences=true`` through examples/train_gpt_kd.py: the log names the
    packing, the rows hold several samples, and a run preempted in the middle of a packed epoch and
    resumed ends with weights bit-identical to an uninterrupted run (the packs and their order are
    the same after the restart)."""
    import logging
    import os
    import signal

    from test_training_run import _as_a_new_process, _nemo_weights, _recipe, _run_cfg

    from nemo_kd.data.packing import PackedDataset
    from nemo_kd.training.preemption import PreemptionCheckpoint

    def cfg(log_dir, resume=False):
        c = _run_cfg(world, log_dir, steps=6, every=2, resume=resume)
        c.model.data.train_ds.pack_sequences = True
        c.model.data.train_ds.pack_length = 64  # rows of 64, samples of at most 40
        c.model.data.train_ds.micro_batch_size = 1
        c.model.data.train_ds.global_batch_size = 2
        return c

    main = _recipe()
    seen = []
    original = PackedDataset.__getitem__
    monkeypatch.setattr(PackedDataset, "__getitem__", lambda self, p: seen.append(p) or original(self, p))
    _as_a_new_process()
    with caplog.at_level(logging.INFO):
        main(cfg(tmp_path / "full"))
    import re

    n_samples, n_rows = map(int, re.search(r"(\d+) samples packed into (\d+) rows", caplog.text).groups())
    assert n_samples == 16 and 4 <= n_rows < 12  # several samples a row (rows of 40 tokens)
    reference = _nemo_weights(str(tmp_path / "full" / "student.nemo"))
    full_order = list(seen)
    assert len(full_order) == 12  # 6 steps × 2 rows

    def stop_at_step_3(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    seen.clear()
    with monkeypatch.context() as m:
        m.setattr(PreemptionCheckpoint, "on_train_batch_start", stop_at_step_3, raising=False)
        _as_a_new_process()
        main(cfg(tmp_path / "part"))
    assert not (tmp_path / "part" / "student.nemo").exists()
    _as_a_new_process()
    main(cfg(tmp_path / "part", resume=True))
    # the rows trained after the restart are the uninterrupted run's rows from step 4 on
    assert seen[-6:] == full_order[-6:], (seen, full_order)
    resumed = _nemo_weights(str(tmp_path / "part" / "student.nemo"))
    for key, value in reference.items():
        if torch.is_tensor(value):
            assert torch.equal(resumed[key], value), key


def test_pair_file_packed_through_the_model_keeps_pairs_whole(world, tmp_path):  # noqa: F811
    """A real pair file (compute_topk_logits store) through GPTDistillationModel with pack_sequences: every
    row holds whole pairs, chosen then rejected, each pair once an epoch; the per-sample roles, pair ids and
    the teacher's sequence log-probs equal the padded model's for the same pair."""
    import json

    from test_distillation_model import K as DK, MAX_LEN, N, _cfg
    from transformers import AutoTokenizer

    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher

    pairs = str(tmp_path / "pairs.jsonl")
    with open(pairs, "w") as f:
        for i in range(N // 2):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"what is {i} plus {i * 3}?",
                                "chosen": f"{i + i * 3} because adding numbers",
                                "rejected": "numbers" + " adding" * (1 + i % 3)}) + "\n")
    store = str(tmp_path / "pair_store")
    compute_topk_logits(ExtractConfig(data_path=pairs, output_path=store, top_k=DK, max_seq_length=MAX_LEN,
                                      values_dtype="float32", batch_size=4, progress=False),
                        MegatronTeacher(world["teacher"]), AutoTokenizer.from_pretrained(world["tok_dir"]))
    over = {"data.train_ds.file_path": pairs, "data.train_ds.logits_store": store, "data.validation_ds": None,
            "kd.dpo_loss_weight": 1.0, "kd.preference_loss_type": "dpkd", "max_steps": 2}

    def per_pair(model):
        out = {}
        for step in model._train_dl:
            for mb in step:
                for g, (role, pair) in enumerate(zip(mb["roles"].tolist(), mb["pair_ids"].tolist())):
                    out.setdefault(pair, {})[role] = float(mb["teacher_seq_logprob"][g])
        return out

    padded = per_pair(GPTDistillationModel(_cfg(world, **over)))
    model = GPTDistillationModel(_cfg(world, **over, **{"data.train_ds.pack_sequences": True,
                                                        "data.train_ds.pack_length": 160,
                                                        "student.max_position_embeddings": 160,
                                                        "data.train_ds.micro_batch_size": 1,
                                                        "data.train_ds.global_batch_size": 1}))
    seen, most = [], 0
    for step in model._train_dl:
        for mb in step:
            sample = mb["sample_of_position"]
            n = int(sample.max()) + 1
            assert n % 2 == 0 and mb["roles"].tolist() == [1, 2] * (n // 2)  # whole pairs, chosen first
            most = max(most, n)
            ids = mb["pair_ids"].tolist()
            assert ids[0::2] == ids[1::2]
            seen += ids[0::2]
            # a sample's positions are one run, in order
            runs = sample[0][sample[0] >= 0]
            assert torch.equal(runs, runs.sort().values) and runs.unique().numel() == n
    assert sorted(seen) == list(range(N // 2))  # each pair once (global batch of one row: nothing dropped)
    assert most >= 4  # pairs share rows
    assert per_pair(model) == padded


# ----------------------------------------------------------------------------- online cross-tokenizer: the longer rendering


def test_online_teacher_rendering_longer_than_the_students_is_packed_whole_or_refused_by_name(tmp_path):
    """Online cross-tokenizer KD with pack_sequences, the teacher's own rendering longer than the student's
    (the same SentencePiece vocabulary, the student plain, the teacher in the Llama-2 chat template: 32 more
    tokens a sample). Packing by the student's positions alone would overflow the teacher's row: collate
    refuses that row naming the sample (never cutting a rendering); PackedDataset plans by the longer rendering,
    so every row holds every sample's two renderings whole, each teacher target read at the position after its
    previous token; a sample whose teacher rendering alone exceeds the row is refused naming it."""
    import re

    from test_align_store import CORPUS, write_data

    from nemo_kd.data import read_records
    from nemo_kd.data.kd_dataset import DataConfigError, DistillationDataset
    from nemo_kd.data.packing import PackedDataset, collate_packed, pack_plan, sample_positions
    from nemo_kd.data.sentencepiece_builder import train_sentencepiece_unigram
    from nemo_kd.data.tokenization import ConversationTokenizer

    sp = train_sentencepiece_unigram(CORPUS, vocab_size=400, save_dir=str(tmp_path / "tok"))
    data = str(tmp_path / "data.jsonl")
    write_data(data, n=5)
    ds = DistillationDataset(read_records(data), ConversationTokenizer(sp, "plain", 96), k=4,
                             teacher_tokenizer=ConversationTokenizer(sp, "chat", 96))
    samples = [ds[i] for i in range(len(ds))]
    s_pos = [sample_positions(len(s.input_ids)) for s in samples]
    t_pos = [sample_positions(len(s.xtok.teacher_input_ids)) for s in samples]
    assert all(t >= s + 20 for s, t in zip(s_pos, t_pos)), (s_pos, t_pos)
    seq = 150
    by_student = pack_plan(s_pos, seq, shuffle=False)
    over = [row for row in by_student if sum(t_pos[i] for i in row) > seq]
    assert over, (by_student, t_pos)
    with pytest.raises(DataConfigError, match=r"the teacher's renderings of its samples need more than seq_length = "
                                              r"150 positions \(sample \d\)"):
        collate_packed([[samples[i] for i in over[0]]], seq, 0)

    rows = PackedDataset(ds, seq, shuffle=False)
    assert rows.packs == pack_plan([max(s, t) for s, t in zip(s_pos, t_pos)], seq, shuffle=False)
    assert len(rows.packs) > len(by_student) and max(len(p) for p in rows.packs) >= 2
    for p in range(len(rows)):
        mb = collate_packed([rows[p]], seq, 0)
        t_in, t_seg = mb["xtok_teacher_inputs"][0], mb["xtok_teacher_segment_ids"][0]
        for j, smp in enumerate(rows[p]):
            t_all = torch.from_numpy(smp.xtok.teacher_input_ids)
            assert torch.equal(t_in[t_seg == j], t_all[:-1])  # the whole rendering, its last token a target only
            assert torch.equal(mb["inputs"][0][mb["segment_ids"][0] == j], torch.from_numpy(smp.input_ids[:-1]))
        # each teacher target is predicted at the position holding the token before it in its own rendering
        before = torch.cat([torch.from_numpy(s.xtok.teacher_input_ids[-len(s.xtok.teacher_completion_ids) - 1:-1])
                            for s in rows[p]])
        assert torch.equal(mb["xtok_teacher_inputs"].reshape(-1)[mb["xtok_teacher_logit_rows"]], before)
        assert torch.equal(mb["xtok_teacher_targets"],
                           torch.cat([torch.from_numpy(s.xtok.teacher_completion_ids) for s in rows[p]]))

    # a row the student's rendering fits but the teacher's does not: refused naming the sample and its file line
    with pytest.raises(DataConfigError, match=rf"sample 0 \({re.escape(data)}:1\): the online teacher's own rendering needs "
                                              rf"{t_pos[0]} positions \(the student's {s_pos[0]}\), more than the row "
                                              r"length 60"):
        PackedDataset(ds, 60, shuffle=False)
    assert max(s_pos) <= 60 < min(t_pos)
