"""torch.distributed + Megatron-core parallel state: the one place it is set up and read.

Every other module asks *this* module for process groups and ranks (``tp_group()``,
``pp_rank()``, ``is_pipeline_last_stage()`` ...) instead of reaching into
``megatron.core.parallel_state`` directly, so the bootstrap (and its CPU variant) stays
in one file.

Typical use::

    cfg = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=1, seed=1234)
    initialize_parallel(cfg)       # torch.distributed from env (torchrun / srun) + Megatron groups
    ...                             # build models, train
    destroy_parallel()             # tears down Megatron groups (and torch.distributed if we made it)

The same code runs on CPU (gloo; :mod:`nemo_kd.parallel.cpu_shim` is installed
automatically) and on GPU (nccl).
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel

from nemo_kd.config_keys import check_keys

__all__ = [
    "ParallelConfig",
    "initialize_parallel",
    "destroy_parallel",
    "is_initialized",
    "seed_model_parallel_rng",
    "default_backend",
    "world_size",
    "global_rank",
    "tp_group",
    "tp_rank",
    "tp_size",
    "pp_group",
    "pp_rank",
    "pp_size",
    "dp_group",
    "dp_rank",
    "dp_size",
    "cp_group",
    "cp_size",
    "ep_group",
    "ep_rank",
    "ep_size",
    "etp_size",
    "etp_rank",
    "expert_dp_group",
    "expert_dp_size",
    "is_pipeline_first_stage",
    "is_pipeline_last_stage",
    "device",
]


@dataclasses.dataclass
class ParallelConfig:
    """Model-parallel layout of one run.

    Data parallelism is implicit: ``dp = world_size / (tp * pp * cp)``.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    # Megatron's sequence parallelism: the activations outside the TP linears (norms, dropout,
    # residuals) split along the sequence over the TP ranks. Needs TP > 1.
    sequence_parallel: bool = False
    # Mixture of experts: the experts of each MoE layer split over this many ranks (tokens reach their
    # experts through the token dispatcher's all-to-all / all-gather). Expert parallelism reuses the
    # data-parallel ranks: world_size must be divisible by expert_tensor_parallel_size * EP * PP.
    expert_model_parallel_size: int = 1
    # Tensor parallelism inside each expert. None: tensor_model_parallel_size (Megatron's default).
    expert_tensor_parallel_size: Optional[int] = None
    seed: int = 1234
    # None: "nccl" when CUDA is available, else "gloo".
    backend: Optional[str] = None
    # Collective timeout, minutes (torch.distributed and Megatron's groups).
    timeout_minutes: int = 30

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "expert_model_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelConfig.{name} must be a positive integer, got {value!r}")
        etp = self.expert_tensor_parallel_size
        if etp is not None and (not isinstance(etp, int) or isinstance(etp, bool) or etp < 1):
            raise ValueError(f"ParallelConfig.expert_tensor_parallel_size must be null (= tensor_model_parallel_size) "
                             f"or a positive integer, got {etp!r}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or self.pipeline_model_parallel_size < 2):
            raise ValueError(
                "virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2 and a value >= 1, "
                f"got vpp={vpp}, pp={self.pipeline_model_parallel_size}"
            )

        if not isinstance(self.sequence_parallel, bool):
            raise ValueError(f"ParallelConfig.sequence_parallel must be true or false, got {self.sequence_parallel!r}")
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            raise ValueError("ParallelConfig.sequence_parallel=true splits the sequence over the tensor-parallel ranks: "
                             f"it needs tensor_model_parallel_size >= 2, got {self.tensor_model_parallel_size}")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    @property
    def expert_model_parallel_world(self) -> int:
        """Ranks one copy of the experts spans: expert TP * EP * PP (the world must be a multiple)."""
        etp = self.expert_tensor_parallel_size or self.tensor_model_parallel_size
        return etp * self.expert_model_parallel_size * self.pipeline_model_parallel_size

    @classmethod
    def from_dict(cls, d) -> "ParallelConfig":
        """From a dict or OmegaConf node; unknown keys are an error (catches typos)."""
        d = _to_plain_dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        check_keys("ParallelConfig", d, names)
        return cls(**d)


def _to_plain_dict(d) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(d, DictConfig):
            return OmegaConf.to_container(d, resolve=True)
    except ImportError:  # OmegaConf is optional here
        pass
    return dict(d)


# Whether initialize_parallel created the default process group (then destroy_parallel
# also destroys it; a group created by a caller, e.g. a test spawner, is left alone).
_OWNS_PROCESS_GROUP = False
_CONFIG: Optional[ParallelConfig] = None


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _env_int(*names: str) -> Optional[int]:
    for name in names:
        if os.environ.get(name) not in (None, ""):
            return int(os.environ[name])
    return None


def _init_torch_distributed(cfg: ParallelConfig) -> None:
    """Initialise the default process group from torchrun / SLURM environment variables."""
    global _OWNS_PROCESS_GROUP
    rank = _env_int("RANK", "SLURM_PROCID")
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID")
    if rank is None or world is None:
        # A plain single-process run (python script.py, pytest): world of one.
        rank, world, local_rank = 0, 1, 0
    backend = cfg.backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_rank or 0)
    timeout = timedelta(minutes=cfg.timeout_minutes)
    if world == 1:
        # Nobody to meet: an in-process store, no TCP port (a fixed default port made two single-process
        # runs on one machine, say extraction beside training, fail with EADDRINUSE).
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr() or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    _OWNS_PROCESS_GROUP = True


def _slurm_master_addr() -> Optional[str]:
    """First host of the SLURM allocation when launched by srun without MASTER_ADDR."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        import subprocess

        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except Exception:  # scontrol missing: a single-node nodelist is already a hostname
        return nodelist.split(",")[0] if "[" not in nodelist else None


def initialize_parallel(cfg: ParallelConfig) -> None:
    """Set up torch.distributed (if needed), Megatron's parallel groups and per-rank RNG.

    Raises:
        ValueError: world size not divisible by ``TP * PP * CP``.
        RuntimeError: Megatron's model parallel state is already initialised.
    """
    global _CONFIG
    if mpu.model_parallel_is_initialized():
        raise RuntimeError("Megatron model parallel state is already initialised; call destroy_parallel() first")
    if not torch.cuda.is_available():
        from nemo_kd.parallel.cpu_shim import install_cpu_shim

        install_cpu_shim()
    if not dist.is_initialized():
        _init_torch_distributed(cfg)
    elif cfg.backend is not None and dist.get_backend() != cfg.backend:
        raise ValueError(f"torch.distributed already runs backend {dist.get_backend()!r}, config asks {cfg.backend!r}")

    world = dist.get_world_size()
    if world % cfg.model_parallel_size != 0:
        if _OWNS_PROCESS_GROUP:  # leave the process as we found it
            destroy_parallel()
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size "
            f"({cfg.tensor_model_parallel_size}) * pipeline_model_parallel_size "
            f"({cfg.pipeline_model_parallel_size}) * context_parallel_size ({cfg.context_parallel_size}) "
            f"= {cfg.model_parallel_size}"
        )
    if world % cfg.expert_model_parallel_world != 0:
        if _OWNS_PROCESS_GROUP:
            destroy_parallel()
        raise ValueError(
            f"world size {world} is not divisible by expert_tensor_parallel_size "
            f"({cfg.expert_tensor_parallel_size or cfg.tensor_model_parallel_size}) * expert_model_parallel_size "
            f"({cfg.expert_model_parallel_size}) * pipeline_model_parallel_size ({cfg.pipeline_model_parallel_size}) "
            f"= {cfg.expert_model_parallel_world}"
        )
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        expert_tensor_parallel_size=cfg.expert_tensor_parallel_size,
        distributed_timeout_minutes=cfg.timeout_minutes,
    )
    _CONFIG = cfg
    seed_model_parallel_rng(cfg.seed)


def seed_model_parallel_rng(seed: int) -> None:
    """Seed torch and Megatron's RNG tracker the Megatron way.

    Every rank gets ``seed + 100 * pp_rank`` as its default seed (distinct dropout across
    pipeline stages, as Megatron-LM's ``_set_random_seed``); the tracker then holds the
    data-parallel state (same across TP) and the tensor-parallel state (distinct per TP rank).
    On GPU this is exactly ``model_parallel_cuda_manual_seed``; on CPU the tracker's states
    are CPU generator states (see :mod:`nemo_kd.parallel.cpu_shim`).
    """
    seed = seed + 100 * mpu.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
        return
    # CPU: mirror model_parallel_cuda_manual_seed's three tracked states with CPU
    # generator states (its ``add`` calls torch.cuda.get_rng_state, unusable without CUDA).
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tp = mpu.get_tensor_model_parallel_rank()
    ep, etp = mpu.get_expert_model_parallel_rank(), mpu.get_expert_tensor_parallel_rank()
    states = {
        random_names.data_parallel: seed,
        random_names.model_parallel: seed + 2718 + tp,
        random_names.expert_parallel: seed + 1024 + 100 * ep + etp,
    }
    tracker.set_states({name: torch.Generator().manual_seed(s).get_state() for name, s in states.items()})
    tracker.seeds_ = set(states.values())


class random_names:  # noqa: N801 - a namespace of Megatron's tracker names
    from megatron.core.tensor_parallel.random import (
        _DATA_PARALLEL_RNG_TRACKER_NAME as data_parallel,
        _EXPERT_PARALLEL_RNG_TRACKER_NAME as expert_parallel,
        _MODEL_PARALLEL_RNG_TRACKER_NAME as model_parallel,
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups and RNG tracker (and torch.distributed if we created it).

    Safe to call repeatedly and when nothing was initialised.
    """
    global _OWNS_PROCESS_GROUP, _CONFIG
    if mpu.model_parallel_is_initialized() or _CONFIG is not None:
        mpu.destroy_model_parallel()
    tensor_parallel.get_cuda_rng_tracker().reset()
    _CONFIG = None
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False


def is_initialized() -> bool:
    return mpu.model_parallel_is_initialized()


def config() -> Optional[ParallelConfig]:
    """The :class:`ParallelConfig` passed to :func:`initialize_parallel` (None before)."""
    return _CONFIG


def device() -> torch.device:
    """The device this rank computes on: its CUDA device, or CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ---- accessors (thin wrappers: the rest of nemo_kd never imports megatron's parallel_state) ----
def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def tp_group():
    return mpu.get_tensor_model_parallel_group()


def tp_rank() -> int:
    return mpu.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return mpu.get_tensor_model_parallel_world_size()


def pp_group():
    return mpu.get_pipeline_model_parallel_group()


def pp_rank() -> int:
    return mpu.get_pipeline_model_parallel_rank()


def pp_size() -> int:
    return mpu.get_pipeline_model_parallel_world_size()


def dp_group(with_context_parallel: bool = False):
    return mpu.get_data_parallel_group(with_context_parallel=with_context_parallel)


def dp_rank(with_context_parallel: bool = False) -> int:
    return mpu.get_data_parallel_rank(with_context_parallel=with_context_parallel)


def dp_size(with_context_parallel: bool = False) -> int:
    return mpu.get_data_parallel_world_size(with_context_parallel=with_context_parallel)


def cp_group():
    return mpu.get_context_parallel_group()


def cp_size() -> int:
    return mpu.get_context_parallel_world_size()


def ep_group():
    return mpu.get_expert_model_parallel_group()


def ep_rank() -> int:
    return mpu.get_expert_model_parallel_rank()


def ep_size() -> int:
    return mpu.get_expert_model_parallel_world_size()


def etp_size() -> int:
    return mpu.get_expert_tensor_parallel_world_size()


def etp_rank() -> int:
    return mpu.get_expert_tensor_parallel_rank()


def expert_dp_group():
    """The ranks holding the same experts (expert-data-parallel: their expert grads are reduced together)."""
    return mpu.get_expert_data_parallel_group()


def expert_dp_size() -> int:
    return mpu.get_expert_data_parallel_world_size()


def is_pipeline_first_stage(ignore_virtual: bool = True) -> bool:
    return mpu.is_pipeline_first_stage(ignore_virtual=ignore_virtual)


def is_pipeline_last_stage(ignore_virtual: bool = True) -> bool:
    return mpu.is_pipeline_last_stage(ignore_virtual=ignore_virtual)
