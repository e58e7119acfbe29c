"""Acceptance: one Megatron training step gives the same loss and weights at TP/PP 1x1, 2x1, 1x2.

Every layout starts from the same full weights (built once at TP=1, PP=1 and cut with
``nemo_kd.models.sharding``) and runs Megatron's own machinery -- the schedule from
``get_forward_backward_func`` (2 microbatches), ``DistributedDataParallel`` with its grad
buffers, ``finalize_model_grads`` and ``get_megatron_optimizer`` (Adam) -- on CPU through
``nemo_kd.parallel.cpu_shim``. The loss is the token-mean cross-entropy over the global
batch computed with the vocab-parallel primitive.
"""

import os
import socket
from functools import partial

import pytest
import torch

from dist_utils import run_distributed

NUM_MICROBATCHES, MICRO_BATCH, SEQ = 2, 2, 16


def _model_cfg():
    from nemo_kd.models import GPTModelConfig

    # GQA (4 heads, 2 groups), SwiGLU, RMSNorm, RoPE, qkv bias: exercises every split rule.
    return GPTModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        vocab_size=200, make_vocab_size_divisible_by=128, max_position_embeddings=SEQ, add_qkv_bias=True,
    )


def _global_batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 200, (NUM_MICROBATCHES, MICRO_BATCH, SEQ + 1), generator=g)
    loss_mask = torch.ones(NUM_MICROBATCHES, MICRO_BATCH, SEQ)
    loss_mask[0, 1, 11:] = 0  # uneven token counts: normalisation must use the global count
    loss_mask[1, 0, :3] = 0
    return tokens, loss_mask


def _full_weights():
    """A TP=1, PP=1 GPTModel state dict made once (in-process, world of one)."""
    from nemo_kd.models import build_gpt_model
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelConfig(seed=11))
    try:
        model = build_gpt_model(_model_cfg())
        return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in model.state_dict().items()}
    finally:
        destroy_parallel()


def _loss_func(labels, loss_mask, tp_group, logits):
    from nemo_kd.losses.vocab_parallel import vocab_parallel_logprobs_at

    # Megatron-core 0.16.1 GPTModel returns [b, s, V/TP] when called without labels.
    assert logits.shape[:2] == labels.shape, (logits.shape, labels.shape)
    logprobs, _ = vocab_parallel_logprobs_at(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), group=tp_group)
    mask = loss_mask.reshape(-1)
    loss_sum = -(logprobs * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    # (sum, tokens, report): with calculate_per_token_loss Megatron divides the grads by the
    # global token count in finalize_model_grads.
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def _forward_step(tp_group, data_iterator, model):
    tokens, loss_mask = next(data_iterator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(SEQ)[None].expand_as(inputs)
    output = model(inputs, position_ids, None)
    return output, partial(_loss_func, labels, loss_mask, tp_group)


def _train_step(rank, world, tp, pp, full, batch):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_kd.models import build_gpt_model, shard_state_dict
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    cfg = _model_cfg()
    initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=3))
    try:
        tp_rank, pp_rank = state.tp_rank(), state.pp_rank()
        model = build_gpt_model(cfg, calculate_per_token_loss=True)
        model.load_state_dict(shard_state_dict(full, cfg, tp_rank, tp, pp_rank, pp), strict=True)
        tconfig = model.config
        ddp = DistributedDataParallel(
            config=tconfig,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
            module=model,
        )
        tconfig.no_sync_func = ddp.no_sync
        tconfig.finalize_model_grads_func = finalize_model_grads
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01, adam_eps=1e-6, clip_grad=1.0), [ddp]
        )
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        tokens, loss_mask = batch
        microbatches = iter([(tokens[i], loss_mask[i]) for i in range(NUM_MICROBATCHES)])
        losses = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, state.tp_group()),
            data_iterator=microbatches,
            model=[ddp],
            num_microbatches=NUM_MICROBATCHES,
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        update_successful, grad_norm, _ = optimizer.step()
        assert update_successful
        loss = None
        if state.is_pipeline_last_stage():
            totals = torch.stack([r["lm loss"] for r in losses]).sum(0)
            loss = (totals[0] / totals[1]).item()
        # numpy, not tensors: torch.multiprocessing would share tensor storage by file
        # descriptor, which dies with this worker before the parent unpickles the result.
        weights = {k: (v.detach().numpy().copy() if torch.is_tensor(v) else v) for k, v in model.state_dict().items()}
        return {"tp_rank": tp_rank, "pp_rank": pp_rank, "loss": loss, "grad_norm": float(grad_norm), "weights": weights}
    finally:
        destroy_parallel()


def _gather(results, cfg, tp, pp):
    from nemo_kd.models import gather_state_dict

    shards = [[None] * tp for _ in range(pp)]
    for r in results:
        shards[r["pp_rank"]][r["tp_rank"]] = {
            k: (torch.from_numpy(v) if hasattr(v, "dtype") else v) for k, v in r["weights"].items()
        }
    loss = next(r["loss"] for r in results if r["loss"] is not None)
    return loss, results[0]["grad_norm"], gather_state_dict(shards, cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Full weights and the TP=1, PP=1 step (in this process: world of one, own port)."""
    old = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        full = _full_weights()
        os.environ["MASTER_PORT"] = str(_free_port())
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            result = _train_step(0, 1, 1, 1, full, _global_batch())
        finally:
            dist.destroy_process_group()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return full, _gather([result], _model_cfg(), 1, 1)


def _assert_same_step(reference, tp, pp):
    full, (ref_loss, ref_norm, ref_weights) = reference
    results = run_distributed(_train_step, tp * pp, tp, pp, full, _global_batch())
    loss, norm, weights = _gather(results, _model_cfg(), tp, pp)
    assert abs(loss - ref_loss) < 1e-5, (loss, ref_loss)
    assert abs(norm - ref_norm) < 1e-5 * max(1.0, ref_norm), (norm, ref_norm)
    assert weights.keys() == ref_weights.keys()
    max_diff = max((weights[k] - v).abs().max().item() for k, v in ref_weights.items() if torch.is_tensor(v))
    print(f"TP={tp} PP={pp}: |dloss|={abs(loss - ref_loss):.2e} |dnorm|={abs(norm - ref_norm):.2e} max|dw|={max_diff:.2e}")
    for key, ref in ref_weights.items():
        if torch.is_tensor(ref):
            assert not torch.equal(ref, full[key]) or "output_layer" in key or "embedding" in key, f"{key} not updated"
            torch.testing.assert_close(weights[key], ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")


def test_reference_step_updates_weights(reference):
    full, (loss, norm, weights) = reference
    assert 4.0 < loss < 7.0  # ~ln(256) for random init
    changed = [k for k, v in weights.items() if torch.is_tensor(v) and not torch.equal(v, full[k])]
    assert len(changed) == sum(torch.is_tensor(v) for v in full.values())


@pytest.mark.distributed
def test_tp2_step_equals_tp1(reference):
    _assert_same_step(reference, tp=2, pp=1)


@pytest.mark.distributed
def test_pp2_step_equals_tp1(reference):
    _assert_same_step(reference, tp=1, pp=2)


# ---------------------------------------------------------------- the CPU shim itself
def test_cpu_shim_is_idempotent_narrow_and_pinned(monkeypatch):
    import importlib

    from nemo_kd.parallel import cpu_shim

    first = cpu_shim.install_cpu_shim()
    assert first and cpu_shim.install_cpu_shim() == first  # idempotent: same record, nothing re-patched
    assert "megatron.core.pipeline_parallel.schedules.torch" in first
    assert len(first) == len(set(first))
    # Only the listed Megatron modules see the CPU view; global torch is untouched.
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    assert isinstance(schedules.torch, cpu_shim._CpuTorch)
    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    assert schedules.torch.cuda.current_device() == "cpu"
    # the KV cache of sampling allocates on current_device(): attention is on the list on purpose
    assert isinstance(importlib.import_module("megatron.core.transformer.attention").torch, cpu_shim._CpuTorch)
    assert importlib.import_module("megatron.core.transformer.mlp").torch is torch
    assert importlib.import_module("megatron.core.models.gpt.gpt_model").torch is torch
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")  # still a CPU-only torch everywhere else

    # Where CUDA exists the shim does nothing.
    monkeypatch.setattr(cpu_shim, "PATCHED", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_shim.install_cpu_shim() == [] and cpu_shim.PATCHED == []
    monkeypatch.undo()

    # Pinned to the megatron-core it was written against, unless overridden.
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    monkeypatch.delenv(cpu_shim.OVERRIDE_ENV, raising=False)
    with pytest.raises(RuntimeError, match="0.16.1.*found 0.17.0"):
        cpu_shim._check_megatron_version()
    monkeypatch.setenv(cpu_shim.OVERRIDE_ENV, "1")
    cpu_shim._check_megatron_version()
