"""A minimal Lightning strategy for Megatron-core models (:class:`MegatronStrategy`).

Lightning's ``DDPStrategy`` does three things a Megatron model must not have:

* it wraps the LightningModule in ``torch.nn.parallel.DistributedDataParallel`` —
  gradients are already reduced over the data-parallel group by Megatron's own
  ``DistributedDataParallel`` inside :class:`~nemo_kd.models.engine.DistillationEngine`
  (and a torch DDP over the *world* would wrongly average tensor/pipeline shards);
* outside fitting it broadcasts rank 0's parameters to every rank
  (``_sync_module_states``) — wrong for TP/PP shards;
* at teardown it moves the module to CPU, which would detach the parameters from
  Megatron's gradient buffers on GPU.

:class:`MegatronStrategy` keeps the rest of ``DDPStrategy`` (cluster environment,
ranks, ``barrier``/``broadcast``/``reduce`` over the default group, rank-zero
logging) and additionally makes sure torch.distributed *and* Megatron's parallel
state are initialised exactly once (:func:`nemo_kd.parallel.initialize_parallel`;
if the model's constructor already did it, nothing happens).

Processes: a single process (``python train.py``) or one process per device started
externally (``torchrun`` / ``srun``); Lightning never spawns processes itself here.
Lightning checkpoints: under TP/PP (or a distributed optimizer with DP > 1) every rank
holds different weights/optimizer state, so every rank writes its own file
(``<path>`` on rank 0, ``<path>.rank<N>`` on rank N) and reads its own when resuming
(same world size and layout required). Otherwise rank 0 writes one file, as usual.

Batches are sharded over data-parallel ranks by our own
:class:`~nemo_kd.data.kd_dataset.GlobalBatchSampler`, so build the ``Trainer`` with
``use_distributed_sampler=False``.

    trainer = Trainer(accelerator="cpu", devices=1, strategy=MegatronStrategy(ParallelConfig(...)),
                      use_distributed_sampler=False, max_steps=...)
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from nemo_kd.parallel import state
from nemo_kd.parallel.state import ParallelConfig

__all__ = ["MegatronStrategy"]

log = logging.getLogger(__name__)


class MegatronStrategy(DDPStrategy):
    """``DDPStrategy`` without the torch DDP wrapper, with Megatron parallel state.

    Args:
        parallel: the model-parallel layout (used only if the parallel state is not
            initialised yet, e.g. when the model is built after the Trainer).
        **kwargs: passed to ``DDPStrategy`` (``process_group_backend``, ``timeout``...).
    """

    strategy_name = "nemo_kd_megatron"

    def __init__(self, parallel: Optional[ParallelConfig] = None, **kwargs):
        super().__init__(**kwargs)
        self.parallel_config = parallel or ParallelConfig()

    # -- processes: launched externally (torchrun/srun) or a single process
    def _configure_launcher(self) -> None:
        self._launcher = None

    def setup_distributed(self) -> None:
        if state.is_initialized():  # the model's constructor already set everything up
            import torch.distributed as dist

            self.set_world_ranks()
            if self.world_size != dist.get_world_size():
                raise RuntimeError(
                    f"Trainer expects {self.world_size} processes (num_nodes × devices) but torch.distributed has "
                    f"{dist.get_world_size()}; launch with torchrun/srun and set devices = processes per node"
                )
            return
        self.set_world_ranks()
        # initialise torch.distributed (from the launcher's environment) and Megatron's groups
        state.initialize_parallel(self.parallel_config)

    def set_world_ranks(self) -> None:
        super().set_world_ranks()
        rank_zero_only.rank = self.global_rank

    # -- no torch DDP wrapper, no rank-0 parameter broadcast
    def setup(self, trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def configure_ddp(self) -> None:  # the engine's Megatron DDP reduces gradients over the DP group
        pass

    def model_to_device(self) -> None:
        # Megatron builds parameters on their device already; only move if needed (CPU runs: no-op)
        assert self.model is not None
        if any(p.device != self.root_device for p in self.model.parameters()):
            self.model.to(self.root_device)

    def teardown(self) -> None:
        # Unlike DDPStrategy/Strategy.teardown, leave the module where it is (Megatron grad buffers point at it).
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    # -- Lightning checkpoints: one file per rank when ranks hold different state
    def _per_rank_checkpoints(self) -> bool:
        if not state.is_initialized():
            return False
        cfg = state.config()
        dist_opt = bool(getattr(self.lightning_module, "_optim_cfg", None)
                        and self.lightning_module._optim_cfg.use_distributed_optimizer)
        return state.tp_size() * state.pp_size() > 1 or (dist_opt and state.dp_size() > 1) or (
            cfg is not None and cfg.context_parallel_size > 1)

    def _rank_path(self, filepath) -> str:
        """``filepath`` on global rank 0, ``filepath.rank<N>`` on the others (per-rank checkpoints)."""
        return str(filepath) if self.global_rank == 0 else f"{filepath}.rank{self.global_rank}"

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if not self._per_rank_checkpoints():
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        self.checkpoint_io.save_checkpoint(checkpoint, self._rank_path(filepath), storage_options=storage_options)

    def remove_checkpoint(self, filepath) -> None:
        if not self._per_rank_checkpoints():
            return super().remove_checkpoint(filepath)
        self.checkpoint_io.remove_checkpoint(self._rank_path(filepath))

    def load_checkpoint(self, checkpoint_path):
        if not self._per_rank_checkpoints():
            return super().load_checkpoint(checkpoint_path)
        return self.checkpoint_io.load_checkpoint(self._rank_path(checkpoint_path))

    @property
    def distributed_sampler_kwargs(self):
        # Data-parallel rank/size, not the world: TP/PP peers must see the same samples.
        return dict(num_replicas=state.dp_size(), rank=state.dp_rank()) if state.is_initialized() else None
