import os
import sys

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
