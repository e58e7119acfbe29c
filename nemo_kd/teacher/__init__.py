"""Teacher top-k logits extraction and the offline logits store.

* :mod:`nemo_kd.teacher.topk`  – top-k / log-sum-exp over vocab-parallel logits (torch).
* :mod:`nemo_kd.teacher.store` – the sharded, memory-mapped, resumable store (numpy).

Names are imported lazily so that a store-only process does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "topk": (
        "NonFiniteLogitsError",
        "TeacherTokenStats",
        "check_finite_logits",
        "teacher_token_stats",
        "vocab_parallel_logsumexp",
        "vocab_parallel_topk",
    ),
    "store": (
        "ShardInfo",
        "StoreCorruptError",
        "StoreError",
        "StoreIncompleteError",
        "StoreManifest",
        "StoreMismatchError",
        "StoreReader",
        "StoreWriter",
        "TeacherTopK",
        "finalize_manifest",
        "shard_for_sample",
        "shard_sample_range",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(f"nemo_kd.teacher.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'nemo_kd.teacher' has no attribute {name!r}")
