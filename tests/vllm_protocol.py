"""vLLM's own protocol models (``vllm.entrypoints.openai.completion.protocol``), importable on a CPU machine.

``pip install vllm --no-deps`` (the wheel pinned by version and sha256) plus the few pure-Python packages its
protocol modules import, into ``${NEMO_KD_CACHE:-~/.cache/nemo_kd}/vllm-protocol-<version>/`` (cached between
runs, written to a temporary directory and renamed into place). Nothing of it is imported by the test process:
:func:`validate` runs the models in a subprocess with that directory on ``PYTHONPATH``, so its pydantic and
fastapi cannot shadow the suite's. Fails (never skips) when the packages cannot be fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, List

VLLM_VERSION = "0.34.0"
VLLM_WHEEL = "vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl"
VLLM_WHEEL_SHA256 = "79ca4b3cd74aec08c4bf476bdf0cb15735b605ae5368526a2faae1e30f044ca2"
# What vllm/entrypoints/openai/completion/protocol.py imports beyond the suite's environment (measured by
# importing it until nothing was missing), pinned.
PROTOCOL_DEPS = ("psutil==7.2.2", "pyzmq==27.3.0", "fastapi==0.165.0", "pybase64==1.5.1", "cachetools==8.0.2",
                 "prometheus_client==0.26.0", "openai==3.60.0", "openai-harmony==0.0.8", "cbor2==6.3.0",
                 "uvloop==0.23.0", "py-cpuinfo==9.0.0")


def _root() -> Path:
    base = os.environ.get("NEMO_KD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nemo_kd")
    return Path(base) / f"vllm-protocol-{VLLM_VERSION}"


def protocol_path() -> Path:
    """The directory to put on ``PYTHONPATH`` (installed on first use)."""
    root = _root()
    if (root / "READY").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    with tempfile.TemporaryDirectory(prefix="vllm_protocol_", dir=root.parent) as tmp:
        wheels, target = Path(tmp) / "wheels", Path(tmp) / "lib"
        subprocess.run(pip + ["download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels),
                              f"vllm=={VLLM_VERSION}"], check=True, timeout=1200)
        wheel = wheels / VLLM_WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != VLLM_WHEEL_SHA256:
            raise RuntimeError(f"{wheel.name}: sha256 {digest} != pinned {VLLM_WHEEL_SHA256}")
        # Only the Python sources (the wheel's compiled kernels are never loaded by the protocol modules).
        subprocess.run(pip + ["install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
                       check=True, timeout=1200)
        subprocess.run(pip + ["install", "--only-binary", ":all:", "--target", str(target), *PROTOCOL_DEPS],
                       check=True, timeout=1200)
        for so in target.glob("vllm/**/*.so"):
            so.unlink()
        (target / "READY").write_text(VLLM_VERSION)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(target, root)
    return root


_CHECK = r'''
import json, sys
from vllm.entrypoints.openai.completion.protocol import CompletionResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse, ModelList
models = {"completion": CompletionResponse, "error": ErrorResponse, "models": ModelList}
out = []
for item in json.load(open(sys.argv[1])):
    parsed = models[item["kind"]].model_validate(item["body"])
    out.append(parsed.model_dump(mode="json"))
json.dump(out, open(sys.argv[2], "w"))
'''


def validate(items: List[dict]) -> List[Any]:
    """Each ``{"kind": completion | error | models, "body": ...}`` validated by vLLM's model and dumped back as
    vLLM serialises it (``model_dump(mode="json")``); a body vLLM's model refuses raises with its message."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(items))
        env = dict(os.environ, PYTHONPATH=str(protocol_path()), VLLM_LOGGING_LEVEL="ERROR")
        proc = subprocess.run([sys.executable, "-c", _CHECK, str(src), str(dst)], env=env, capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise AssertionError(f"vLLM's protocol models refused a body:\n{proc.stderr[-4000:]}")
        return json.loads(dst.read_text())
