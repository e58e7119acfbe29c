"""A resume that looks like no resume (issue 13), through the recipe users run (``examples/train_gpt_kd.py``).

A run stopped and resumed with ``exp_manager.resume_if_exists`` leaves what an uninterrupted run leaves:
the same TensorBoard scalars at the same steps (no step logged twice, none shifted), the same checkpoint
names (no ``-v1``, the same top-k kept) and the same student. A run SIGKILLed in the middle of a checkpoint
save leaves a temporary directory that the next start removes (named in the log) before it resumes; while a
run holds its directory, a second training into it is refused, naming the first.

Runs: 8 steps of 4 samples (two epochs of the 16-sample world), a checkpoint every 2 steps, top-2 kept.
"""

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from test_distillation_model import world  # noqa: F401  (the module-scoped assets fixture)
from test_training_run import _as_a_new_process, _nemo_weights, _recipe, _run_cfg

STEPS, EVERY = 8, 2
TESTS = os.path.dirname(os.path.abspath(__file__))
TIMING = ("tokens/s", "loss_tokens/s", "padded_tokens/s", "train_step_timing in s")  # wall clock: the scalars that differ by run


def _cfg(world, log_dir, resume=False):  # noqa: F811
    cfg = _run_cfg(world, log_dir, steps=STEPS, every=EVERY, resume=resume)
    cfg.exp_manager.create_tensorboard_logger = True
    return cfg


def _events(path):
    """{tag: [(step, value), ...]} as TensorBoard shows ``path`` (a run directory: all its event files, in order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _event_files(log_dir):
    return sorted(glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*")))


def _checkpoints(log_dir):
    return sorted(os.listdir(os.path.join(str(log_dir), "checkpoints")))


def _no_versions_or_temps(log_dir):
    for path in glob.glob(os.path.join(str(log_dir), "**", "*"), recursive=True):
        name = os.path.basename(path)
        assert "-v1" not in name and ".tmp-" not in name and ".old-" not in name, path


def _same_as_uninterrupted(log_dir, reference):
    """TensorBoard, checkpoints and student of ``log_dir`` are the uninterrupted run's."""
    events = _events(log_dir)
    assert events.keys() == reference["events"].keys()
    assert [s for s, _ in events["loss"]] == list(range(STEPS))  # Lightning's logger steps: 0 .. N-1
    for tag, ref in reference["events"].items():
        assert [s for s, _ in events[tag]] == [s for s, _ in ref], tag  # every scalar: the same steps, once each
        if tag not in TIMING:
            assert events[tag] == ref, tag  # and the same values (bit-identical training)
    assert _checkpoints(log_dir) == reference["checkpoints"]
    _no_versions_or_temps(log_dir)
    resumed = _nemo_weights(str(log_dir / "student.nemo"))
    assert resumed.keys() == reference["weights"].keys()
    for key, value in reference["weights"].items():
        if torch.is_tensor(value):
            assert torch.equal(resumed[key], value), key


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):  # noqa: F811
    log_dir = tmp_path_factory.mktemp("uninterrupted")
    _as_a_new_process()
    _recipe()(_cfg(world, log_dir))
    out = dict(events=_events(log_dir), checkpoints=_checkpoints(log_dir),
               weights=_nemo_weights(str(log_dir / "student.nemo")))
    assert out["checkpoints"] == ["gpt_kd--step=6.ckpt", "gpt_kd--step=8-last.ckpt", "gpt_kd--step=8.ckpt"]
    assert len(_event_files(log_dir)) == 1 and not os.path.exists(log_dir / "checkpoints" / ".writer.lock")
    return out


# ---------------------------------------------------------------------------------------- preempted, resumed


@pytest.mark.parametrize("stop", [5, 6, 4], ids=["between-checkpoints", "at-a-checkpoint", "at-an-epoch-end"])
def test_preempted_and_resumed_run_logs_and_keeps_what_an_uninterrupted_run_does(
        world, tmp_path, monkeypatch, reference, stop):  # noqa: F811
    """Before: the resumed run logged its first step at the stopped run's last TensorBoard step (``loss`` at
    steps 0..4, 4..6 for a stop at 5: Lightning saves ``_batches_that_stepped`` before counting the step),
    forgot the stopped run's top-k checkpoints (steps 2 and 4 were never removed), stopped at a
    checkpoint step, lost that step's checkpoint (only ``-last`` was written) and, stopped at the end of
    an epoch (4 steps each), logged all later steps as epoch 0."""
    from nemo_kd.training.preemption import PreemptionCheckpoint

    def raise_signal(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == stop - 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(PreemptionCheckpoint, "on_train_batch_start", raise_signal, raising=False)
    _as_a_new_process()
    _recipe()(_cfg(world, tmp_path))
    monkeypatch.undo()
    assert f"gpt_kd--step={stop}-last.ckpt" in _checkpoints(tmp_path)
    assert (f"gpt_kd--step={stop}.ckpt" in _checkpoints(tmp_path)) == (stop % EVERY == 0)
    [first] = _event_files(tmp_path)

    _as_a_new_process()
    _recipe()(_cfg(world, tmp_path, resume=True))
    _same_as_uninterrupted(tmp_path, reference)
    # each run's own file: the stopped one ends at TensorBoard step stop-1, the resumed one starts at stop
    second = [f for f in _event_files(tmp_path) if f != first]
    assert [s for s, _ in _events(first)["loss"]] == list(range(stop))
    assert [s for s, _ in _events(second[0])["loss"]] == list(range(stop, STEPS))


# ------------------------------------------------------------------- killed during a save, second writer refused

_DRIVER = textwrap.dedent('''
    """Train into argv[2]; at the step-6 -last checkpoint, once every rank wrote its part into the temporary
    directory, flush TensorBoard (what a flush_secs tick does), say so (argv[3]), wait for argv[4], SIGKILL."""
    import gc, json, os, signal, sys, time
    sys.path.insert(0, {tests!r})
    import conftest  # noqa: F401  (the suite's environment)
    from test_training_run import _recipe, _run_cfg
    import nemo_kd.models.checkpointing as ck

    world, log_dir, ready, go = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    save, barrier = ck.save_training_checkpoint, ck._barrier

    def killed_in_the_middle(engine, path, common=None):
        if path.endswith("step=6-last.ckpt"):
            calls = []

            def second_barrier_kills():
                calls.append(1)
                if len(calls) < 2:
                    return barrier()
                from torch.utils.tensorboard import SummaryWriter
                for w in [o for o in gc.get_objects() if isinstance(o, SummaryWriter)]:
                    w.flush()
                open(ready, "w").write(str(os.getpid()))
                while not os.path.exists(go):
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)

            ck._barrier = second_barrier_kills
        return save(engine, path, common)

    ck.save_training_checkpoint = killed_in_the_middle
    cfg = _run_cfg(world, log_dir, steps={steps}, every={every})
    cfg.exp_manager.create_tensorboard_logger = True
    _recipe()(cfg)
    sys.exit("not killed")
''')


@pytest.fixture(scope="module")
def killed(world, tmp_path_factory):  # noqa: F811
    """A training (subprocess) SIGKILLed while saving its step-6 ``-last`` checkpoint; while it waits there,
    with its lock held, a second training into its directory is tried here."""
    from nemo_kd.output_lock import OutputLockedError

    d = tmp_path_factory.mktemp("killed")
    log_dir, ready, go = d / "run", d / "ready", d / "go"
    driver = d / "driver.py"
    driver.write_text(_DRIVER.format(tests=TESTS, steps=STEPS, every=EVERY))
    plain_world = {k: str(v) if not isinstance(v, int) else v for k, v in world.items()}
    proc = subprocess.Popen([sys.executable, str(driver), json.dumps(plain_world), str(log_dir), str(ready), str(go)],
                            cwd=str(d), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the training to kill did not reach its step-6 save:\n{proc.communicate()[0][-5000:]}")
            time.sleep(0.2)
        before = _checkpoints(log_dir)
        with open(log_dir / "checkpoints" / ".writer.lock") as f:
            holder = json.load(f)
        refusal = None
        try:
            _recipe()(_cfg(world, log_dir, resume=True))
        except OutputLockedError as e:
            refusal = e
        after = _checkpoints(log_dir)
        go.write_text("")
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return dict(log_dir=log_dir, pid=proc.pid, returncode=proc.returncode, output=output, holder=holder,
                refusal=refusal, before=before, after=after)


def test_a_second_training_into_a_held_run_directory_is_refused_naming_the_holder(killed):
    assert killed["holder"]["pid"] == killed["pid"]
    error = killed["refusal"]
    assert error is not None, "the second training was not refused"
    assert f"pid {killed['pid']}" in str(error) and "driver.py" in str(error), str(error)
    assert "is being written by another process" in str(error) and "explicit_log_dir" in str(error)
    assert error.holder["pid"] == killed["pid"]
    assert killed["after"] == killed["before"]  # refused before touching anything
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # and no preemption handler left behind


def test_a_kill_during_a_checkpoint_save_is_cleaned_at_the_next_start_which_resumes(
        killed, reference, world, caplog):  # noqa: F811
    """Before: the temporary directory stayed until the next save (a checkpoint's size, for the whole
    resumed run), the resumed run re-saved step 6 as ``gpt_kd--step=6-v1.ckpt`` beside the killed run's
    step 6, and TensorBoard showed step 4 twice (logged before the kill and again after the resume)."""
    log_dir = killed["log_dir"]
    assert killed["returncode"] == -signal.SIGKILL, killed["output"][-3000:]
    left = _checkpoints(log_dir)
    [tmp] = [n for n in left if ".tmp-" in n]
    assert tmp.startswith("gpt_kd--step=6-last.ckpt.tmp-p") and f"p{killed['pid']}-" in tmp  # temp_tag names it
    assert "gpt_kd--step=4-last.ckpt" in left and "gpt_kd--step=6.ckpt" in left and ".writer.lock" in left
    assert [s for s, _ in _events(log_dir)["loss"]] == list(range(5))  # flushed before the kill: steps 1..5

    caplog.set_level(logging.INFO)
    _as_a_new_process()
    _recipe()(_cfg(world, log_dir, resume=True))
    removed = str(log_dir / "checkpoints" / tmp)
    assert f"{removed}: removed, the unfinished checkpoint of a killed save" in caplog.text
    assert "took over the lock of a writer that died while holding it (host" in caplog.text
    assert f"pid {killed['pid']}" in caplog.text
    _same_as_uninterrupted(log_dir, reference)  # resumed from step 4: steps 5.. logged once, step 6 re-saved
    assert not os.path.exists(log_dir / "checkpoints" / ".writer.lock")  # released at the end


# ---------------------------------------------------------------------------------------- the start-up repair


def _fake_checkpoint(path, step, mark=""):
    os.makedirs(os.path.join(path, "weights"))
    torch.save({"extra": {"global_step": step}}, os.path.join(path, "common.pt"))
    with open(os.path.join(path, "mark"), "w") as f:
        f.write(mark)


def test_the_start_repairs_what_killed_saves_left(tmp_path):
    """Each state a kill can leave, repaired as the resume needs it (no training: fake checkpoints)."""
    from nemo_kd.training.resume import repair_checkpoint_directory

    d = str(tmp_path)
    p = lambda name: os.path.join(d, name)  # noqa: E731
    # killed between the two renames of an overwrite: the new one is complete -> the swap is completed
    _fake_checkpoint(p("gpt_kd--step=4.ckpt.tmp-p11-host-a"), 4, "new")
    _fake_checkpoint(p("gpt_kd--step=4.ckpt.old-p11-host-a"), 4, "old")
    # ... and one whose new part is gone: the old one is put back
    _fake_checkpoint(p("gpt_kd--step=2.ckpt.old-p12-host-b"), 2, "old")
    # killed after the new -last was in place, before the old one was removed: exp_manager refuses two
    _fake_checkpoint(p("gpt_kd--step=6-last.ckpt"), 6)
    _fake_checkpoint(p("gpt_kd--step=8-last.ckpt"), 8)
    # NeMo's unfinished marker of a checkpoint a killed save was replacing (NeMo would delete it at setup)
    _fake_checkpoint(p("gpt_kd--step=8.ckpt"), 8)
    open(p("gpt_kd--step=8-unfinished"), "w").close()
    open(p("gpt_kd--step=10-unfinished"), "w").close()  # no checkpoint: NeMo's own clean-up removes it
    _fake_checkpoint(p("gpt_kd--step=10.ckpt.tmp-4242"), 10)  # a half-written one, named by pid (older saves)
    open(p("notes.tmp-1"), "w").close()  # not a save's directory
    # a removal (save_top_k) killed mid-delete: gone, never put back although no step=1 checkpoint exists
    _fake_checkpoint(p("gpt_kd--step=1.ckpt.del-p13-host-c"), 1)

    lines = repair_checkpoint_directory(d)
    assert sorted(os.listdir(d)) == ["gpt_kd--step=10-unfinished", "gpt_kd--step=2.ckpt", "gpt_kd--step=4.ckpt",
                                     "gpt_kd--step=8-last.ckpt", "gpt_kd--step=8.ckpt", "notes.tmp-1"]
    assert open(p("gpt_kd--step=4.ckpt/mark")).read() == "new" and open(p("gpt_kd--step=2.ckpt/mark")).read() == "old"
    text = "\n".join(lines)
    for expected in (f"{p('gpt_kd--step=4.ckpt')}: completed a save killed between its renames",
                     f"{p('gpt_kd--step=2.ckpt')}: put back the checkpoint a killed save was replacing",
                     f"{p('gpt_kd--step=4.ckpt.old-p11-host-a')}: removed",
                     f"{p('gpt_kd--step=10.ckpt.tmp-4242')}: removed, the unfinished checkpoint of a killed save",
                     f"{p('gpt_kd--step=6-last.ckpt')}: removed, a -last checkpoint a killed save had replaced "
                     "(step 6)",
                     f"{p('gpt_kd--step=8-unfinished')}: removed NeMo's unfinished-save marker",
                     f"{p('gpt_kd--step=1.ckpt.del-p13-host-c')}: removed, a checkpoint whose removal was killed"):
        assert expected in text, text
    assert repair_checkpoint_directory(d) == []  # nothing left to do


def test_a_checkpoint_is_removed_by_one_rename_first(tmp_path, monkeypatch):
    """save_top_k's removal: the name is gone before any file is deleted (a kill mid-delete cannot leave a
    half-deleted checkpoint that a resume would pick), and what a killed delete leaves is repaired."""
    from nemo_kd.models import checkpointing

    path = str(tmp_path / "gpt_kd--step=2.ckpt")
    _fake_checkpoint(path, 2)
    seen = []

    class Killed(BaseException):  # not KeyboardInterrupt: pytest takes that one as the end of the session
        pass

    def killed_rmtree(target, ignore_errors=False):  # the kill: nothing deleted, and the name already gone
        seen.append((target, os.path.exists(path), checkpointing.is_training_checkpoint(target)))
        raise Killed

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed_rmtree)
    with pytest.raises(Killed):
        checkpointing.remove_training_checkpoint(path)
    monkeypatch.undo()
    ((target, name_exists, complete),) = seen
    assert not name_exists and complete and ".ckpt.del-p" in target
    assert os.listdir(tmp_path) == [os.path.basename(target)]
    (line,) = checkpointing.repair_interrupted_saves(str(tmp_path))
    assert line == f"{target}: removed, a checkpoint whose removal was killed" and os.listdir(tmp_path) == []
    checkpointing.remove_training_checkpoint(path)  # a name that is gone already: nothing to do
