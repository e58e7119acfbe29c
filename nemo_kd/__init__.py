"""nemo_kd: knowledge distillation of large language models for NeMo / Megatron-core.

Organised by what each part does:

* :mod:`nemo_kd.parallel` – torch.distributed + Megatron parallel state bootstrap (CPU and GPU).
* :mod:`nemo_kd.models`   – Megatron-core GPT teacher/student builders and layer specs.
* :mod:`nemo_kd.losses`   – vocab-parallel distillation, SFT and preference losses.
* :mod:`nemo_kd.data`     – datasets, tokenisation, masks.
* :mod:`nemo_kd.teacher`  – teacher top-k logits extraction and the logits store.
* :mod:`nemo_kd.align`    – cross-tokenizer alignment.
* :mod:`nemo_kd.convert`  – Hugging Face <-> Megatron checkpoint conversion.
"""

__version__ = "0.1.0"


def _allow_nemo_restore() -> None:
    """Let NeMo instantiate ``nemo_kd.*`` classes when restoring a ``.nemo`` file.

    NeMo 3.0 only instantiates Hydra ``_target_`` classes from approved module
    prefixes; without this, ``restore_from`` raises ``UnsafeTargetError``.
    NeMo is optional: the loss library and Megatron pieces work without it.
    """
    try:
        from nemo.core.classes import common
    except Exception:  # NeMo not installed (or failing to import): nothing to register.
        return
    prefixes = getattr(common, "ALLOWED_TARGET_PREFIXES", None)
    if prefixes is None:
        return
    if isinstance(prefixes, list):
        if "nemo_kd." not in prefixes:
            prefixes.append("nemo_kd.")
    elif isinstance(prefixes, (tuple, set, frozenset)):
        if "nemo_kd." not in prefixes:
            common.ALLOWED_TARGET_PREFIXES = type(prefixes)(list(prefixes) + ["nemo_kd."])
