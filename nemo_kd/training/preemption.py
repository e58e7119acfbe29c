"""Save and stop on a preemption signal: the step finishes, every rank agrees, one checkpoint.

Slurm warns a job before it ends it: ``#SBATCH --signal=B:USR1@120`` signals the batch shell
120 s ahead of the time limit (``examples/slurm/*.sbatch`` forward it to every task), and
``scancel``/preemption send SIGTERM before SIGKILL. :class:`PreemptionCheckpoint` turns either
into: finish the current optimizer step, agree across all ranks (any rank that saw the
signal is enough: ``srun`` may deliver it to some tasks first), write the ``-last``
checkpoint through the run's checkpoint callback (what ``exp_manager.resume_if_exists``
picks up), and stop ``trainer.fit``. The recipe then exits 0 without ``student.nemo``
(:attr:`PreemptionCheckpoint.preempted`), and the batch script requeues the job.

Unlike NeMo's ``PreemptionCallback`` (CUDA only, SIGTERM only, rank 0 only, ``sys.exit``
inside the loop), it works on CPU and GPU, for any list of signals, and lets Lightning end
the fit normally (loggers flushed, ``on_train_end`` hooks run).

The agreement costs one all-reduce of one integer per step over the default group.
"""

from __future__ import annotations

import logging
import signal
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

__all__ = ["PreemptionCheckpoint"]

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """On any of ``signals``: save the last checkpoint after the current step and stop."""

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGUSR1, signal.SIGTERM)):
        self.signals = list(signals)
        self.received: Optional[signal.Signals] = None
        self.preempted = False
        self._previous: Dict[signal.Signals, object] = {}
        self._installed_early = False

    # -- signal handlers: only remember; the work happens at the step boundary
    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum)

    def install(self) -> None:
        """Take the signals now (idempotent). A recipe calls it before building the models, so that a
        signal that comes while a large model loads is kept for the first step instead of killing the
        process (SIGUSR1's default action); ``on_train_start`` installs them otherwise."""
        self._installed_early = True
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_start(self, trainer, pl_module) -> None:
        # Again at train start: Lightning's SignalConnector registers its own handlers in between.
        for sig in self.signals:
            if signal.getsignal(sig) != self._handler:
                previous = signal.signal(sig, self._handler)
                self._previous.setdefault(sig, previous)

    def uninstall(self) -> None:
        """Give the signals back to the handlers found before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def on_train_end(self, trainer, pl_module) -> None:
        # Installed early, the recipe uninstalls after trainer.fit: Lightning's SignalConnector puts back
        # the handlers it found (ours) at its teardown, after this hook.
        if not self._installed_early:
            self.uninstall()

    def _anyone_signalled(self, device) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.preempted or not self._anyone_signalled(pl_module.device):
            return
        self.preempted = True
        name = self.received.name if self.received is not None else "a signal on another rank"
        log.warning("preemption (%s): saving a checkpoint after step %d and stopping", name, trainer.global_step)
        checkpoint = _checkpoint_callback(trainer.callbacks)
        if checkpoint is None:
            raise RuntimeError("preemption signal received but the run has no checkpoint callback "
                               "(exp_manager.create_checkpoint_callback=false): nothing can be saved")
        # on_train_batch_end fires before Lightning counts the batch as completed, while the optimizer
        # step already advanced global_step: count it now so that the resumed run does not replay it.
        from nemo.utils.exp_manager import _flush_in_flight_batch_progress

        _flush_in_flight_batch_progress(trainer)
        # A step that is also due a periodic checkpoint gets it, as in an uninterrupted run: the checkpoint
        # callback runs after this one (Lightning orders checkpoint callbacks last) and skips a step that
        # already has a save, so saving only -last here would lose, e.g., step=6 of every_n_train_steps=3.
        checkpoint.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if checkpoint._last_global_step_saved != trainer.global_step:
            checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
        trainer.should_stop = True


def _checkpoint_callback(callbacks: List[Callback]) -> Optional[ModelCheckpoint]:
    found = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    return found[0] if found else None
