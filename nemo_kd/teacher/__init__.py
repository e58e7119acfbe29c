"""Teacher top-k logits extraction and the offline logits store.

* :mod:`nemo_kd.teacher.store` – the sharded, memory-mapped, resumable store (numpy).
* re-exported from :mod:`nemo_kd.losses.token_stats`: top-k / log-sum-exp over vocab-parallel
  logits (torch), the statistics the store keeps, which the losses share.

Names are imported lazily so that a store-only process does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "nemo_kd.losses.token_stats": (
        "NonFiniteLogitsError",
        "TeacherTokenStats",
        "check_finite_logits",
        "teacher_token_stats",
        "vocab_parallel_logsumexp",
        "vocab_parallel_topk",
    ),
    "nemo_kd.teacher.store": (
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
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'nemo_kd.teacher' has no attribute {name!r}")
