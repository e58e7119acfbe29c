"""The distillation engine: Megatron schedule + DDP + optimizer with the joint objective.

A tiny student learns from a fixed random "teacher" (top-k of its logits, offline mode)
plus SFT; the loss falls, and the same two steps at TP=2 and PP=2 match TP=1.
"""

import pytest
import torch

from dist_utils import run_distributed

SEQ, MICRO, GBS, VOCAB, K = 12, 2, 4, 256, 8  # vocab = 128·TP: no padding rows


def _cfgs():
    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models import GPTModelConfig
    from nemo_kd.models.engine import BatchConfig, OptimConfig

    model = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                           ffn_hidden_size=64, vocab_size=VOCAB, max_position_embeddings=SEQ)
    loss = DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail")
    optim = OptimConfig(lr=1e-2, warmup_steps=2, clip_grad=1.0)
    return model, loss, optim, BatchConfig(micro_batch_size=MICRO, global_batch_size=GBS, seq_length=SEQ)


def _global_batch(step):
    """Deterministic data: random sequences, a teacher that prefers token (x+1) mod V."""
    g = torch.Generator().manual_seed(100 + step % 2)  # two batches, revisited: the student can fit them
    tokens = torch.randint(0, VOCAB, (GBS, SEQ + 1), generator=g)
    mask = torch.ones(GBS, SEQ)
    mask[:, :3] = 0  # prompt positions
    mask[1, 9:] = 0  # uneven completion lengths
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    t_logits = torch.randn(GBS, SEQ, VOCAB, generator=g)
    t_logits.scatter_add_(-1, ((inputs + 1) % VOCAB)[..., None], torch.full((GBS, SEQ, 1), 6.0))
    vals, ids = t_logits.topk(K, dim=-1)
    return dict(inputs=inputs, labels=labels, loss_mask=mask, position_ids=torch.arange(SEQ).expand(GBS, SEQ),
                teacher_values=vals, teacher_ids=ids, teacher_lse=torch.logsumexp(t_logits, -1))


def _microbatches(step, dp_rank=0, dp_size=1):
    batch = _global_batch(step)
    per_rank = GBS // dp_size
    rows = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    return [{k: v[list(rows)[i:i + MICRO]] for k, v in batch.items()} for i in range(0, per_rank, MICRO)]


def _teacher_cfg():
    from nemo_kd.models import GPTModelConfig

    return GPTModelConfig(num_layers=2, hidden_size=48, num_attention_heads=4, ffn_hidden_size=96, vocab_size=VOCAB,
                          max_position_embeddings=SEQ)


def _run(rank, world, tp, pp, steps, full=None, online=False):
    """``steps`` training steps at (TP, PP, DP = world / TP·PP). ``full``: the student's (and with
    ``online``, the co-located teacher's) full weights, else this run's random ones are returned."""
    from nemo_kd.models import build_gpt_model, shard_state_dict
    from nemo_kd.models.engine import DistillationEngine
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    model_cfg, loss_cfg, optim_cfg, batch_cfg = _cfgs()
    initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=5))

    def load(module, weights, cfg):
        module.load_state_dict(shard_state_dict(weights, cfg, state.tp_rank(), tp, state.pp_rank(), pp), strict=False)

    try:
        teacher_cfg = teacher = None
        if online:
            teacher_cfg = _teacher_cfg()
            teacher = build_gpt_model(teacher_cfg)
        engine = DistillationEngine(model_cfg, loss_cfg, optim_cfg, batch_cfg, max_steps=steps,
                                    teacher_cfg=teacher_cfg, teacher_model=teacher)
        if full is None:
            full = {"student": {k: v.detach().clone() for k, v in engine.module.state_dict().items()
                                if torch.is_tensor(v)}}
            if online:
                full["teacher"] = {k: v.detach().clone() for k, v in teacher.state_dict().items() if torch.is_tensor(v)}
        load(engine.module, full["student"], model_cfg)
        if online:
            load(teacher, full["teacher"], teacher_cfg)

        def batch(step):
            mbs = _microbatches(step, state.dp_rank(), state.dp_size())
            if online:  # the teacher's logits come from the co-located model, not a store
                mbs = [{k: v for k, v in mb.items() if not k.startswith("teacher_")} for mb in mbs]
            return mbs

        history = [engine.train_step(batch(s)) for s in range(steps)]
        evals = engine.eval_step(batch(0))
        return history, evals, full
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_run, 1, 1, 1, 3)[0]


def test_loss_falls_and_terms_are_logged():
    history, evals, _ = run_distributed(_run, 1, 1, 1, 12)[0]
    first, last = history[0], history[-1]
    for m in history:
        assert abs(m["loss"] - (m["kd_loss"] + 0.5 * m["sft_loss"])) < 1e-5
    assert last["kd_loss"] < 0.7 * first["kd_loss"], (first, last)
    assert [round(m["lr"], 6) for m in history[:3]] == [0.0, 0.005, 0.01]  # linear warmup over 2 steps
    assert 0.0 <= last["token_agreement"] <= 1.0 and last["token_agreement"] > first["token_agreement"]


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_layouts_match_tp1_step_by_step(reference, tp, pp):
    ref_history, ref_eval, full = reference
    outs = run_distributed(_run, tp * pp, tp, pp, 3, full)
    history, evals, _ = outs[0]
    for ref, got in zip(ref_history, history):
        for key in ("loss", "kd_loss", "sft_loss", "grad_norm"):
            assert abs(ref[key] - got[key]) < 1e-5 * max(1.0, abs(ref[key])), (key, ref[key], got[key])
    assert abs(ref_eval["loss"] - evals["loss"]) < 1e-5


@pytest.fixture(scope="module")
def online_reference():
    """The online-mode TP=1 run both layouts repeat (one launch for the two of them)."""
    return run_distributed(_run, 1, 1, 1, 3, None, True)[0]


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_online_teacher_layouts_match_tp1(online_reference, tp, pp):
    """Online mode (co-located frozen teacher, full-vocabulary KD): the loss falls at TP=1, and
    TP=2 / PP=2 (teacher sharded alike) repeat TP=1 step by step."""
    ref_history, ref_eval, full = online_reference
    assert ref_history[-1]["kd_loss"] < ref_history[0]["kd_loss"]
    history, evals, _ = run_distributed(_run, tp * pp, tp, pp, 3, full, True)[0]
    for ref, got in zip(ref_history, history):
        for key in ("loss", "kd_loss", "sft_loss", "grad_norm"):
            assert abs(ref[key] - got[key]) < 1e-5 * max(1.0, abs(ref[key])), (key, ref[key], got[key])
    assert abs(ref_eval["loss"] - evals["loss"]) < 1e-5


@pytest.mark.distributed
def test_data_parallel_matches_tp1(reference):
    ref_history, _, full = reference
    outs = run_distributed(_run, 2, 1, 1, 3, full)
    for history, _, _ in outs:
        for ref, got in zip(ref_history, history):
            assert abs(ref["loss"] - got["loss"]) < 1e-5 and abs(ref["grad_norm"] - got["grad_norm"]) < 1e-5


def _hf_init_run(rank, world, hf_dir, batch):
    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=world))
    try:
        engine = DistillationEngine(None, DistillationLossConfig(kd_loss_weight=0.0, sft_loss_weight=1.0),
                                    OptimConfig(), BatchConfig(2, 2, batch["inputs"].shape[1]), max_steps=1,
                                    student_init_path=hf_dir)
        return engine.eval_step([batch])["loss"]
    finally:
        destroy_parallel()


@pytest.mark.distributed
def test_student_initialised_from_hf_checkpoint(tmp_path):
    """A Hugging Face student loads into the engine at TP=1 and TP=2: its SFT loss is the HF model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    model.save_pretrained(tmp_path / "hf")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 11), generator=g)
    mask = torch.ones(2, 10)
    mask[:, :4] = 0
    batch = dict(inputs=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask,
                 position_ids=torch.arange(10).expand(2, 10))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch["inputs"]).logits.double(), -1)
    ref = -(logp.gather(-1, batch["labels"][..., None])[..., 0] * mask).sum() / mask.sum()
    for world in (1, 2):
        loss = run_distributed(_hf_init_run, world, str(tmp_path / "hf"), batch)[0]
        assert abs(loss - ref.item()) < 1e-4, (world, loss, ref.item())
