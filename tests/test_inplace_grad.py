"""In-place logits gradient (``DistillationLossConfig.inplace_logits_grad``, issue 7).

With in-place on, the loss's ``∂L/∂logits`` is written over the logits' own storage: the
loss value, the gradients and a Megatron training step must be *bit-identical* to the
separate-buffer path, and the gradient that reaches the output layer must live in the
logits' storage (``data_ptr`` identity — fails if the mechanism is off). Configurations
with two autograd readers of the logits fall back (with a warning) and stay correct;
another autograd reader of overwritten logits fails loudly.

Fused cases run the Triton kernels through the CPU interpreter (``TRITON_INTERPRET=1``,
conftest.py); sizes are tiny.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dist_utils import run_distributed  # noqa: E402
from nemo_kd.losses.kd import KDSettings, full_kd_loss, topk_kd_loss  # noqa: E402
from nemo_kd.losses.objective import (  # noqa: E402
    ROLE_NEGATIVE,
    ROLE_POSITIVE,
    ROLE_SINGLE,
    DistillationLossConfig,
    DistillationObjective,
    FullTeacher,
    ObjectiveBatch,
    TopKTeacher,
    objective_normalisers,
)
from nemo_kd.losses.vocab_parallel import vocab_parallel_logprobs_at  # noqa: E402

# Masked lanes of the interpreted kernels evaluate -inf - -inf / log(0) inside where-guarded branches.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

B, T, V, K = 4, 5, 67, 6


def _triton():
    pytest.importorskip("triton", reason="triton is not importable: the fused kernels cannot be tested")


def _batch(online=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    t_logits = (logits.float() + torch.randn(B, T, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    mask[:, 0] = 1
    vals, ids = t_logits.float().topk(K, dim=-1)
    teacher = FullTeacher(t_logits) if online else TopKTeacher(vals, ids, torch.logsumexp(t_logits.float(), -1))
    roles = torch.tensor([ROLE_SINGLE, ROLE_POSITIVE, ROLE_NEGATIVE, ROLE_SINGLE])
    pairs = torch.tensor([-1, 0, 0, -1])
    t_seq = torch.randn(B, generator=g) - 8
    return logits, ObjectiveBatch(labels, mask, teacher, roles, pairs, t_seq)


def _step(cfg, logits, batch):
    """Loss, d loss / d leaf, and whether the gradient entering the lm_head side lives in the logits."""
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1  # non-leaf, as an output layer's logits
    seen = {}
    x.register_hook(lambda g: seen.__setitem__("ptr", g.data_ptr()))
    objective = DistillationObjective(cfg)
    out = objective(x, batch, objective_normalisers(cfg, [batch]))
    out.loss.backward()
    return out.loss.detach(), leaf.grad, seen["ptr"] == x.data_ptr(), out.metrics


CASES = {  # name: (loss config, online teacher)
    "topk_renorm_kd": (dict(kd_loss_weight=1.0), False),
    "topk_kd_sft_pref": (dict(kd_loss_weight=1.0, sft_loss_weight=0.5, dpo_loss_weight=0.7, negative_kd_weight=0.3),
                         False),
    "exact_tail_kd_sft": (dict(kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail",
                               kd_loss_type="jsd"), False),
    "exact_tail_kd_T": (dict(kd_loss_weight=1.0, topk_convention="exact_tail", logits_scale=0.7,
                             temperature_squared=True), False),
    "sft_pref_only": (dict(kd_loss_weight=0.0, sft_loss_weight=1.0, dpo_loss_weight=0.5, preference_loss_type="cpo"),
                      False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_objective_inplace_equals_separate_buffer_torch(name, dtype):
    kw, online = CASES[name]
    logits, batch = _batch(online, dtype)
    ref = _step(DistillationLossConfig(**kw, inplace_logits_grad=False), logits, batch)
    got = _step(DistillationLossConfig(**kw, inplace_logits_grad=True), logits, batch)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert got[1].dtype == dtype
    assert got[2] and not ref[2]  # the gradient is written into the logits' storage only when in place
    for key in ref[3]:
        assert torch.equal(got[3][key], ref[3][key]), key  # metrics (token_agreement ...) read before the write


@pytest.mark.parametrize("mode,loss_type", [("topk", "forward_kl"), ("online", "forward_kl"), ("online", "jsd"),
                                            ("online", "reverse_kl")])
def test_objective_inplace_equals_separate_buffer_fused(mode, loss_type):
    _triton()
    online = mode == "online"
    logits, batch = _batch(online, torch.bfloat16, seed=1)
    kw = dict(kd_loss_weight=1.0, sft_loss_weight=0.5, dpo_loss_weight=0.3, kd_loss_type=loss_type, kd_kernel="fused",
              topk_convention="exact_tail", target_logits_scale=1.3 if online else 1.0)
    ref = _step(DistillationLossConfig(**kw, inplace_logits_grad=False), logits, batch)
    got = _step(DistillationLossConfig(**kw, inplace_logits_grad=True), logits, batch)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert got[2] and not ref[2]


@pytest.mark.parametrize("kw,online,why", [
    (dict(kd_loss_weight=1.0, sft_loss_weight=0.5, sft_label_smoothing=0.1), False, "label smoothing"),
    (dict(kd_loss_weight=1.0, sft_loss_weight=0.5, logits_scale=0.5), False, "two passes"),
    (dict(kd_loss_weight=1.0, sft_loss_weight=0.5), True, "without the fused kernel"),
    (dict(kd_loss_weight=1.0, kd_loss_type="skew_fkl", kd_kernel="auto"), True, "without the fused kernel"),
])
def test_two_readers_fall_back_with_a_warning(kw, online, why):
    logits, batch = _batch(online)
    ref = _step(DistillationLossConfig(**kw, inplace_logits_grad=False), logits, batch)
    with pytest.warns(UserWarning, match=why):
        got = _step(DistillationLossConfig(**kw, inplace_logits_grad=True), logits, batch)
    assert not got[2]
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_leaf_logits_are_never_overwritten():
    """A leaf (user data, a parameter) or a slice of one keeps its values: no in-place there."""
    logits, batch = _batch()
    cfg = DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0)
    objective = DistillationObjective(cfg)
    for rows in (slice(None), slice(0, 2)):  # the leaf itself, a view of it
        leaf = logits.clone().requires_grad_(True)
        t = batch.teacher
        b = ObjectiveBatch(batch.labels[rows], batch.loss_mask[rows], TopKTeacher(t.values[rows], t.ids[rows],
                                                                                   t.lse[rows]))
        assert "leaf" in objective.inplace_blocker(leaf[rows].reshape(-1, V), b)
        objective(leaf[rows], b, objective_normalisers(cfg, [b])).loss.backward()
        assert torch.equal(leaf.detach(), logits)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_a_later_autograd_reader_fails_loudly(impl):
    """In place bumps the version counter: a node that saved the logits and runs later raises."""
    if impl == "fused":
        _triton()
    logits, batch = _batch()
    x = logits.reshape(-1, V).clone().requires_grad_(True) * 1
    other = (x * x).sum()  # MulBackward saves x; created before the loss's node, so it runs after it
    lp, _ = vocab_parallel_logprobs_at(x, batch.labels.reshape(-1), impl=impl, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + other).backward()


def test_inplace_with_two_passes_is_refused_by_the_losses():
    logits, batch = _batch(online=True)
    x = logits.reshape(-1, V).clone().requires_grad_(True) * 1
    t = batch.teacher.logits.reshape(-1, V)
    vals, ids = t.topk(K, -1)
    with pytest.raises(ValueError, match="two"):
        topk_kd_loss(x, vals, ids, KDSettings(logits_scale=0.5), label_ids=batch.labels.reshape(-1),
                     inplace_backward=True)
    with pytest.raises(ValueError, match="fused"):
        full_kd_loss(x, t, KDSettings(), impl="torch", inplace_backward=True)


# ----------------------------------------------------------------------------- Megatron training steps

SEQ, MICRO, GBS, VOCAB, TOPK = 8, 2, 4, 256, 8  # vocab = 128·TP: no padding columns


def _engine_data(online):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (GBS, SEQ + 1), generator=g)
    mask = torch.ones(GBS, SEQ)
    mask[:, :2] = 0
    mask[1, 6:] = 0
    batch = dict(inputs=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask,
                 position_ids=torch.arange(SEQ).expand(GBS, SEQ))
    if not online:
        t = torch.randn(GBS, SEQ, VOCAB, generator=g) * 2
        batch["teacher_values"], batch["teacher_ids"] = t.topk(TOPK, dim=-1)
        batch["teacher_lse"] = torch.logsumexp(t, -1)
    return [{k: v[i:i + MICRO] for k, v in batch.items()} for i in range(0, GBS, MICRO)]


def _engine_body(rank, world, tp, loss_kw, online, steps):
    """``steps`` engine steps with in-place off, then on, from the same weights, on this rank.

    Returns per flag: the step metrics, this rank's final weights, and for every microbatch
    whether the gradient entering the output layer lived in the logits' storage.
    """
    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    model_cfg = GPTModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=64, vocab_size=VOCAB, max_position_embeddings=SEQ)
    teacher_cfg = GPTModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                 vocab_size=VOCAB, max_position_embeddings=SEQ) if online else None
    out, init = {}, None
    mbs = _engine_data(online)
    for flag in (False, True):
        initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp, seed=5))
        try:
            teacher = build_gpt_model(teacher_cfg) if online else None
            engine = DistillationEngine(model_cfg, DistillationLossConfig(**loss_kw, inplace_logits_grad=flag),
                                        OptimConfig(lr=1e-2, clip_grad=1.0),
                                        BatchConfig(micro_batch_size=MICRO, global_batch_size=GBS, seq_length=SEQ),
                                        max_steps=steps, teacher_cfg=teacher_cfg, teacher_model=teacher)
            models = [engine.module] + ([teacher] if online else [])
            if init is None:
                init = [{k: v.detach().clone() for k, v in m.state_dict().items() if torch.is_tensor(v)}
                        for m in models]
            for m, sd in zip(models, init):
                m.load_state_dict(sd, strict=False)
            same_storage, logits_ptr = [], []
            engine.module.register_forward_hook(lambda mod, inp, o: logits_ptr.append(o.data_ptr()))

            def on_output_layer(mod, inp, o):
                if torch.is_grad_enabled():
                    o[0].register_hook(lambda g: same_storage.append(g.data_ptr() == logits_ptr[-1]))

            engine.module.output_layer.register_forward_hook(on_output_layer)
            history = [engine.train_step(mbs) for _ in range(steps)]
            weights = {k: v.detach().numpy().copy() for k, v in engine.module.state_dict().items()
                       if torch.is_tensor(v)}
            out[flag] = dict(history=history, weights=weights, same_storage=same_storage)
        finally:
            destroy_parallel()
    return out


def _assert_identical_steps(results):
    for r in results:
        off, on = r[False], r[True]
        assert on["same_storage"] and all(on["same_storage"]), on["same_storage"]
        assert off["same_storage"] and not any(off["same_storage"]), off["same_storage"]
        for a, b in zip(off["history"], on["history"]):
            for key in ("loss", "kd_loss", "sft_loss", "grad_norm"):
                assert a[key] == b[key], (key, a[key], b[key])  # bit-identical, not just close
        for k, w in off["weights"].items():
            assert (w == on["weights"][k]).all(), k


ENGINE_CASES = {
    "topk_kd_sft_torch": (dict(kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail"), False),
    "topk_renorm_kd_torch": (dict(kd_loss_weight=1.0), False),
    "online_fkl_sft_fused": (dict(kd_loss_weight=1.0, sft_loss_weight=0.5, kd_kernel="fused"), True),
}


@pytest.mark.parametrize("name", list(ENGINE_CASES))
def test_engine_step_inplace_is_bit_identical(name):
    loss_kw, online = ENGINE_CASES[name]
    if loss_kw.get("kd_kernel") == "fused":
        _triton()
    _assert_identical_steps(run_distributed(_engine_body, 1, 1, loss_kw, online, 2))


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["topk_kd_sft_torch", "online_fkl_sft_fused"])
def test_engine_step_inplace_is_bit_identical_tp2(name):
    loss_kw, online = ENGINE_CASES[name]
    if loss_kw.get("kd_kernel") == "fused":
        _triton()
    _assert_identical_steps(run_distributed(_engine_body, 2, 2, loss_kw, online, 2))
