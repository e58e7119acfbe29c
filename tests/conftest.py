import os
import sys

import pytest

# Make `tests/dist_utils.py` importable as `dist_utils` and keep CPU tests deterministic and light.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Triton decides at import time whether kernels run through its CPU interpreter. Other
# modules (megatron-core, torch) may import triton before the kernel tests do, so the
# switch must be set here, before any test module is collected. A GPU run that wants
# compiled kernels sets TRITON_INTERPRET=0 explicitly.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tokenizers unpacked from .nemo files go to a content-addressed cache (nemo_kd.models.nemo_artifacts):
# one per test session, not the user's ~/.cache/nemo_kd (subprocesses inherit it).
if "NEMO_KD_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["NEMO_KD_CACHE_DIR"] = tempfile.mkdtemp(prefix="nemo_kd_test_cache_")


@pytest.fixture
def small_blocks(monkeypatch):
    """Rows span several vocabulary blocks of the fused Triton kernels (and the interpreter stays fast);
    nothing to shrink where the kernels do not import (the torch paths are still checked)."""
    try:
        from nemo_kd.kernels import full_kd_triton as fk
        from nemo_kd.kernels import logprobs_triton as lt
    except ImportError:
        return
    for mod, names in ((fk, ("FWD_BLOCK_V", "BWD_BLOCK_V")), (lt, ("FWD_BLOCK_V", "BWD_BLOCK_V", "BLOCK_J"))):
        for name in names:
            monkeypatch.setattr(mod, name, 4 if name == "BLOCK_J" else 32)
