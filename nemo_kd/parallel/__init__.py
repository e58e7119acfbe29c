"""torch.distributed + Megatron-core parallel state bootstrap (CPU/gloo and GPU/nccl).

See :mod:`nemo_kd.parallel.state` (groups, ranks, seeding) and
:mod:`nemo_kd.parallel.cpu_shim` (running Megatron's training paths on CPU).
"""

from nemo_kd.optional_extras import report_optional_extras

report_optional_extras()  # Megatron comes in here: "optional GPU extras not installed: ..." once, rank 0

from nemo_kd.parallel.cpu_shim import install_cpu_shim  # noqa: E402
from nemo_kd.parallel.state import (  # noqa: E402
    ParallelConfig,
    cp_group,
    cp_size,
    destroy_parallel,
    device,
    dp_group,
    dp_rank,
    dp_size,
    global_rank,
    initialize_parallel,
    is_initialized,
    is_pipeline_first_stage,
    is_pipeline_last_stage,
    pp_group,
    pp_rank,
    pp_size,
    seed_model_parallel_rng,
    tp_group,
    tp_rank,
    tp_size,
    world_size,
)

__all__ = [
    "ParallelConfig",
    "initialize_parallel",
    "destroy_parallel",
    "install_cpu_shim",
    "is_initialized",
    "seed_model_parallel_rng",
    "device",
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
    "is_pipeline_first_stage",
    "is_pipeline_last_stage",
]
