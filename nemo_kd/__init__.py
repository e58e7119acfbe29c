"""nemo_kd: knowledge distillation of large language models for NeMo / Megatron-core.

Organised by what each part does:

* :mod:`nemo_kd.parallel` – torch.distributed + Megatron parallel state bootstrap (CPU and GPU).
* :mod:`nemo_kd.models`   – Megatron-core GPT teacher/student builders and layer specs.
* :mod:`nemo_kd.losses`   – vocab-parallel distillation, SFT and preference losses.
* :mod:`nemo_kd.data`     – datasets, tokenisation, masks.
* :mod:`nemo_kd.teacher`  – teacher top-k logits extraction and the logits store.
* :mod:`nemo_kd.align`    – cross-tokenizer alignment.
* :mod:`nemo_kd.convert`  – Hugging Face <-> Megatron checkpoint conversion.

Importing this package is cheap (no torch, NeMo or Megatron) and makes two process-wide
arrangements: NeMo, whenever it is imported, may restore ``nemo_kd.*`` classes from a
``.nemo`` (``ModelPT.restore_from`` needs nothing else), and Megatron's warnings about
missing Transformer Engine / apex become one line (:mod:`nemo_kd.optional_extras`).
"""

import sys as _sys

from nemo_kd.optional_extras import quiet_optional_extras as _quiet_optional_extras

__version__ = "0.1.0"

_quiet_optional_extras()  # before Megatron is imported: its TE/apex fallback warnings become one line

# NeMo's module holding the allow-list of ``_target_`` prefixes it instantiates on restore.
_NEMO_COMMON = "nemo.core.classes.common"


def _allow_nemo_restore(common=None) -> None:
    """Let NeMo instantiate ``nemo_kd.*`` classes when restoring a ``.nemo`` file.

    NeMo 3.0 only instantiates Hydra ``_target_`` classes from approved module prefixes
    (``nemo.core.classes.common.ALLOWED_TARGET_PREFIXES``, a plain list it reads at every
    check; NeMo has no registration API); without ``"nemo_kd."`` there,
    ``ModelPT.restore_from`` raises ``UnsafeTargetError``. NeMo is optional: the loss
    library and Megatron pieces work without it.
    """
    if common is None:
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


class _RegisterWhenNemoLoads:
    """``sys.meta_path`` finder: after NeMo's ``common`` module executes, add ``nemo_kd.`` to its allow-list.

    This is what makes ``import nemo_kd`` enough for ``ModelPT.restore_from`` of a nemo_kd
    ``.nemo`` without importing NeMo (seconds, and Megatron with it) in processes that never
    use it: the console scripts, the store readers. It finds nothing itself: it asks the
    finders after it for the module's spec and wraps the loader's ``exec_module``; then it
    leaves ``sys.meta_path``.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _NEMO_COMMON:
            return None
        for finder in _sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return None
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _allow_nemo_restore(module)

        loader.exec_module = exec_then_register  # this spec's loader instance only (one per module file)
        self.remove()
        return spec

    def remove(self) -> None:
        try:
            _sys.meta_path.remove(self)
        except ValueError:
            pass


# NeMo already imported: register now; else when (if ever) it is.
if _NEMO_COMMON in _sys.modules:
    _allow_nemo_restore(_sys.modules[_NEMO_COMMON])
elif not any(isinstance(f, _RegisterWhenNemoLoads) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _RegisterWhenNemoLoads())
