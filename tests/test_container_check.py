"""scripts/container_check.sh, the check the Dockerfile runs at build time, run here in the venv.

The full run must pass: every module of the package imported (the count is checked against the
.py files this test finds itself), the versions it prints are the ones this interpreter has, a
2-step engine smoke, and one line saying the Transformer Engine path cannot run here (no TE, no
GPU). An installed apex whose fused optimizers run on CUDA only (as in NVIDIA's image at `docker
build` time, where there is no GPU) must not break the CPU smoke: same losses as without it. A
package with modules that do not import (syntax error, an exception, sys.exit, a broken
subpackage, a folder the walk cannot reach) must fail the check naming each; --require-te must
fail where TE cannot run.
"""

import glob
import importlib.metadata as md
import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "container_check.sh")


SMOKE_RE = re.compile(r"^container_check: smoke local \((cpu|cuda)\): 2 DistillationEngine steps .*"
                      r"loss (\d+\.\d+) -> (\d+\.\d+).*$", re.M)


def _run(*args, timeout=240, extra_path=(), **env_extra):
    # This checkout's package, wherever the interpreter's own install of nemo_kd points.
    path = [REPO, *extra_path] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path), **env_extra)
    return subprocess.run(["bash", SCRIPT, "--python", sys.executable, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _te_can_run() -> bool:
    """What the script should conclude about the Transformer Engine path on this machine."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def _package_modules(root):
    """Dotted names of every .py file of the nemo_kd package under ``root`` (packages by __init__.py)."""
    names = set()
    for path in glob.glob(os.path.join(root, "nemo_kd", "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, root)[:-3].split(os.sep)
        names.add(".".join(rel[:-1] if rel[-1] == "__init__" else rel))
    return names


@pytest.fixture(scope="module")
def full_run():
    return _run()


def test_full_check_passes_and_imports_every_module(full_run):
    proc = full_run
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("container_check: ")]
    assert lines[-1].startswith("container_check: OK ("), lines[-1]
    # Every module, counted independently of the script's own walk.
    expected = _package_modules(REPO)
    count = re.search(r"^container_check: imported (\d+) nemo_kd modules", out, re.M)
    assert count and int(count.group(1)) == len(expected), (count and count.group(0), len(expected))
    assert f"nemo_kd 0.1.0 from {os.path.join(REPO, 'nemo_kd')}" in out
    # The versions printed are this interpreter's.
    assert f"container_check: torch {torch.__version__} (built with CUDA {torch.version.cuda or 'none'}; " \
           f"CUDA available: {torch.cuda.is_available()}" in out
    for label, dist in (("megatron-core", "megatron-core"), ("nemo_toolkit", "nemo_toolkit"),
                        ("lightning", "lightning"), ("transformers", "transformers"), ("triton", "triton")):
        assert f"container_check: {label} {md.version(dist)}\n" in out, label
    # The smoke trained: two finite losses, the weights moved (the script checks), on this machine's device.
    smoke = SMOKE_RE.search(out)
    assert smoke, out[-3000:]
    assert smoke.group(1) == ("cuda" if torch.cuda.is_available() else "cpu")
    first, second = float(smoke.group(2)), float(smoke.group(3))
    assert 0 < second < first  # one Adam step at lr 1e-2 on the same batch lowers the loss
    te_lines = [ln for ln in lines if "transformer_engine cannot run here" in ln]
    if _te_can_run():  # a GPU machine with TE: the same smoke through TE layers
        assert not te_lines and "container_check: smoke transformer_engine (cuda)" in out, out[-3000:]
        assert "TE smoke passed" in lines[-1]
    else:  # no TE or no GPU (this project's CI): said in one line, and the run goes on to OK
        assert len(te_lines) == 1 and te_lines[0].endswith("TE smoke skipped"), te_lines
        assert "TE smoke skipped" in lines[-1]


def test_cuda_only_apex_does_not_break_the_cpu_smoke(full_run, tmp_path):
    """A stand-in for the image's apex: importable, with a distribution record, and fused optimizers
    that refuse to run without CUDA (Megatron picks apex's FusedAdam whenever apex imports)."""
    fake = tmp_path / "site"
    (fake / "apex" / "optimizers").mkdir(parents=True)
    (fake / "apex" / "__init__.py").write_text("")
    (fake / "apex" / "optimizers" / "__init__.py").write_text(
        "class _CudaOnly:\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        raise RuntimeError('apex fused optimizer: CUDA only')\n\n\n"
        "def __getattr__(name):  # FusedAdam, FusedSGD, FusedLAMB, ...\n"
        "    if name.startswith('__'):\n"
        "        raise AttributeError(name)\n"
        "    return _CudaOnly\n")
    (fake / "apex-0.1.dist-info").mkdir()
    (fake / "apex-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: apex\nVersion: 0.1\n")
    proc = _run(extra_path=[str(fake)], CUDA_VISIBLE_DEVICES="")  # a machine without a GPU, as `docker build`
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    assert "container_check: apex 0.1\n" in out  # seen as installed, and imported by the walk
    smoke = SMOKE_RE.search(out)
    assert smoke and smoke.group(0).endswith("(hidden on CPU: apex)"), out[-3000:]
    assert smoke.group(1) == "cpu"
    # The same path as without apex: the same two losses (to the printed digit on CPU; a GPU full run
    # computes the same steps in another order of float operations).
    plain = SMOKE_RE.search(full_run.stdout)
    assert plain, full_run.stdout[-3000:]
    got, ref = [float(x) for x in smoke.group(2, 3)], [float(x) for x in plain.group(2, 3)]
    tol = 0.0 if plain.group(1) == "cpu" else 1e-2
    assert all(abs(g - r) <= tol * abs(r) for g, r in zip(got, ref)), (smoke.group(0), plain.group(0))


def _write_package(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_broken_modules_fail_the_import_walk_by_name(tmp_path):
    """A small stand-in package (the walk is the same for any package; the real one takes 10 s to import)."""
    root = _write_package(tmp_path / "checkout", {
        "nemo_kd/__init__.py": "__version__ = '9.9'\n",
        "nemo_kd/good.py": "VALUE = 1\n",
        "nemo_kd/sub/__init__.py": "",
        "nemo_kd/sub/broken_syntax.py": "def oops(:\n    pass\n",
        "nemo_kd/sub/raises_at_import.py": "raise RuntimeError('bad module')\n",
        "nemo_kd/sub/exits_at_import.py": "import sys\nsys.exit(3)\n",
        "nemo_kd/badpkg/__init__.py": "import nemo_kd.does_not_exist\n",
        "nemo_kd/badpkg/child.py": "",  # not walkable under a broken package: reported with it
        "nemo_kd/nopkg/orphan.py": "",  # a folder without __init__.py: the walk cannot reach it
    })
    proc = _run("--package-root", str(root), "--imports-only", timeout=120)
    out = proc.stdout
    assert proc.returncode == 1, out[-4000:] + proc.stderr[-3000:]
    assert f"nemo_kd 9.9 from {root / 'nemo_kd'}" in out  # the copy was checked, not the checkout
    for name, error in (("nemo_kd.sub.broken_syntax", "SyntaxError"),
                        ("nemo_kd.sub.raises_at_import", "RuntimeError: bad module"),
                        ("nemo_kd.sub.exits_at_import", "SystemExit: 3"),
                        ("nemo_kd.badpkg", "ModuleNotFoundError: No module named 'nemo_kd.does_not_exist'")):
        assert re.search(rf"^container_check: FAILED import {re.escape(name)}: {re.escape(error)}", out, re.M), name
    assert "nemo_kd.nopkg.orphan is a .py file of the package that the import walk cannot reach" in out
    # Walked: nemo_kd, good, sub, its three modules, badpkg (its child is behind the failed import).
    assert "FAILED: 4 of 7 nemo_kd modules did not import, 1 not reachable: nemo_kd.badpkg, " \
           "nemo_kd.sub.broken_syntax, nemo_kd.sub.exits_at_import, nemo_kd.sub.raises_at_import, " \
           "nemo_kd.nopkg.orphan" in out, out[-2000:]
    assert "nemo_kd.badpkg.child" not in out.split("FAILED: 4 of 7")[-1]
    assert "container_check: OK" not in out


def test_require_te_fails_where_te_cannot_run(tmp_path):
    root = _write_package(tmp_path / "checkout", {"nemo_kd/__init__.py": ""})  # the package is not the point
    proc = _run("--package-root", str(root), "--imports-only", "--require-te", timeout=120)
    if _te_can_run():
        assert proc.returncode == 0 and "container_check: OK" in proc.stdout, proc.stdout[-3000:]
        return
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert re.search(r"^container_check: FAILED: --require-te, and transformer_engine cannot run here \(.+\)$",
                     proc.stdout, re.M), proc.stdout[-2000:]
    assert "container_check: OK" not in proc.stdout
