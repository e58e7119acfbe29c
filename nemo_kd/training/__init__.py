"""Running a distillation: the run's config checked whole (:mod:`.run_config`) and preemption-safe
checkpointing (:mod:`.preemption`). The engine, the NeMo model class and the checkpoint format
still live in :mod:`nemo_kd.models` (``engine``, ``distillation_model``, ``checkpointing``)."""
