"""Unknown configuration keys: one error, naming the closest valid key.

Every settings object of nemo_kd (``GPTModelConfig``, ``DistillationLossConfig``,
``ParallelConfig``, ``OptimConfig``, the data and teacher sections, the run's whole Hydra
config) refuses keys it does not know, because a misspelt key that is silently ignored
trains the wrong model for hours. This module words that refusal once: the section, the
unknown keys, for each the closest valid key (``difflib``) and an optional hint (e.g. a
NeMo-Aligner key's new name), then the valid keys.

Pure Python, no imports of the rest of the package: every layer may use it.
"""

from __future__ import annotations

import difflib
from typing import Callable, Iterable, Optional

__all__ = ["UnknownConfigKeyError", "check_keys", "closest_key"]


class UnknownConfigKeyError(ValueError):
    """A configuration section holds keys nobody reads."""


def closest_key(key: str, valid: Iterable[str]) -> Optional[str]:
    """The valid key most like ``key`` (``None`` when nothing is close)."""
    valid = list(valid)
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if match:
        return match[0]
    # A key whose last word is a valid key's (``kd_loss`` vs ``kd_loss_type``) is close too.
    lowered = key.lower()
    for name in sorted(valid, key=len):
        if lowered in name.lower() or name.lower() in lowered:
            return name
    return None


def check_keys(section: str, given: Iterable[str], valid: Iterable[str],
               hint: Optional[Callable[[str], Optional[str]]] = None) -> None:
    """Raise :class:`UnknownConfigKeyError` if ``given`` holds keys outside ``valid``.

    ``section`` names where the keys were found (``"model.kd"``, ``"GPTModelConfig"``);
    ``hint(key)`` may add one sentence about a key (its new name, why it moved).
    """
    valid = sorted(set(valid))
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return
    lines = []
    for key in unknown:
        extra = hint(key) if hint is not None else None
        near = closest_key(key, valid)
        line = f"  {key!r}"
        if near is not None:
            line += f": did you mean {near!r}?"
        if extra:
            line += f" ({extra})"
        lines.append(line)
    raise UnknownConfigKeyError(f"unknown {section} keys {unknown}:\n" + "\n".join(lines)
                                + f"\nvalid keys: {valid}")
