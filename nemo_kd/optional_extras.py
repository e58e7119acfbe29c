"""Missing optional GPU extras (Transformer Engine, apex) said once, in one line, instead of a dozen warnings.

Without Transformer Engine and apex, Megatron-core warns from every module that has a
fallback (``Transformer Engine and Apex are not installed. Falling back to ...`` from the
optimizer, its clip-grads, the FSDP mixed-precision helpers; ``Apex is not installed.
Falling back to Torch Norm`` from each layer-spec module), and NeMo's OneLogger telemetry
logs two lines about being disabled. On CPU, and wherever the ``local`` transformer
implementation is chosen, all of that is expected and none of it is actionable.

:func:`quiet_optional_extras` (run by ``import nemo_kd``: stdlib only, so it can run before
NeMo or Megatron is imported) drops exactly those messages: warnings filters matched on
their text, and a filter on OneLogger's two loggers. Every other warning is left alone.
:func:`report_optional_extras` (run when nemo_kd's Megatron-facing code is imported, see
:mod:`nemo_kd.parallel`) then logs the one line, once per process and on global rank 0::

    nemo_kd: optional GPU extras not installed: transformer_engine, apex (Megatron's local fallbacks are used)

For the filters to see the warnings, ``nemo_kd`` must be imported before Megatron (or NeMo,
which imports Megatron): recipes start with ``import nemo_kd``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings

__all__ = ["EXTRAS", "missing_extras", "quiet_optional_extras", "report_optional_extras"]

EXTRAS = ("transformer_engine", "apex")  # import names, in the order the line lists them

# Megatron-core 0.16's fallback warnings (UserWarning), matched from the start of the message.
_FALLBACK_WARNINGS = (
    r"Transformer Engine and Apex are not installed\. Falling back to ",
    r"Apex is not installed\. Falling back to Torch Norm",
)
# OneLogger (NeMo's telemetry) logger -> the start of its "disabled" messages.
_TELEMETRY_MESSAGES = {
    "nv_one_logger.api.config": "OneLogger: Setting error_handling_strategy to DISABLE_QUIETLY",
    "nv_one_logger.training_telemetry.api.training_telemetry_provider": "No exporters were provided.",
}

log = logging.getLogger("nemo_kd")
_state = {"quiet": False, "reported": False}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def quiet_optional_extras() -> None:
    """Install the filters (idempotent). Imports nothing outside the standard library."""
    if _state["quiet"]:
        return
    _state["quiet"] = True
    for pattern in _FALLBACK_WARNINGS:
        # category=Warning (matches their UserWarning), not UserWarning: NeMo's warning capture
        # (nemo_logging.Logger._warning_is_ignored) drops *every* warning of a category that has any
        # "ignore" filter naming exactly that category, whatever the message.
        warnings.filterwarnings("ignore", message=pattern, category=Warning)
    for name, prefix in _TELEMETRY_MESSAGES.items():
        # the logger object exists before its module does: the module's getLogger returns this one
        logging.getLogger(name).addFilter(_DropMessage(prefix))


def missing_extras() -> list:
    """The extras of :data:`EXTRAS` that cannot be imported here (found without importing them)."""
    missing = []
    for name in EXTRAS:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def _global_rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 0


def report_optional_extras() -> None:
    """Log the one line about missing extras: once per process, on global rank 0 (when any is missing)."""
    if _state["reported"]:
        return
    _state["reported"] = True
    missing = missing_extras()
    if missing and _global_rank() == 0:
        log.warning("nemo_kd: optional GPU extras not installed: %s (Megatron's local fallbacks are used)",
                    ", ".join(missing))
