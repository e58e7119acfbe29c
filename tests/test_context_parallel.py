"""Context parallelism (``parallel.context_parallel_size``): batches cut as Megatron cuts them, the objective
reduced over the CP group, the same training as without CP.

* The cut of one tensor and of a microbatch against a hand-built expectation, its inverse, and (in the
  2-process run) against Megatron's own ``get_batch_on_this_cp_rank`` on the real CP group.
* CP=2 == CP=1, step by step (loss, the metrics, the gradient norm and every parameter's reduced gradient
  over 3 steps, fp32 tolerance): offline top-k KD + SFT; preference pairs (DPKD, length-normalised, with
  KD + SFT: each sample's log-prob and length summed over the CP ranks), with the logits materialised and
  with the deferred output projection; an online teacher (its logits come out for this rank's positions)
  as the DPKD reference. The CP=1 run is DP=2 on the same two
  processes (same global batch, the production SDPA attention); the CP=2 run's attention is the exact
  reference of ``tests/cp_attention.py`` (TE's is GPU-only), and hooks show each rank attended with
  ``SEQ / 2`` queries.
* What is not supported is refused by name at construction.
"""

from dataclasses import replace

import pytest
import torch

from dist_utils import run_distributed

import test_engine as te
import test_scale_features as sf

STEPS = 3


# ------------------------------------------------------------------ the cut (one process)
def test_slicing_is_megatrons_load_balanced_chunks_and_gathers_back():
    from nemo_kd.parallel.context_parallel import gather_from_cp_ranks, positions_on_cp_rank, slice_for_cp_rank

    # by hand: S = 8 in 4 chunks of 2 (CP=2), S = 12 in 6 chunks of 2 (CP=3); rank r keeps chunks r, 2CP-1-r
    expected = {2: [[0, 1, 6, 7], [2, 3, 4, 5]], 3: [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]}
    for cp, per_rank in expected.items():
        s = 4 * cp
        rows = torch.arange(2 * s * 3).reshape(2, s, 3)  # [B, S, k], as the teacher's top-k rows
        parts = []
        for r, positions in enumerate(per_rank):
            assert positions_on_cp_rank(s, r, cp).tolist() == positions
            part = slice_for_cp_rank(rows, r, cp, dim=1)
            assert torch.equal(part, rows[:, positions]), (cp, r)
            assert torch.equal(slice_for_cp_rank(rows[..., 0], r, cp, dim=-1), rows[:, positions, 0])
            parts.append(part)
        assert torch.equal(gather_from_cp_ranks(parts, dim=1), rows)
    with pytest.raises(ValueError, match=r"dimension 1 of a \(2, 10\) tensor \(10\) must be divisible by 4"):
        slice_for_cp_rank(torch.zeros(2, 10), 0, 2)


def test_microbatch_cut_keeps_per_sample_entries_whole_and_refuses_what_it_cannot_cut():
    from nemo_kd.data.context_parallel import microbatch_on_cp_rank

    mb = te._microbatches(0)[0]
    mb.update(roles=torch.tensor([1, 2]), pair_ids=torch.tensor([0, 0]), teacher_seq_logprob=torch.tensor([-3.0, -4.0]),
              teacher_log_tail=torch.randn(te.MICRO, te.SEQ), num_tokens=torch.tensor([12, 12]))
    positions = [0, 1, 2, 9, 10, 11]  # SEQ = 12, CP = 2: chunks of 3, rank 0 keeps chunks 0 and 3
    cut = microbatch_on_cp_rank(mb, 0, 2)
    assert cut.keys() == mb.keys()
    for key in ("inputs", "labels", "loss_mask", "position_ids", "teacher_values", "teacher_ids", "teacher_lse",
                "teacher_log_tail"):
        assert torch.equal(cut[key], mb[key][:, positions]), key
    for key in ("roles", "pair_ids", "teacher_seq_logprob", "num_tokens"):
        assert cut[key] is mb[key], key
    assert microbatch_on_cp_rank(mb, 0, 1) is mb
    for extra, match in [({"segment_ids": mb["inputs"]}, r"packed rows \(microbatch key 'segment_ids'\)"),
                         ({"xtok_groups": torch.zeros(1)}, r"cross-tokenizer microbatch \(key 'xtok_groups'\)"),
                         ({"mystery": torch.zeros(2, 12)}, r"microbatch key 'mystery': context parallelism does not "
                                                           r"know")]:
        with pytest.raises(ValueError, match=match):
            microbatch_on_cp_rank({**mb, **extra}, 1, 2)


# ------------------------------------------------------------------ refusals (one process)
def test_context_parallel_refusals_name_the_key():
    from cp_attention import reference_cp_attention

    from nemo_kd.models import GPTModelConfig
    from nemo_kd.parallel import ParallelConfig

    arch = GPTModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=256)
    te_arch = replace(arch, transformer_impl="transformer_engine")
    cp2 = ParallelConfig(context_parallel_size=2)
    with pytest.raises(ValueError, match=r"context_parallel_size=2 needs transformer_impl=transformer_engine"):
        arch.validate_layout(cp2, seq_length=12)
    te_arch.validate_layout(cp2, seq_length=12)  # TE: its context-parallel attention
    with reference_cp_attention():  # a CP-capable core attention swapped into the local spec
        arch.validate_layout(cp2, seq_length=12)
    with pytest.raises(ValueError, match=r"needs transformer_impl=transformer_engine"):
        arch.validate_layout(cp2, seq_length=12)  # the swap ends with its context
    for kwargs, match in [(dict(seq_length=10), r"max_seq_length=10\) must be divisible by 4"),
                          (dict(seq_length=12, packed=True), "with packed rows"),
                          (dict(seq_length=12, cross_tokenizer=True), "with cross-tokenizer KD"),
                          (dict(seq_length=12, on_policy=True), "with on-policy sampling")]:
        with pytest.raises(ValueError, match=match):
            te_arch.validate_layout(cp2, **kwargs)
    sp = ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2, sequence_parallel=True)
    te_arch.validate_layout(sp, seq_length=16)
    with pytest.raises(ValueError, match=r"over the 2 tensor-parallel ranks .*max_seq_length=12\) must be divisible "
                                         r"by 8"):
        te_arch.validate_layout(sp, seq_length=12)
    for bad, match in [(dict(num_moe_experts=4, moe_ffn_hidden_size=32), "with an MoE student"),
                       (dict(window_size=[3, 0]), r"window_size=\[3, 0\]"),
                       (dict(softmax_type="learnable"), "softmax_type='learnable'")]:
        with pytest.raises(ValueError, match=match):
            replace(te_arch, **bad).validate_layout(cp2, seq_length=12)


# ------------------------------------------------------------------ CP=2 == CP=1 (two processes)
def _pair_batch(step):
    """test_engine's batch as two (positive, negative) pairs: rows (0, 1) and (2, 3), one a microbatch."""
    batch = te._global_batch(step)
    g = torch.Generator().manual_seed(7 + step % 2)
    batch.update(roles=torch.tensor([1, 2, 1, 2]), pair_ids=torch.tensor([0, 0, 1, 1]),
                 teacher_seq_logprob=-10.0 - 5.0 * torch.rand(te.GBS, generator=g, dtype=torch.float64))
    return batch


def _microbatches(kind, step, dp_rank, dp_size):
    batch = _pair_batch(step) if "pairs" in kind else te._global_batch(step)
    if kind == "online_pairs":  # the online teacher is the reference: no stored teacher at all
        batch = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    per_rank = te.GBS // dp_size
    rows = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
    return [{k: v[rows[i:i + te.MICRO]] for k, v in batch.items()} for i in range(0, per_rank, te.MICRO)]


LOSSES = {"kd_sft": {}, "pairs": dict(dpo_loss_weight=1.0, preference_loss_type="dpkd"),
          # the deferred output projection: the logits chunk by chunk, the pair term recomputed in backward
          "pairs_deferred": dict(dpo_loss_weight=1.0, preference_loss_type="dpkd", fuse_output_layer=True,
                                 output_layer_chunk_tokens=8),
          "online_pairs": dict(dpo_loss_weight=1.0, preference_loss_type="dpkd", sft_loss_weight=0.0)}
METRICS = ("kd_loss", "sft_loss", "preference_loss", "token_agreement", "teacher_student_kd", "preference_accuracy")


def _attention_queries(module, seen):
    from cp_attention import ReferenceCPAttention

    from nemo_kd.models.layer_spec import SDPACoreAttention

    return [m.register_forward_pre_hook(lambda mod, args: seen.add((type(mod).__name__, args[0].shape[0])))
            for m in module.modules() if isinstance(m, (SDPACoreAttention, ReferenceCPAttention))]


def _train(engine, kind):
    """STEPS steps of this rank's share of ``kind``'s batches: per step (loss, grad norm, gradients, metrics)."""
    from nemo_kd.parallel import state

    steps = []
    for s in range(STEPS):
        m = engine.train_step(_microbatches(kind, s, state.dp_rank(), state.dp_size()))
        steps.append((m["loss"], m["grad_norm"], sf._grads(engine.module), {k: m[k] for k in METRICS if k in m}))
    return steps


def _layouts(rank, world):
    """Every objective at DP=2 (CP=1) and at CP=2 from the same full weights; Megatron's cut on the CP group."""
    import contextlib

    from cp_attention import reference_cp_attention

    from megatron.core.utils import get_batch_on_this_cp_rank

    from nemo_kd.convert.checkpoint_io import build_model_chunks
    from nemo_kd.data.context_parallel import microbatch_on_cp_rank
    from nemo_kd.models import build_gpt_model
    from nemo_kd.models.engine import DistillationEngine
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    base_cfg = te._cfgs()[0]
    full = sf._full_weights(base_cfg, online=True)
    out = {"refusals": {}}
    for layout in ("dp2", "cp2"):
        cp = 2 if layout == "cp2" else 1
        initialize_parallel(ParallelConfig(seed=5, context_parallel_size=cp))
        try:
            if cp == 2:
                mb = _microbatches("pairs", 0, 0, 1)[0]
                mine = microbatch_on_cp_rank(mb, state.cp_group().rank(), 2)
                theirs = get_batch_on_this_cp_rank({k: v.clone() for k, v in mb.items() if v.dim() >= 2},
                                                   state.cp_group())
                out["megatron_cut_equal"] = all(torch.equal(mine[k], v) for k, v in theirs.items()) and \
                    theirs.keys() == {"inputs", "labels", "loss_mask", "position_ids", "teacher_values",
                                      "teacher_ids", "teacher_lse"}
                for name, build in [("sdpa", lambda: build_gpt_model(base_cfg)),
                                    ("sequence_reduction", lambda: DistillationEngine(
                                        base_cfg, replace(te._cfgs()[1], reduction="sequence"), *te._cfgs()[2:],
                                        max_steps=1))]:
                    try:
                        build()
                    except (ValueError, NotImplementedError) as e:
                        out["refusals"][name] = str(e)
            for kind, loss in LOSSES.items():
                _, loss_cfg, optim_cfg, batch_cfg = te._cfgs()
                with reference_cp_attention() if cp == 2 else contextlib.nullcontext():
                    teacher_cfg = teacher = None
                    if kind.startswith("online"):
                        teacher_cfg = sf._teacher_cfg(base_cfg)
                        teacher = build_model_chunks(teacher_cfg)
                        sf._load(teacher, full["teacher"], teacher_cfg)
                    engine = DistillationEngine(base_cfg, replace(loss_cfg, **loss), optim_cfg, batch_cfg,
                                                max_steps=STEPS, teacher_cfg=teacher_cfg, teacher_model=teacher)
                sf._load(engine.chunks, full["student"], base_cfg)
                seen = set()
                handles = _attention_queries(engine.module, seen)
                steps = _train(engine, kind)
                for h in handles:
                    h.remove()
                out[f"{kind}_{layout}"] = dict(steps=steps, attention=sorted(seen))
        finally:
            destroy_parallel()
    return out


@pytest.mark.distributed
def test_cp2_equals_cp1_step_by_step():
    runs = run_distributed(_layouts, 2)
    for rank, r in enumerate(runs):
        assert r["megatron_cut_equal"], rank
        assert "SDPACoreAttention attends within this rank's positions" in r["refusals"]["sdpa"]
        assert "kd.reduction='sequence' with parallel.context_parallel_size=2" in r["refusals"]["sequence_reduction"]
        for kind in LOSSES:
            cp2, dp2 = r[f"{kind}_cp2"], r[f"{kind}_dp2"]
            # CP really cut the rows: each rank's attention read SEQ / 2 queries (the reference CP attention)
            assert cp2["attention"] == [("ReferenceCPAttention", te.SEQ // 2)], cp2["attention"]
            assert dp2["attention"] == [("SDPACoreAttention", te.SEQ)], dp2["attention"]
            sf._assert_same(r, f"{kind}_cp2", f"{kind}_dp2", f"rank {rank}")
            for a, b in zip(cp2["steps"], dp2["steps"]):
                assert a[3].keys() == b[3].keys(), (kind, a[3].keys(), b[3].keys())
                for key in a[3]:
                    assert abs(a[3][key] - b[3][key]) < 1e-5, (kind, key, a[3][key], b[3][key])
            names = set(dp2["steps"][0][3])
            assert {"kd_loss", "token_agreement"} <= names
            if "pairs" in kind:
                assert {"preference_loss", "preference_accuracy"} <= names
                assert all(s[3]["preference_loss"] > 0 for s in dp2["steps"])


def test_nemo_model_refuses_what_context_parallelism_cannot_cut_at_construction():
    """GPTDistillationModel passes the run's packed / on-policy settings to the layout check, so the
    refusal comes at construction (before any data is read: the paths do not exist)."""
    from cp_attention import reference_cp_attention
    from omegaconf import OmegaConf

    from nemo_kd.models.distillation_model import GPTDistillationModel

    student = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=256, max_position_embeddings=64)
    ds = dict(file_path="/nonexistent/train.jsonl", tokenizer="/nonexistent/tok", max_seq_length=32,
              micro_batch_size=1, global_batch_size=2, pack_sequences=True)
    base = dict(student=student, teacher=dict(mode="none"), kd=dict(kd_loss_weight=0.0, sft_loss_weight=1.0),
                parallel=dict(context_parallel_size=2))
    cases = [(dict(data=dict(train_ds=ds)), r"context_parallel_size=2 with packed rows"),
             (dict(data=dict(train_ds={**ds, "pack_sequences": False}), on_policy=dict(fraction=0.5),
                   teacher=dict(mode="online", checkpoint="/nonexistent/teacher")),
              r"context_parallel_size=2 with on-policy sampling")]
    for extra, match in cases:
        with reference_cp_attention(), pytest.raises(ValueError, match=match):
            GPTDistillationModel(OmegaConf.create({**base, **extra}))


def _model_parallel_layouts(rank, world):
    """CP=2 beside PP=2 and beside TP=2 with sequence parallelism (4 processes), each against DP=2 in
    its place, from the same full weights: the pipeline's p2p shapes and the SP cut of each CP chunk."""
    import contextlib

    from cp_attention import reference_cp_attention

    from nemo_kd.models.engine import DistillationEngine
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    base_cfg = replace(te._cfgs()[0], num_layers=2)
    full = sf._full_weights(base_cfg, online=False)
    out = {}
    for name, seq, par in [("pp2_dp2", 12, dict(pipeline_model_parallel_size=2)),
                           ("pp2_cp2", 12, dict(pipeline_model_parallel_size=2, context_parallel_size=2)),
                           ("tp2_dp2", 16, dict(tensor_model_parallel_size=2)),
                           ("tp2sp_cp2", 16, dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                                  context_parallel_size=2))]:
        te.SEQ = seq
        initialize_parallel(ParallelConfig(seed=5, **par))
        try:
            _, loss_cfg, optim_cfg, batch_cfg = te._cfgs()
            cp = par.get("context_parallel_size", 1)
            with reference_cp_attention() if cp > 1 else contextlib.nullcontext():
                engine = DistillationEngine(base_cfg, replace(loss_cfg, **LOSSES["pairs"]), optim_cfg, batch_cfg,
                                            max_steps=STEPS)
            sf._load(engine.chunks, full["student"], base_cfg)
            out[name] = dict(steps=_train(engine, "pairs"))
        finally:
            destroy_parallel()
    return out


@pytest.mark.distributed
def test_cp2_with_pipeline_and_sequence_parallel_equals_dp2():
    runs = run_distributed(_model_parallel_layouts, 4)
    for rank, r in enumerate(runs):
        for cp2, dp2 in [("pp2_cp2", "pp2_dp2"), ("tp2sp_cp2", "tp2_dp2")]:
            sf._assert_same(r, cp2, dp2, f"rank {rank}")
            for a, b in zip(r[cp2]["steps"], r[dp2]["steps"]):
                assert a[3].keys() == b[3].keys() and {"kd_loss", "preference_loss"} <= a[3].keys()
                for key in a[3]:
                    assert abs(a[3][key] - b[3][key]) < 1e-5, (cp2, key, a[3][key], b[3][key])
