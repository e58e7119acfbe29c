"""Training with ``model.teacher.mode: served`` (issue 15): the project's server on loopback, a tiny teacher.

One tiny Megatron teacher (output layer scaled so its top-k has no near-ties) is served by
``nemo_kd.teacher.server`` in this process, with an API key; the same teacher is also extracted in
process into a float32 store (offline mode) and run in process as the independent reference of the
on-policy KD loss. Runs are 2-4 steps of a tiny student, each started from the same weights.
"""

import glob
import logging
import math
import os
import re
import types

import pytest
import torch

from test_distillation_model import _arch, _free_port  # the same tiny student and free-port helper

MAX_LEN, K, N = 40, 8, 16
KEY_ENV, SECRET = "NEMO_KD_TEST_TRAIN_TEACHER_KEY", "sk-train-SECRET-5a4b3c"


def _serve(teacher):
    from nemo_kd.teacher.server import ServeConfig, serve_in_background

    return serve_in_background(teacher, ServeConfig(port=0, max_logprobs=K, model_id="tiny-teacher",
                                                    api_key_env=KEY_ENV))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import json

    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher, save_full_checkpoint

    old = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", KEY_ENV)}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), **{KEY_ENV: SECRET})
    d = tmp_path_factory.mktemp("served_training")
    texts = [f"question {i}: what is {i} plus {i * 3}? answer: {i + i * 3}, because adding numbers works."
             for i in range(40)]
    tok = train_byte_level_bpe(texts, vocab_size=300, save_dir=str(d / "tok"))
    data = str(d / "train.jsonl")
    with open(data, "w") as f:
        for i in range(N):
            f.write(json.dumps({"id": i, "prompt": f"what is {i} plus {i * 3}?",
                                "response": f"{i + i * 3} because adding" + " numbers" * (i % 3)}) + "\n")
    initialize_parallel(ParallelConfig(seed=5))
    server = None
    try:
        cfg = GPTModelConfig(**_arch(len(tok)))
        full = {k: v for k, v in build_gpt_model(cfg).state_dict().items() if torch.is_tensor(v)}
        full["output_layer.weight"] = full["output_layer.weight"] * 40
        save_full_checkpoint(str(d / "teacher"), full, cfg)
        teacher = MegatronTeacher(str(d / "teacher"))
        compute_topk_logits(ExtractConfig(data_path=data, output_path=str(d / "store"), top_k=K,
                                          max_seq_length=MAX_LEN, values_dtype="float32", batch_size=4,
                                          progress=False), teacher, tok)
        server = _serve(teacher)
        url = server.__enter__()
        yield dict(dir=d, tok_dir=str(d / "tok"), vocab=len(tok), data=data, store=str(d / "store"),
                   teacher_path=str(d / "teacher"), teacher=teacher, url=url)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
        destroy_parallel()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cfg(world, mode="offline", **over):
    from omegaconf import OmegaConf

    ds = dict(file_path=world["data"], logits_store=world["store"] if mode == "offline" else None,
              tokenizer=world["tok_dir"], prompt_format="chat", max_seq_length=MAX_LEN, micro_batch_size=2,
              global_batch_size=4, seed=1)
    teacher = {"offline": dict(mode="offline"), "online": dict(mode="online", checkpoint=world["teacher_path"]),
               "served": dict(mode="served", url=world["url"], model="tiny-teacher", api_key_env=KEY_ENV, top_k=K,
                              concurrency=4, max_retries=1, backoff_initial_s=0.01, backoff_max_s=0.05,
                              request_timeout_s=30)}[mode]
    cfg = OmegaConf.create(dict(
        student=_arch(world["vocab"]), teacher=teacher,
        kd=dict(kd_loss_type="forward_kl", kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail"),
        optim=dict(lr=1e-2, warmup_steps=1), parallel=dict(seed=7),
        data=dict(train_ds=ds, validation_ds=dict(ds, shuffle=False)), max_steps=4,
    ))
    for key, value in over.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _trainer(tmp, steps, callbacks=(), logger=False, devices=1):
    import lightning.pytorch as pl

    from nemo_kd.parallel.strategy import MegatronStrategy

    class Record(pl.Callback):
        def __init__(self):
            self.rows, self.val = [], {}

        def on_train_batch_end(self, trainer, *args):
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})

        def on_validation_end(self, trainer, *args):
            self.val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}

    rec = Record()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=MegatronStrategy(), max_steps=steps,
                         use_distributed_sampler=False, logger=logger, log_every_n_steps=1,
                         enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, val_check_interval=steps, check_val_every_n_epoch=None,
                         callbacks=[rec, *callbacks], default_root_dir=str(tmp))
    return trainer, rec


def _fit(cfg, tmp, steps, init, callbacks=(), logger=False, ckpt_path=None, student_logits=False, devices=1):
    """A fit from the weights ``init``: the model, the logged rows, the validation metrics and every step's
    microbatches (as the engine got them; with ``student_logits`` also the student's logits before each step)."""
    from nemo_kd.models.distillation_model import GPTDistillationModel

    trainer, rec = _trainer(tmp, steps, callbacks, logger, devices)
    model = GPTDistillationModel(cfg, trainer=trainer)
    if init is not None:  # a state dict, or a function of the model giving this rank's
        model.student.load_state_dict(init(model) if callable(init) else init, strict=False)
    seen, logits = [], []
    train_step = model.engine.train_step

    def spy(mbs):
        seen.append(mbs)
        if student_logits:
            with torch.no_grad():
                logits.append([model.student(mb["inputs"], mb["position_ids"], None).double() for mb in mbs])
        return train_step(mbs)

    model.engine.train_step = spy
    # NeMo hands every trainer its OneLogger telemetry callback, one per process, and a fit that raised (the
    # killed-server test) leaves its training-loop span open, so the next fit in this process (the resume) would
    # fail on "span training_loop already active"; these tests record nothing through it
    from nv_one_logger.training_telemetry.integration.pytorch_lightning import TimeEventCallback

    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, TimeEventCallback)]
    trainer.fit(model, ckpt_path=ckpt_path)
    return types.SimpleNamespace(model=model, rows=rec.rows, val=rec.val, seen=seen, logits=logits)


@pytest.fixture(scope="module")
def init(world):
    from nemo_kd.models.distillation_model import GPTDistillationModel

    model = GPTDistillationModel(_cfg(world))
    return {k: v.detach().clone() for k, v in model.student.state_dict().items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def served_run(world, init, tmp_path_factory):
    """4 supervised steps, served, checkpoint every step, a CSV logger (the config dumped as hparams)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    tmp = tmp_path_factory.mktemp("served_fit")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp / "ckpt"), every_n_train_steps=1, save_top_k=-1)
    logger = CSVLogger(str(tmp / "logs"))
    run = _fit(_cfg(world, "served"), tmp, 4, init, callbacks=[ckpt], logger=logger)
    logger.log_hyperparams(run.model.cfg)
    logger.save()
    run.dir = tmp
    return run


def test_supervised_served_equals_offline_store(world, init, served_run, tmp_path):
    """(a) mode=served == mode=offline on the in-process store of the same teacher: per-step losses within
    fp32 rounding of the log-probs, the same top-k ids at every completion token; steps 1-3 were prefetched."""
    ref = _fit(_cfg(world, "offline"), tmp_path, 4, init)
    ref_rows, ref_seen = ref.rows, ref.seen
    rows, seen = served_run.rows, served_run.seen
    assert len(rows) == len(ref_rows) == 4
    for key in ("loss", "kd_loss", "sft_loss", "teacher_student_kd"):
        got, want = [r[key] for r in rows], [r[key] for r in ref_rows]
        assert got == pytest.approx(want, rel=2e-5, abs=1e-6), (key, got, want)
    assert served_run.val["val_loss"] == pytest.approx(ref.val["val_loss"], rel=2e-5)  # validation: scored too
    assert ref.val["val_kd_loss"] > 0 and served_run.val["val_kd_loss"] == pytest.approx(ref.val["val_kd_loss"],
                                                                                          rel=2e-5)
    for step, (mbs, ref_mbs) in enumerate(zip(seen, ref_seen)):
        for mb, ref in zip(mbs, ref_mbs):
            assert torch.equal(mb["sample_index"], ref["sample_index"]) and torch.equal(mb["inputs"], ref["inputs"])
            on = ref["loss_mask"] > 0
            assert on.sum() > 0 and torch.equal(mb["teacher_ids"][on], ref["teacher_ids"][on]), step
            ref_logprobs = ref["teacher_values"][on] - ref["teacher_lse"][on].unsqueeze(-1)
            torch.testing.assert_close(mb["teacher_values"][on], ref_logprobs, rtol=0, atol=2e-5)
            assert (mb["teacher_lse"] == 0).all() and torch.isinf(mb["teacher_values"][~on]).all()
            torch.testing.assert_close(mb["teacher_seq_logprob"], ref["teacher_seq_logprob"], rtol=1e-5, atol=1e-4)
    assert served_run.model._served.prefetch_hits == 3  # every step after the first found its rows requested
    for r in rows:
        assert 0 <= r["teacher_wait_s"] and 0 <= r["teacher_wait_frac"] < 1


def _topk_fkl_exact_tail(student_logits, teacher_logits, mask, k, floor=1e-7):
    """Σ over masked positions of FKL on k + 1 buckets (teacher top-k, exact log-probs, tail 1 − Σ), float64."""
    lt = torch.log_softmax(teacher_logits.double(), -1)
    ls = torch.log_softmax(student_logits.double(), -1)
    tv, ti = lt.topk(k, dim=-1)
    sv = ls.gather(-1, ti)
    pt, ps = tv.exp(), sv.exp()
    tail_t = (1 - pt.sum(-1)).clamp_min(floor)
    tail_s = (1 - ps.sum(-1)).clamp_min(floor)
    per_token = (pt * (tv - sv)).sum(-1) + tail_t * (tail_t.log() - tail_s.log())
    return per_token[mask].sum(), ti


def test_on_policy_served_scores_the_students_samples(world, init, tmp_path):
    """(b) on-policy with mode=served: the samples are mode=online's (same seeds, same weights), and the KD
    loss of each step equals top-k exact-tail FKL against the in-process teacher's top-k of those samples."""
    over = {"kd.sft_loss_weight": 0.0, "data.validation_ds": None, "max_steps": 2,
            "on_policy": {"fraction": 1.0, "temperature": 1.0, "max_new_tokens": 12, "seed": 3}}
    run = _fit(_cfg(world, "served", **over), tmp_path / "served", 2, init, student_logits=True)
    model, rows, seen, student = run.model, run.rows, run.seen, run.logits
    online = _fit(_cfg(world, "online", **over), tmp_path / "online", 1, init)
    online_rows, online_seen = online.rows, online.seen
    assert [r["on_policy"] for r in rows] == [1.0, 1.0] and online_rows[0]["on_policy"] == 1.0
    for mb, ref in zip(seen[0], online_seen[0]):  # step 0: the same student, the same draws
        for key in ("inputs", "labels", "loss_mask"):
            assert torch.equal(mb[key], ref[key]), key
    vocab = world["vocab"]
    for step, (mbs, logits) in enumerate(zip(seen, student)):
        total, tokens = 0.0, 0
        for mb, s_logits in zip(mbs, logits):
            t_logits = {}
            world["teacher"].run(mb["inputs"], lambda row, x, group: t_logits.__setitem__(row, x.detach().clone()),
                                 micro_batch_size=mb["inputs"].shape[0])
            on = mb["loss_mask"] > 0
            kd_sum, ids = _topk_fkl_exact_tail(s_logits[..., :vocab], t_logits[0][..., :vocab], on, K)
            assert torch.equal(mb["teacher_ids"][on], ids[on]), step  # the server's top-k = the in-process one
            total, tokens = total + float(kd_sum), tokens + int(on.sum())
        assert tokens > 0
        assert rows[step]["kd_loss"] == pytest.approx(total / tokens, rel=1e-4), step
        assert 0 <= rows[step]["teacher_wait_frac"] < 1
    assert model._served.prefetch_hits == 0  # on-policy steps submit their own samples as they are drawn


def test_server_killed_mid_run_names_step_and_endpoint_and_checkpoints_resume(world, init, served_run, tmp_path,
                                                                              caplog):
    """(c) the server dies after step 1: the run stops with an error naming the step, the sample and the
    endpoint; the checkpoints written before are whole, and resuming from the last one against a restarted
    server repeats the uninterrupted run's losses."""
    import lightning.pytorch as pl

    from nemo_kd.teacher.served import ServedTeacherError

    server = _serve(world["teacher"])
    url = server.__enter__()
    alive = [True]

    class Kill(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 1 and alive[0]:
                server.__exit__(None, None, None)
                alive[0] = False

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, save_top_k=-1)
    caplog.set_level(logging.INFO)
    try:
        with pytest.raises(ServedTeacherError) as err:
            _fit(_cfg(world, "served", **{"teacher.url": url}), tmp_path, 4, init, callbacks=[ckpt, Kill()])
    finally:
        if alive[0]:
            server.__exit__(None, None, None)
    msg = str(err.value)
    print("the run's error:", msg)  # pytest -s shows it
    m = re.search(r"step (\d+)", msg)
    assert m and int(m.group(1)) in (1, 2), msg
    assert re.search(r"\(sample \d+\)", msg) and f"POST {url}/v1/completions" in msg and "failed after 2 attempt" in msg
    assert SECRET not in msg and SECRET not in caplog.text
    saved = sorted(glob.glob(os.path.join(ckpt.dirpath, "*.ckpt")))
    assert 1 <= len(saved) <= int(m.group(1)), saved
    last = max(saved, key=lambda p: int(re.search(r"step=(\d+)", p).group(1)))
    done = int(re.search(r"step=(\d+)", last).group(1))
    rows = _fit(_cfg(world, "served"), tmp_path / "resumed", 4, None, ckpt_path=last).rows
    ref = served_run.rows
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref[done:]], rel=1e-5, abs=1e-6)


def test_api_key_never_in_logs_metrics_or_config(world, served_run):
    """(d) the key reaches the server (it refuses requests without it) but no file of the run (metrics,
    hparams / config dump, checkpoints) nor the model's config holds it; the config names the variable."""
    import requests
    from omegaconf import OmegaConf

    r = requests.post(world["url"] + "/v1/completions", json={"model": "tiny-teacher", "prompt": [1, 2, 3],
                                                              "max_tokens": 1, "prompt_logprobs": 1}, timeout=30)
    assert r.status_code == 401  # the served runs above authenticated with the key
    dump = OmegaConf.to_yaml(served_run.model.cfg)
    assert KEY_ENV in dump and SECRET not in dump
    files = [p for p in glob.glob(os.path.join(str(served_run.dir), "**", "*"), recursive=True)
             if os.path.isfile(p)]
    assert any(p.endswith("metrics.csv") for p in files) and any(p.endswith("hparams.yaml") for p in files)
    for p in files:
        with open(p, "rb") as f:
            assert SECRET.encode() not in f.read(), p
    with open([p for p in files if p.endswith("metrics.csv")][0]) as f:
        header = f.readline()
    assert "teacher_wait_s" in header and "teacher_wait_frac" in header


def test_refusals_at_construction(world):
    """What needs raw logits (exact_tail at another teacher temperature), keys of other modes, a wrong model."""
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.teacher.served import ServedTeacherError

    with pytest.raises(ValueError, match="log-probs at temperature 1, not raw logits"):
        GPTDistillationModel(_cfg(world, "served", **{"kd.target_logits_scale": 0.5}))
    with pytest.raises(ValueError, match="teacher.checkpoint does not apply"):
        GPTDistillationModel(_cfg(world, "served", **{"teacher.checkpoint": world["teacher_path"]}))
    with pytest.raises(ServedTeacherError, match="does not serve teacher.model='other'"):
        GPTDistillationModel(_cfg(world, "served", **{"teacher.model": "other"}))
    # renormalized reads the top-k through a softmax, blind to the log-probs' per-row shift: any temperature
    model = GPTDistillationModel(_cfg(world, "served", **{"kd.target_logits_scale": 0.5,
                                                          "kd.topk_convention": "renormalized"}))
    assert model._served is not None and math.isfinite(model._served.cfg.top_k)


def _dp2_fits(rank, world_size, world, init, tmp, tp=1):
    """Offline then served, 3 steps each on 2 processes (DP=2, or TP=2) from ``init``: every step's logged
    loss terms on this rank."""
    from nemo_kd.models import GPTModelConfig, shard_state_dict
    from nemo_kd.parallel import destroy_parallel, state

    def shard(model):
        return shard_state_dict(init, GPTModelConfig.from_dict(dict(model.cfg.student)), state.tp_rank(), tp, 0, 1)

    out = {}
    try:
        for mode in ("offline", "served"):
            run = _fit(_cfg(world, mode, **{"data.validation_ds": None, "parallel.tensor_model_parallel_size": tp}),
                       os.path.join(tmp, mode), 3, shard, devices=world_size)
            assert state.dp_size() * state.tp_size() == 2 and state.tp_size() == tp
            out[mode] = [{k: r[k] for k in ("loss", "kd_loss", "sft_loss")} for r in run.rows]
            if mode == "served":
                out["prefetch_hits"] = run.model._served.prefetch_hits
                out["samples"] = [mb["sample_index"].tolist() for mbs in run.seen for mb in mbs]
        return out
    finally:
        destroy_parallel()


@pytest.mark.distributed
def test_served_equals_offline_at_dp2(world, init, tmp_path):
    """DP=2 (2 processes, one server): each rank requests its own rows (the sampler's DP block, prefetched
    from step 2 on) and the data-parallel losses equal the offline store's."""
    from dist_utils import run_distributed

    plain = {k: v for k, v in world.items() if k != "teacher"}
    results = run_distributed(_dp2_fits, 2, plain, init, str(tmp_path))
    for r in results:
        for key in ("loss", "kd_loss", "sft_loss"):
            got, want = [row[key] for row in r["served"]], [row[key] for row in r["offline"]]
            assert got == pytest.approx(want, rel=2e-5, abs=1e-6), (key, got, want)
        assert r["prefetch_hits"] == 2
    a, b = results[0]["samples"], results[1]["samples"]
    assert all(not set(x) & set(y) for x, y in zip(a, b))  # the two ranks scored different samples


@pytest.mark.distributed
def test_served_equals_offline_at_tp2(world, init, tmp_path):
    """TP=2: both ranks of the tensor-parallel group request the same rows (no collective) and the losses
    equal the offline store's at TP=2."""
    from dist_utils import run_distributed

    plain = {k: v for k, v in world.items() if k != "teacher"}
    results = run_distributed(_dp2_fits, 2, plain, init, str(tmp_path), 2)
    for r in results:
        for key in ("loss", "kd_loss", "sft_loss"):
            got, want = [row[key] for row in r["served"]], [row[key] for row in r["offline"]]
            assert got == pytest.approx(want, rel=2e-5, abs=1e-6), (key, got, want)
        assert r["prefetch_hits"] == 2
    assert results[0]["samples"] == results[1]["samples"]  # one data-parallel group: the same rows
