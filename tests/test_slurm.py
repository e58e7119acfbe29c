"""Every examples/slurm/*.sbatch under a real Slurm (scripts/slurm_cluster.sh, one node, 2 CPU tasks).

Each job is submitted as a user submits it, ``sbatch --wait examples/slurm/X.sbatch`` from the
checkout: Slurm runs its spool copy of the script, so these tests fail if a script locates
the repository through ``$0``. Assets (a byte-level BPE, a few-dozen-sample JSONL, a random tiny
Megatron teacher) are built once per session; results are checked against single-process runs of
the same library functions in this process: the extracted top-k at DP=2 and TP=2, the preference
and DASD pipelines at DP=2; training at TP=2 (offline store, online teacher) must exit 0, write
``student.nemo`` and log a finite, falling loss. The requeue test signals a training job as
``--signal=B:USR1`` would, and checks that the job checkpoints, requeues itself, resumes from the
checkpoint and ends with the same weights, bit for bit, as an uninterrupted run. Stand-ins for
the interpreter and for `srun` check what cannot run here: the pyxis container flags, and the batch
shell's signal forwarding when the tasks fail instead of checkpointing.
"""

import json
import math
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from slurm_utils import REPO, job_env, sbatch, slurm_cluster, wait_for, wait_for_end  # noqa: F401 (fixture)

pytestmark = pytest.mark.distributed  # every job runs 2 tasks

MAX_LEN, K, N = 40, 8, 24
TEXTS = [f"question {i}: what is {i} plus {i * 3}? answer: {i + i * 3}, because adding numbers works."
         for i in range(40)]
PROMPTS = ["what is 1 plus 3?", "what is 2 plus 6?", "what is 4 plus 12?", "what is 5 plus 15?", "what is 7 plus 21?"]


def _arch(vocab, hidden=32, layers=2):
    """TP=2-compatible (4 heads, 2 query groups) tiny GPT."""
    return dict(num_layers=layers, hidden_size=hidden, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=2 * hidden, vocab_size=vocab, max_position_embeddings=64)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Tokenizer, training JSONL, prompts, a peaked random teacher, a loose random student, and the
    teacher's top-k store computed in this process (the single-process reference)."""
    from dist_utils import WorldOfOne
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher, save_full_checkpoint

    d = tmp_path_factory.mktemp("slurm_assets")
    tok = train_byte_level_bpe(TEXTS, vocab_size=300, save_dir=str(d / "tok"))
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": f"what is {i} plus {i * 3}?",
                                        "response": f"{i + i * 3} because adding" + " numbers" * (i % 3)}) + "\n"
                            for i in range(N)))
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "reference": str(4 * (i + 1))}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    torch.manual_seed(0)
    with WorldOfOne(seed=5):
        for name, hidden, scale in (("teacher", 32, 40.0), ("student", 16, 3.0)):
            cfg = GPTModelConfig(**_arch(len(tok), hidden))
            full = {k: v for k, v in build_gpt_model(cfg).state_dict().items() if torch.is_tensor(v)}
            full["output_layer.weight"] = full["output_layer.weight"] * scale  # peaked teacher, loose student
            save_full_checkpoint(str(d / name), full, cfg)
        compute_topk_logits(ExtractConfig(data_path=str(data), output_path=str(d / "store"), top_k=K,
                                          max_seq_length=MAX_LEN, values_dtype="float32", batch_size=4,
                                          progress=False), MegatronTeacher(str(d / "teacher")), tok)
    return dict(dir=d, tok=str(d / "tok"), vocab=len(tok), data=str(data), prompts=str(prompts),
                teacher=str(d / "teacher"), student=str(d / "student"), store=str(d / "store"))


def _ok(job):
    if job.returncode != 0:
        job.fail(f"exited {job.returncode}")
    return job


# --------------------------------------------------------------------------- locating the repository


def test_script_outside_the_checkout_fails_clearly(slurm_cluster, tmp_path):
    """Submitted from a directory that is not the checkout and without NEMO_KD_DIR: exit 2 and a
    message saying how to point the job at the repository (not `common.sh: No such file`)."""
    job = sbatch("compute_topk_logits.sbatch", workdir=tmp_path, submit_dir=tmp_path, env=job_env(), timeout=60)
    log = job.log()
    assert job.returncode == 2, log
    assert "cannot find the nemo_kd repository" in log and f"'{tmp_path}' holds no nemo_kd/" in log, log
    assert "export NEMO_KD_DIR" in log, log


def _executable(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_container_flags_mount_the_repository_and_data(slurm_cluster, tmp_path):
    """With CONTAINER set, srun gets pyxis' flags: the image, mounts of the repository and the job's
    working directory at their own paths plus the user's MOUNTS, the working directory as workdir;
    the repository is on PYTHONPATH (a plain NeMo image has no nemo_kd). A stand-in `srun` first
    on PATH records its arguments (no pyxis here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", '#!/usr/bin/env bash\nprintf "ARG %s\\n" "$@"\necho "PYTHONPATH=$PYTHONPATH"\n')
    work = tmp_path / "work"
    work.mkdir()
    env = job_env(CONTAINER="nvcr.io/nvidia/nemo:25.09", MOUNTS="/lustre/data:/data,/lustre/ckpt:/ckpt",
                  TEACHER="/ckpt/teacher", DATA="/data/train.jsonl", STORE="/data/store", TOKENIZER="/ckpt/teacher",
                  PATH=f"{bin_dir}:{os.environ['PATH']}")
    job = _ok(sbatch("compute_topk_logits.sbatch", workdir=work, env=env, timeout=60))
    args = [line[4:] for line in job.log().splitlines() if line.startswith("ARG ")]
    assert "--container-image=nvcr.io/nvidia/nemo:25.09" in args, args
    assert f"--container-mounts={REPO}:{REPO},{work}:{work},/lustre/data:/data,/lustre/ckpt:/ckpt" in args, args
    assert f"--container-workdir={work}" in args and "--no-container-mount-home" in args, args
    script = args.index(f"{REPO}/examples/compute_topk_logits.py")  # srun's options, then the interpreter
    assert args[script - 1] == env["PYTHON"] and all(a.startswith("--") for a in args[:script - 1]), args
    assert "teacher.path=/ckpt/teacher" in args and "output_path=/data/store" in args, args
    assert re.search(rf"^PYTHONPATH={re.escape(str(REPO))}(:|$)", job.log(), re.M), job.log()


def test_signal_forwarded_to_every_task_and_failure_not_requeued(slurm_cluster, tmp_path):
    """The batch shell forwards SIGUSR1 to srun, which delivers it to both tasks; tasks that exit 3
    instead of checkpointing make the job fail with 3, not requeue. The tasks also see the
    rendezvous the script derived from the allocation (first host, 10000 + job id % 50000)."""
    fake = _executable(tmp_path / "fake_python", """#!/usr/bin/env bash
trap 'echo "task $SLURM_PROCID got USR1"; exit 3' USR1
echo "task $SLURM_PROCID rendezvous $MASTER_ADDR:$MASTER_PORT"
touch "started.$SLURM_PROCID"
while :; do sleep 0.1; done
""")
    env = job_env(PYTHON=fake, DATA="d", STORE="s", TOKENIZER="t")
    job = sbatch("train_gpt_kd.sbatch", workdir=tmp_path, env=env, wait=False)
    wait_for(lambda: all((tmp_path / f"started.{r}").exists() for r in (0, 1)), 60, "both tasks to start", job)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job.job_id)], check=True, timeout=30)
    info = wait_for_end(job, 60)
    log = job.log()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0" and info["Restarts"] == "0", (info, log)
    assert "task 0 got USR1" in log and "task 1 got USR1" in log, log
    assert "srun exited 3 after SIGUSR1; not requeueing" in log, log
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    for rank in (0, 1):
        assert f"task {rank} rendezvous {host}:{10000 + job.job_id % 50000}" in log, log


# --------------------------------------------------------------------------- extraction


def _assert_same_store(path, ref_path):
    from nemo_kd.teacher.store import StoreReader

    got, ref = StoreReader(path, verify_checksums=True), StoreReader(ref_path)
    for key in ("k", "dataset_hash", "tokenizer_hash", "teacher_hash", "num_samples", "num_tokens", "max_seq_length"):
        assert getattr(got.manifest, key) == getattr(ref.manifest, key), key
    assert len(got) == N
    for i in range(N):
        a, b = got[i], ref[i]
        assert a.num_tokens == b.num_tokens > 0, i
        assert torch.equal(a.ids, b.ids), f"sample {i}: top-k ids differ"
        torch.testing.assert_close(a.values, b.values, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(a.lse, b.lse, atol=2e-5, rtol=2e-5)
        assert abs(a.seq_logprob - b.seq_logprob) < 1e-4 * max(1.0, abs(b.seq_logprob)), i
    return got


@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_compute_topk_logits_equals_one_process(slurm_cluster, assets, tmp_path, tp):
    """DP=2 (two shards; submitted from a tmp dir with NEMO_KD_DIR) and TP=2 (one shard, vocab-parallel
    top-k; submitted from the checkout): the store equals the single-process one."""
    env = job_env(TEACHER=assets["teacher"], DATA=assets["data"], STORE=tmp_path / "store", TOKENIZER=assets["tok"],
                  TP=tp, TOP_K=K, MAX_SEQ_LENGTH=MAX_LEN)
    if tp == 1:
        env["NEMO_KD_DIR"] = str(REPO)
    job = _ok(sbatch("compute_topk_logits.sbatch", ["values_dtype=float32", "batch_size=4", "progress=false"],
                     workdir=tmp_path, env=env, submit_dir=tmp_path if tp == 1 else REPO))
    store = _assert_same_store(tmp_path / "store", assets["store"])
    assert len(store.manifest.shards) == 2 // tp
    log = job.log()
    assert f"repository {REPO}," in log and f"restart 0" in log, log


def test_served_teacher_job_and_an_extraction_job_pointed_at_it(slurm_cluster, assets, tmp_path):
    """serve_teacher.sbatch (a TP=2 teacher on 2 tasks) publishes its URL once it answers;
    compute_topk_logits.sbatch with TEACHER_URL_FILE (2 client tasks: DP, one shard each) waits for it and
    fills the store: top-k ids equal the one-process store's, log-probs within fp32 rounding."""
    import socket

    from nemo_kd.teacher.store import StoreReader

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url_file = tmp_path / "teacher.url"
    server = sbatch("serve_teacher.sbatch", workdir=tmp_path, wait=False,
                    env=job_env(TEACHER=assets["teacher"], TP=2, PORT=port, URL_FILE=url_file, MAX_LOGPROBS=K))
    try:
        _ok(sbatch("compute_topk_logits.sbatch", ["values_dtype=float32", "batch_size=4", "progress=false"],
                   workdir=tmp_path, timeout=300,
                   env=job_env(TEACHER_URL_FILE=url_file, TEACHER_WAIT_S=240, DATA=assets["data"],
                               STORE=tmp_path / "store", TOKENIZER=assets["tok"], TOP_K=K, MAX_SEQ_LENGTH=MAX_LEN)))
        assert re.fullmatch(rf"http://[\w.-]+:{port}", url_file.read_text().strip()), url_file.read_text()
    finally:
        subprocess.run(["scancel", str(server.job_id)], timeout=30)
    assert "nemo_kd: teacher served on http://" in server.log(), server.log()
    got, ref = StoreReader(tmp_path / "store", verify_checksums=True), StoreReader(assets["store"])
    assert len(got.manifest.shards) == 2 and len(got) == len(ref) == N
    assert got.manifest.extensions["served_teacher"]["lse_available"] is False
    for i in range(N):
        a, b = got[i], ref[i]
        assert a.num_tokens == b.num_tokens > 0, i
        assert torch.equal(a.ids, b.ids), f"sample {i}: top-k ids differ"
        torch.testing.assert_close(a.values - a.lse[:, None], b.values - b.lse[:, None], atol=2e-5, rtol=2e-5)
        assert abs(a.seq_logprob - b.seq_logprob) < 1e-4 * max(1.0, abs(b.seq_logprob)), i
    wait_for_end(server, 90)


# --------------------------------------------------------------------------- training


def _student_overrides(assets, steps, micro_batch=2, global_batch=4):
    a = _arch(assets["vocab"])
    return [f"model.student.{k}={v}" for k, v in a.items()] + [
        f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "model.optim.lr=1e-2", "model.optim.warmup_steps=1", "model.optim.min_lr=1e-3",
        f"model.data.train_ds.max_seq_length={MAX_LEN}", f"model.data.train_ds.micro_batch_size={micro_batch}",
        f"model.data.train_ds.global_batch_size={global_batch}", "model.parallel.seed=7",
    ]


def _tb_scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for root, _, files in os.walk(log_dir):
        for f in sorted(files):
            if f.startswith("events.out.tfevents"):
                acc = EventAccumulator(os.path.join(root, f), size_guidance={"scalars": 0})
                acc.Reload()
                if tag in acc.Tags()["scalars"]:
                    values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return [v for _, v in sorted(values)]


def _nemo_weights(path):
    """The full student weights inside a .nemo (a tar holding model_weights.ckpt)."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("model_weights.ckpt"))
        return torch.load(tar.extractfile(member), map_location="cpu", weights_only=True)


def _assert_trained(job, log_dir, assets, steps):
    nemo = Path(log_dir) / "student.nemo"
    assert nemo.exists(), job.fail(f"no {nemo}")
    weights = {k: w for k, w in _nemo_weights(nemo).items() if torch.is_tensor(w)}
    rows, hidden = weights["student.output_layer.weight"].shape  # full (TP-gathered) student, vocab padded
    assert hidden == 32 and rows >= assets["vocab"], (rows, hidden)
    assert all(torch.isfinite(w).all() for w in weights.values())
    losses = _tb_scalars(log_dir, "loss")
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-2:]) < 0.85 * sum(losses[:2]), losses
    assert "tensor_model_parallel_size: 2" in job.log()


def test_train_offline_tp2(slurm_cluster, assets, tmp_path):
    log_dir = tmp_path / "run"
    env = job_env(DATA=assets["data"], STORE=assets["store"], TOKENIZER=assets["tok"], TP=2, LOG_DIR=log_dir)
    job = _ok(sbatch("train_gpt_kd.sbatch", _student_overrides(assets, 8), workdir=tmp_path, env=env))
    _assert_trained(job, log_dir, assets, 8)


def test_train_online_tp2(slurm_cluster, assets, tmp_path):
    log_dir = tmp_path / "run"
    env = job_env(TEACHER=assets["teacher"], DATA=assets["data"], TOKENIZER=assets["tok"], TP=2, LOG_DIR=log_dir)
    job = _ok(sbatch("train_gpt_kd_online.sbatch", _student_overrides(assets, 8), workdir=tmp_path, env=env))
    _assert_trained(job, log_dir, assets, 8)


# --------------------------------------------------------------------------- data pipelines

_RESPONSE_FILTER = ["response_filter.require_finished=false", "response_filter.max_repeated_ngram_fraction=null",
                    "response_filter.max_consecutive_repeats=null"]
_PIPELINE_MAX_LEN = 48


def _pipeline_env(assets, out):
    return job_env(PROMPTS=assets["prompts"], OUT=out, TEACHER=assets["teacher"], STUDENT=assets["student"],
                   TOKENIZER=assets["tok"], MAX_SEQ_LENGTH=_PIPELINE_MAX_LEN)


def _one_process(config_name, assets, out, args):
    """The pipeline in this process (a world of one) from the same Hydra config and overrides as the
    job: the ones the .sbatch script derives from its environment, then the job's extra arguments."""
    from hydra import compose, initialize_config_dir

    from dist_utils import WorldOfOne
    from nemo_kd.generation import dasd_pipeline, preference_pipeline

    script = [f"prompts={assets['prompts']}", f"output_dir={out}", f"teacher.checkpoint={assets['teacher']}",
              f"teacher.tokenizer={assets['tok']}", f"student.checkpoint={assets['student']}",
              f"student.tokenizer={assets['tok']}", "parallel.tensor_model_parallel_size=1",
              f"max_seq_length={_PIPELINE_MAX_LEN}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name=config_name, overrides=script + list(args))
    module = {"build_dasd_data": dasd_pipeline, "build_preference_pairs": preference_pipeline}[config_name]
    with WorldOfOne():
        return module.run_from_config(cfg)


def _assert_same_rows(one_dir, two_dir, name, keys):
    a, b = _jsonl(Path(one_dir) / name), _jsonl(Path(two_dir) / name)
    assert len(a) == len(b) > 0, name
    for i, (x, y) in enumerate(zip(a, b)):
        for key in keys:
            assert key in x, (name, key, sorted(x))
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], abs=1e-5), (name, i, key)
            else:
                assert x[key] == y[key], (name, i, key)
    return a


def test_build_preference_pairs_equals_one_process(slurm_cluster, assets, tmp_path):
    """Two data-parallel tasks write the responses, judgements and pairs of one process."""
    args = ["score=teacher_logprob", "batch_size=8", "progress=false", "pair_filter.min_margin=0.2",
            "teacher.num_samples=1", "teacher.sampling.temperature=0.0", "teacher.sampling.max_new_tokens=6",
            "student.num_samples=3", "student.sampling.temperature=1.0", "student.sampling.max_new_tokens=6",
            "student.sampling.seed=3", *_RESPONSE_FILTER]
    job = _ok(sbatch("build_preference_pairs.sbatch", args, workdir=tmp_path,
                     env=_pipeline_env(assets, tmp_path / "two")))
    one = _one_process("build_preference_pairs", assets, tmp_path / "one", args)
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["pairs"] == one["pairs"] > 0, (report, one, job.log())
    for name in ("student_responses.jsonl", "teacher_responses.jsonl"):
        _assert_same_rows(tmp_path / "one", tmp_path / "two", name, ("prompt_index", "sample", "response"))
    _assert_same_rows(tmp_path / "one", tmp_path / "two", "pairs.jsonl", ("chosen", "rejected", "chosen_score",
                                                                            "rejected_score"))


def test_build_dasd_data_equals_one_process(slurm_cluster, assets, tmp_path):
    """Two data-parallel tasks write each stage's candidates and train.jsonl of one process."""
    args = ["batch_size=8", "progress=false", "teacher.sampling.max_new_tokens=8",
            "stages=[{name: low, temperature: 0.6, num_samples: 2}, {name: high, temperature: 1.0, num_samples: 2}]",
            *_RESPONSE_FILTER]
    job = _ok(sbatch("build_dasd_data.sbatch", args, workdir=tmp_path, env=_pipeline_env(assets, tmp_path / "two")))
    _one_process("build_dasd_data", assets, tmp_path / "one", args)
    for stage, temperature in (("low", 0.6), ("high", 1.0)):
        rows = _assert_same_rows(tmp_path / "one", tmp_path / "two", f"{stage}/teacher_responses.jsonl",
                                 ("prompt_index", "sample", "response", "temperature"))
        assert len(rows) == 2 * len(PROMPTS) and {r["temperature"] for r in rows} == {temperature}, job.log()
        _assert_same_rows(tmp_path / "one", tmp_path / "two", f"{stage}/train.jsonl", ("messages",))


# --------------------------------------------------------------------------- preemption: signal, requeue, resume

# 12 steps an epoch (24 samples, global batch 2 over DP=2): the signal lands mid-epoch, so the resumed
# run must also restore the sampler's position, and then crosses epoch boundaries.
REQUEUE_STEPS, EVERY = 60, 4


@pytest.mark.slow
def test_signal_requeues_and_resumes_bit_identical(slurm_cluster, assets, tmp_path):
    """``scancel --batch --signal=USR1`` (what ``#SBATCH --signal=B:USR1@120`` does before the time limit)
    once the first periodic checkpoint exists: the tasks checkpoint and exit 0, the batch shell
    requeues the job, which runs again (Restarts=1), resumes from the checkpoint and ends; its final
    student weights equal an uninterrupted run of the same command bit for bit (DP=2). A restart from
    scratch would end with the same weights too (the run is deterministic): the log must show the
    restore of the signal's checkpoint and no step before it trained again."""
    args = _student_overrides(assets, REQUEUE_STEPS, micro_batch=1, global_batch=2) + [
        f"exp_manager.checkpoint_callback_params.every_n_train_steps={EVERY}",
        "exp_manager.create_tensorboard_logger=false"]

    def submit(name, wait):
        env = job_env(DATA=assets["data"], STORE=assets["store"], TOKENIZER=assets["tok"], TP=1,
                      LOG_DIR=tmp_path / name)
        return sbatch("train_gpt_kd.sbatch", args, workdir=tmp_path, env=env, wait=wait, job_name=name)

    job = submit("interrupted", wait=False)
    ckpt_dir = tmp_path / "interrupted" / "checkpoints"
    first = wait_for(lambda: ckpt_dir.is_dir() and [p for p in ckpt_dir.iterdir() if f"step={EVERY}" in p.name],
                     150, f"the first periodic checkpoint (step={EVERY}) in {ckpt_dir}", job, poll=0.1)
    assert job.info()["JobState"] == "RUNNING", job.fail(f"finished before it could be signalled ({first})")
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job.job_id)], check=True, timeout=30)
    reference = submit("uninterrupted", wait=True)  # the requeue delay (cred_expire) overlaps this run
    _ok(reference)

    info = wait_for_end(job, 180, restarts=1)
    log = job.log()
    if info["JobState"] != "COMPLETED" or info["ExitCode"] != "0:0":
        job.fail(f"requeued run ended {info['JobState']} {info['ExitCode']}")
    first_run, _, second_run = log.partition("(restart 1)")
    assert second_run, job.fail("no second run in the log")
    assert "SIGUSR1: asking the tasks to checkpoint and stop" in first_run
    assert f"requeueing job {job.job_id}" in first_run
    assert "student saved to" not in first_run  # preempted: a checkpoint, not the final model
    restored = re.search(r"Restoring states from the checkpoint path at (\S+step=(\d+)-last\.ckpt)", second_run)
    assert restored, job.fail("the requeued run restored no -last checkpoint")
    stopped = int(restored.group(2))
    assert EVERY <= stopped < REQUEUE_STEPS and Path(restored.group(1)).parent == ckpt_dir, restored.group(0)
    retrained = [int(n) for n in re.findall(r"global step (\d+):", second_run) if int(n) <= stopped]
    assert not retrained, job.fail(f"the requeued run trained steps {retrained} again (stopped at {stopped})")
    assert f"global step {REQUEUE_STEPS}:" in second_run

    a = _nemo_weights(tmp_path / "interrupted" / "student.nemo")
    b = _nemo_weights(tmp_path / "uninterrupted" / "student.nemo")
    assert a.keys() == b.keys()
    tensors = [k for k in a if torch.is_tensor(a[k])]
    assert len(tensors) > 10 and all(a[k] is None and b[k] is None for k in a.keys() - set(tensors))
    diff = [k for k in tensors if not torch.equal(a[k], b[k])]
    assert not diff, f"weights differ after resume: {diff}"
