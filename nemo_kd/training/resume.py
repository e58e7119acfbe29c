"""A resume that looks like no resume: continuous TensorBoard steps, the same checkpoint names, one writer.

A run stopped (preemption, a kill, a time limit) and resumed with ``exp_manager.resume_if_exists``
must leave what an uninterrupted run leaves. Lightning 2.4 and NeMo's ``exp_manager`` miss that in
three ways, each fixed here:

* **TensorBoard steps shift by one.** Loggers take their step from
  ``fit_loop.epoch_loop._batches_that_stepped``, which ``_TrainingEpochLoop.on_advance_end``
  increments *after* the step's ``on_train_batch_end`` hooks and validation – where every
  mid-run checkpoint is written (``ModelCheckpoint``, :class:`~nemo_kd.training.preemption.PreemptionCheckpoint`).
  The checkpoint holds the count of the batch before, and the resumed run logs its first step
  at the step of the last one logged before the stop (one duplicate, all later steps one lower).
  Likewise ``batch_progress.current.completed`` is one behind (``increment_completed`` follows
  the hooks too), which moves every later epoch boundary by one batch. :func:`settle_loop_state`
  writes the state the loop has once the step is finished (``GPTDistillationModel`` calls it when
  a checkpoint is saved and, for checkpoints saved before, when one is loaded).
* **Steps logged twice after a kill.** Steps between the last checkpoint and a kill are logged,
  then trained and logged again by the resumed run. :class:`ResumeContinuity` starts a resumed
  run's TensorBoard file with a ``SessionLog.START`` at its first step (what ``SummaryWriter``'s
  ``purge_step`` writes): TensorBoard drops the earlier events at that step and later. (Nor does
  a resumed run log Lightning's placeholder ``hp_metric`` at step 0 a second time.)
* **Older checkpoints forgotten.** NeMo's ``NeMoModelCheckpoint.load_state_dict`` drops the
  resumed top-k entries of checkpoints that are directories named ``*.ckpt`` (nemo_kd's), so the
  resumed run never removes the stopped run's checkpoints; :class:`ResumeContinuity` restores them.
* **``-v1`` duplicates.** ``ModelCheckpoint`` gives a checkpoint a ``-v1`` name when its name
  exists: a run killed after its step-6 checkpoint but before its step-6 ``-last`` resumes from
  step 3 and saves step 6 again, as ``...step=6-v1.ckpt``, next to the killed run's. With the step
  in the name (the recipe's names always have one) equal names mean the same step of the same
  run, so :class:`ResumeContinuity` turns the version counter off: the resumed run's checkpoint
  replaces the one of the trajectory that was killed (atomically, see
  :func:`~nemo_kd.models.checkpointing.save_training_checkpoint`).

**One writer.** :class:`TrainingRunLock` holds an :class:`~nemo_kd.output_lock.OutputLock` on the
run's checkpoint directory from before ``exp_manager`` looks at it until the recipe ends (global
rank 0 holds it; a second training into the same run directory is refused, naming the first).
With it held, the start repairs what a killed predecessor left (:func:`repair_checkpoint_directory`,
each repair in the log): the temporary directory of a save that did not finish (a checkpoint's
size), a save killed between its two renames (completed), the ``-last`` checkpoint a killed save
had replaced but not yet removed (``exp_manager`` refuses to resume from two) and NeMo's
``-unfinished`` marker of a checkpoint that is complete (NeMo would delete it at setup; nemo_kd's
saves are atomic, so a checkpoint that exists is complete).
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from typing import Any, Dict, List, Optional

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from nemo_kd.models.checkpointing import INTERRUPTED_SAVE_NAME, is_training_checkpoint, repair_interrupted_saves
from nemo_kd.output_lock import OutputLock, OutputLockedError, temp_tag

__all__ = ["ResumeContinuity", "TrainingRunLock", "checkpoint_directory", "repair_checkpoint_directory",
           "settle_loop_state"]

log = logging.getLogger(__name__)

UNFINISHED_SUFFIX = "-unfinished"  # NeMoModelCheckpoint.UNFINISHED_CHECKPOINT_SUFFIX
LOCK_WHAT = "training run's checkpoint directory"


# ---------------------------------------------------------------------------------------- Lightning's loop state


def settle_loop_state(checkpoint: Dict[str, Any]) -> None:
    """Make the loop state in ``checkpoint`` (a Lightning checkpoint dict) that of the finished step.

    Lightning 2.4 (``lightning/pytorch/loops/training_epoch_loop.py``) saves mid-step: ``advance``
    calls the ``on_train_batch_end`` hooks (the checkpoint callbacks save there) before
    ``batch_progress.increment_completed()``, and ``on_advance_end`` runs validation (checkpoints
    after validation) before ``self._batches_that_stepped += 1``. Saved as is, a resumed run logs
    its first step at the previous step's TensorBoard step and counts one batch too few in the epoch.

    ``_batches_that_stepped`` is set to ``global_step``: the model steps the optimizer once per
    training batch (manual optimisation; Lightning refuses gradient accumulation there), so after a
    finished step the two are equal. ``completed`` is raised to ``processed`` (what NeMo's
    ``_flush_in_flight_batch_progress`` does to a live loop), and a step that was its epoch's last
    leaves the epoch finished. Idempotent: a checkpoint saved at the end of training or already
    settled is left as it is.
    """
    fit = (checkpoint.get("loops") or {}).get("fit_loop")
    if not isinstance(fit, dict) or "global_step" not in checkpoint:
        return
    epoch_loop = fit.get("epoch_loop.state_dict")
    if isinstance(epoch_loop, dict):
        epoch_loop["_batches_that_stepped"] = int(checkpoint["global_step"])
    progress = fit.get("epoch_loop.batch_progress")
    for part in ("total", "current"):
        counts = (progress or {}).get(part)
        if isinstance(counts, dict) and counts.get("completed", 0) < counts.get("processed", 0):
            counts["completed"] = counts["processed"]
    epochs = (fit.get("epoch_progress") or {}).get("current") or {}
    if isinstance(progress, dict) and progress.get("is_last_batch") and \
            epochs.get("processed", 0) < epochs.get("started", 0):
        # The step was its epoch's last. Resumed mid-epoch-end, Lightning trains the next batch as one more of
        # this epoch (the epoch loop is not done while restarting: _is_validation_done) and every later epoch
        # boundary moves. Save what the loops hold once the epoch is over (the "epoch-end checkpoint" Lightning
        # asks for): the resumed run starts the next epoch. That epoch's on_train_epoch_end hooks do not run
        # (nothing of nemo_kd's: checkpoints and validation are step-based, metrics per step).
        for part in ("total", "current"):
            counts = fit["epoch_progress"].get(part)
            if isinstance(counts, dict):
                counts["processed"] = counts["completed"] = counts.get("started", 0)
        for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress"):
            current = (fit.get(key) or {}).get("current")
            if isinstance(current, dict):
                for name in current:
                    current[name] = 0
        progress["is_last_batch"] = False
        checkpoint["epoch"] = int(epochs["completed"])


# ------------------------------------------------------------------------------------------------ the callback


def _version_counter_off(checkpoint: ModelCheckpoint) -> bool:
    """Turn ``ModelCheckpoint``'s ``-v<N>`` names off when its names carry the step (then a name that exists
    is this run's own checkpoint of that step, from before a kill, and is replaced)."""
    if "{step" not in (checkpoint.filename or ""):
        return False  # names without the step: distinct checkpoints may share one, the counter keeps them apart
    checkpoint._enable_version_counter = False  # ModelCheckpoint(enable_version_counter=False); exp_manager has no key
    return True


def _no_warning_for_the_lock_file(checkpoint: ModelCheckpoint) -> None:
    """A new run's checkpoint directory holds the run's lock file (``.writer.lock``, :class:`TrainingRunLock`)
    and nothing else: not the "exists and is not empty" of ``ModelCheckpoint.setup`` (which runs after this
    callback's setup: Lightning puts checkpoint callbacks last)."""
    directory = checkpoint.dirpath
    names = os.listdir(directory) if directory and os.path.isdir(directory) else []
    if names and all(n.startswith(".") and n.endswith(".lock") for n in names):
        message = f"Checkpoint directory {directory} exists and is not empty"
        warnings.filterwarnings("ignore", message=re.escape(message))


def _is_saved(path: str) -> bool:
    """``path`` is a finished checkpoint: a file, or a directory (nemo_kd's checkpoints are directories named
    ``*.ckpt``), without NeMo's unfinished-save marker."""
    from nemo.utils.callbacks.nemo_model_checkpoint import NeMoModelCheckpoint

    return os.path.exists(path) and not NeMoModelCheckpoint.is_checkpoint_unfinished(path)


def _restore_top_k(callback: ModelCheckpoint, saved: Dict[str, Any]) -> None:
    """Give ``callback`` back the top-k bookkeeping of the checkpoint it resumed from, less what no longer exists.

    NeMo's ``NeMoModelCheckpoint.load_state_dict`` drops every entry whose ``.ckpt`` file (or directory
    *without* ``.ckpt``) is missing (``_remove_invalid_entries_from_topk``): all of nemo_kd's, whose
    directories keep the suffix. The resumed run then forgets its older checkpoints and never removes
    them (a run of 8 steps with every_n_train_steps=2, save_top_k=2, resumed at step 5, kept steps
    2, 4, 6 and 8 instead of 6 and 8). Same selection as NeMo's, with the right existence test.
    """
    if saved.get("dirpath", callback.dirpath) != callback.dirpath or "best_k_models" not in saved:
        return  # another directory: Lightning keeps none of it either
    callback.best_k_models = {k: v for k, v in saved["best_k_models"].items() if _is_saved(k)}
    if callback.best_k_models:
        ranked = sorted(callback.best_k_models, key=callback.best_k_models.get, reverse=callback.mode != "min")
        callback.kth_best_model_path, callback.best_model_path = ranked[-1], ranked[0]
        callback.kth_value = callback.best_k_models[ranked[-1]]
        callback.best_model_score = callback.best_k_models[ranked[0]]
    else:
        callback.kth_best_model_path, callback.kth_value = "", None
        callback.best_model_path, callback.best_model_score = "", None


class ResumeContinuity(Callback):
    """No ``-v1`` checkpoint names, the top-k checkpoints of the stopped run still counted, and TensorBoard
    steps that continue the stopped run's (module docstring)."""

    def __init__(self):
        self._saved_top_k: List[tuple] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint):
                _version_counter_off(callback)
                _no_warning_for_the_lock_file(callback)
        if trainer.ckpt_path:
            from lightning.pytorch.loggers import TensorBoardLogger

            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    # TensorBoardLogger(default_hp_metric=True) logs a placeholder hp_metric=-1 at step 0 when the
                    # fit starts (log_hyperparams, after this hook): the stopped run logged it already
                    logger._default_hp_metric = False

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        # runs before the checkpoint callbacks' load_state_dict, which loses the top-k of nemo_kd's checkpoints
        states = checkpoint.get("callbacks") or {}
        self._saved_top_k = [(cb, states[cb.state_key]) for cb in trainer.callbacks
                             if isinstance(cb, ModelCheckpoint) and cb.state_key in states]

    def on_train_start(self, trainer, pl_module) -> None:
        for callback, saved in self._saved_top_k:
            _restore_top_k(callback, saved)
        self._saved_top_k = []
        if not trainer.ckpt_path or not trainer.is_global_zero:
            return
        # The step the resumed run logs first (settle_loop_state made it the checkpoint's global_step).
        step = int(trainer.fit_loop.epoch_loop._batches_that_stepped)
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                _purge_from(logger.experiment, step)
                log.info("resumed at step %d: TensorBoard events of %s at step %d and later from before the stop "
                         "are superseded", trainer.global_step, logger.log_dir, step)


def _purge_from(writer, step: int) -> None:
    """What ``SummaryWriter(purge_step=step)`` writes first: readers drop earlier events at ``step`` and later."""
    if type(writer).__module__.startswith("tensorboardX"):
        from tensorboardX.proto.event_pb2 import Event, SessionLog
    else:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    file_writer = writer._get_file_writer() if hasattr(writer, "_get_file_writer") else writer.file_writer
    file_writer.add_event(Event(step=step, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))
    file_writer.flush()


# ------------------------------------------------------------------------------------- the checkpoint directory


def _plain(node) -> dict:
    if node is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def checkpoint_directory(exp_cfg) -> Optional[str]:
    """The checkpoint directory ``exp_manager(trainer, exp_cfg)`` will use, known before it runs; ``None``
    when ``exp_manager`` makes a new (dated) version folder for this run.

    Mirrors ``nemo.utils.exp_manager.get_log_dir`` for a trainer without a logger (the recipe's
    ``trainer.logger: false``) and ``configure_checkpointing`` (``<log_dir>/checkpoints``)."""
    exp = _plain(exp_cfg)
    dirpath = (exp.get("checkpoint_callback_params") or {}).get("dirpath")
    if dirpath:
        return os.path.realpath(os.path.expanduser(str(dirpath)))
    if exp.get("explicit_log_dir"):
        log_dir = str(exp["explicit_log_dir"])
    else:
        from nemo.constants import NEMO_ENV_VARNAME_VERSION

        root = os.path.join(str(exp.get("exp_dir") or os.path.join(os.getcwd(), "nemo_experiments")),
                            str(exp.get("name") or "default"))
        version = exp.get("version") or os.environ.get(NEMO_ENV_VARNAME_VERSION)
        if version:
            log_dir = os.path.join(root, str(version))
        elif exp.get("resume_if_exists"):
            log_dir = root  # no version folders when resuming
        else:
            return None
    return os.path.realpath(os.path.join(os.path.expanduser(log_dir), "checkpoints"))


def _step_of(path: str) -> int:
    import torch

    try:
        common = torch.load(os.path.join(path, "common.pt"), map_location="cpu", weights_only=True)
        return int((common.get("extra") or {}).get("global_step", common.get("engine_step", -1)))
    except Exception:  # noqa: BLE001  unreadable: the oldest
        return -1


def _repairs(directory: str) -> List[tuple]:
    """What :func:`repair_checkpoint_directory` would change of what ``exp_manager`` reads when resuming:
    ``("swap", old)``, ``("last", path)`` (a ``-last`` checkpoint to remove), ``("marker", path)``."""
    found: List[tuple] = []
    if not os.path.isdir(directory):
        return found
    names = sorted(os.listdir(directory))
    for name in names:
        match = INTERRUPTED_SAVE_NAME.fullmatch(name)
        if match and match["kind"] == "old" and not os.path.exists(os.path.join(directory, match["path"])):
            found.append(("swap", os.path.join(directory, name)))
    lasts = [os.path.join(directory, n) for n in names
             if n.endswith("last.ckpt") and os.path.isdir(os.path.join(directory, n))]
    complete = [p for p in lasts if is_training_checkpoint(p)]
    if len(lasts) > 1 and complete:
        newest = max(complete, key=lambda p: (_step_of(p), os.path.getmtime(p)))
        found += [("last", p) for p in lasts if p != newest]
    for name in names:
        if name.endswith(UNFINISHED_SUFFIX) and os.path.isfile(os.path.join(directory, name)):
            base = os.path.join(directory, name[:-len(UNFINISHED_SUFFIX)])
            if any(is_training_checkpoint(p) for p in (base + ".ckpt", base)):
                found.append(("marker", os.path.join(directory, name)))
    return found


def repair_checkpoint_directory(directory: str) -> List[str]:
    """Repair ``directory`` after a killed run (module docstring); return one line per repair. Global rank 0,
    with the run's lock held, before ``exp_manager`` looks for the checkpoint to resume from."""
    import shutil

    done = repair_interrupted_saves(directory, keep_tag=temp_tag())
    for kind, path in _repairs(directory):
        if kind == "last":
            step = _step_of(path)
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"{path}: removed, a -last checkpoint a killed save had replaced (step {step})")
        elif kind == "marker":
            os.remove(path)
            done.append(f"{path}: removed NeMo's unfinished-save marker of a complete checkpoint (a save that "
                        "replaced it was killed; nemo_kd's saves are atomic)")
    return done


def _wait_for_repairs(directory: str, timeout: float = 300.0) -> None:
    """Other ranks: read the checkpoint directory only once rank 0 repaired it (each rank's ``exp_manager``
    picks the checkpoint to resume from on its own; they must pick the same)."""
    deadline = time.monotonic() + timeout
    while _repairs(directory):
        if time.monotonic() > deadline:
            log.warning("%s still needs repairs after %.0f s (global rank 0 repairs it at start): going on", directory,
                        timeout)
            return
        time.sleep(0.5)


class TrainingRunLock:
    """The run's one-writer lock on its checkpoint directory (global rank 0), and the start-up repair.

    ``acquire(exp_cfg)`` before ``exp_manager``; ``attach(trainer)`` after it (locks the directory
    ``exp_manager`` chose if it could not be known before: a new dated version folder);
    ``release()`` at the end (``finally``). Raises :class:`~nemo_kd.output_lock.OutputLockedError`
    naming the holder when another process trains into the same directory.
    """

    def __init__(self):
        self.directory: Optional[str] = None
        self.repairs: List[str] = []
        self._lock = None

    @staticmethod
    def _rank_zero() -> bool:
        from nemo.utils.get_rank import is_global_rank_zero

        return is_global_rank_zero()

    def _take(self, directory: str) -> None:
        self.directory = directory
        if not self._rank_zero():
            _wait_for_repairs(directory)
            return
        lock = OutputLock(directory, what=LOCK_WHAT)
        try:
            lock.acquire()
        except OutputLockedError as e:
            raise OutputLockedError(f"{e} (The run directory is exp_manager.explicit_log_dir, or exp_dir/name.)",
                                    e.directory, e.holder, e.lock_path) from None
        self._lock = lock
        self.repairs = repair_checkpoint_directory(directory)
        for line in self.repairs:
            log.warning("%s", line)

    def acquire(self, exp_cfg) -> "TrainingRunLock":
        directory = checkpoint_directory(exp_cfg)
        if directory is not None:
            self._take(directory)
        return self

    def attach(self, trainer) -> None:
        """After ``exp_manager``: the checkpoint callback's directory is the one held (else hold that one)."""
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None)
        if directory is None:
            return
        directory = os.path.realpath(str(directory))
        if directory != self.directory:
            self.release()
            self._take(directory)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()
