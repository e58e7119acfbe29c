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
Lightning checkpoints are Megatron ``dist_checkpointing`` directories
(:mod:`nemo_kd.models.checkpointing`): every rank writes its shards of the student and the
optimizer under global keys, so a run resumes at another TP/PP/DP layout; Lightning's
own state (loops, callbacks, ``consumed_samples``) goes into the same directory. The
model must expose its :class:`~nemo_kd.models.engine.DistillationEngine` as ``.engine``.

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

_RESTORED = "_nemo_kd_restored_by_strategy"


def _plain_containers(obj):
    """OmegaConf nodes (NeMo's hyper-parameters) as dicts/lists and classes as names, so that ``common.pt``
    loads with ``torch.load(weights_only=True)``."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, type):  # e.g. Lightning's ``hparams_type``: kept by name
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, dict):
        return {k: _plain_containers(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain_containers(v) for v in obj)
    return obj

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

    # -- Lightning checkpoints: Megatron dist_checkpointing directories (reshardable across TP/PP/DP)
    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        """Every rank saves its shards of the student and the optimizer into the directory
        ``filepath`` (:func:`nemo_kd.models.checkpointing.save_training_checkpoint`); the
        rest of Lightning's checkpoint (loops, callbacks, ``consumed_samples``) rides along
        as plain containers in its ``common.pt``."""
        from nemo_kd.models.checkpointing import save_training_checkpoint

        # optimizer_states: the adapter's empty placeholders (Lightning checks they exist)
        rest = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        save_training_checkpoint(self.lightning_module.engine, str(filepath), _plain_containers(rest))

    def remove_checkpoint(self, filepath) -> None:
        from nemo_kd.models.checkpointing import remove_training_checkpoint

        if self.global_rank == 0:
            remove_training_checkpoint(str(filepath))

    def load_checkpoint(self, checkpoint_path):
        """Restore student, optimizer, scheduler and RNG straight into the engine (at this
        run's layout); return Lightning's part of the checkpoint for its loops and hooks."""
        from nemo_kd.models.checkpointing import load_training_checkpoint

        checkpoint = load_training_checkpoint(self.lightning_module.engine, str(checkpoint_path))
        checkpoint[_RESTORED] = True
        return checkpoint

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        if not checkpoint.get(_RESTORED):
            super().load_model_state_dict(checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        if not checkpoint.get(_RESTORED):
            super().load_optimizer_state_dict(checkpoint)

    @property
    def distributed_sampler_kwargs(self):
        # Data-parallel rank/size, not the world: TP/PP peers must see the same samples.
        return dict(num_replicas=state.dp_size(), rank=state.dp_rank()) if state.is_initialized() else None
