import os
import sys

# Make `tests/dist_utils.py` importable as `dist_utils` and keep CPU tests deterministic and light.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "2")
