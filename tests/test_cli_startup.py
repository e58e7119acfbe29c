"""Entry points answer ``--help`` without importing the heavy stack, and Hydra entry points leave no
``outputs/<date>/.hydra`` behind.

Every console script of ``pyproject.toml`` (read from the file: a script added later is checked too) and
the recipes' ``examples/*.py`` entry points run ``--help`` in a fresh interpreter, which then reports
which of Megatron, NeMo, transformers, Lightning and torch it imported: none may be there (importing
Megatron alone takes seconds; a user asking for help or making a typo should not wait for it).
"""

import json
import os
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("megatron", "nemo", "transformers", "lightning", "torch")
# Imported at module level by the file the console script points into (not by its argument parsing):
# nemo_kd/teacher/extract.py needs torch for its dataclasses' defaults and the extraction itself, and
# nemo_kd/evaluation/cli.py reads its config through extract's helpers.
TORCH_AT_IMPORT = {"nemo-kd-compute-topk-logits", "nemo-kd-evaluate"}
EXAMPLES = ("build_preference_pairs", "build_dasd_data", "compute_topk_logits", "convert_hf_to_megatron",
            "convert_megatron_to_hf", "serve_teacher")

# Runs an entry point with argv, then prints what it imported as the last line.
_PROBE = r"""
import importlib, json, runpy, sys
target, argv = sys.argv[1], sys.argv[2:]
sys.argv = argv
code = None
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        module, func = target.split(":")
        code = getattr(importlib.import_module(module), func)()
except SystemExit as e:
    code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print("\n" + json.dumps(dict(code=code, heavy=heavy)))
""" % (HEAVY,)


def _console_scripts():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def _probe(target: str, argv, cwd, timeout=180):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _PROBE, target, *argv], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    *text, last = proc.stdout.rstrip().splitlines()
    return json.loads(last), "\n".join(text), proc.stderr


def _entry_points():
    points = [pytest.param(name, target, id=name) for name, target in sorted(_console_scripts().items())]
    points += [pytest.param(f"examples/{n}.py", os.path.join(REPO, "examples", f"{n}.py"), id=f"examples/{n}.py")
               for n in EXAMPLES]
    return points


def test_every_console_script_is_checked():
    """The three shipped scripts at least (the list grows with pyproject.toml, e.g. the Aligner migration)."""
    assert {"nemo-kd-compute-topk-logits", "nemo-kd-convert-hf-to-megatron",
            "nemo-kd-convert-megatron-to-hf"} <= set(_console_scripts())


@pytest.mark.parametrize("name,target", _entry_points())
def test_help_answers_without_heavy_imports(name, target, tmp_path):
    report, out, err = _probe(target, [name, "--help"], cwd=tmp_path)
    assert report["code"] in (0, None), (report, out[-1000:], err[-2000:])
    assert "usage:" in out or "== Config ==" in out, out[-2000:]  # argparse's usage, or Hydra's config help
    allowed = {"torch"} if name in TORCH_AT_IMPORT else set()
    assert set(report["heavy"]) <= allowed, f"{name} --help imported {report['heavy']}"
    assert os.listdir(tmp_path) == []


def test_unknown_family_is_refused_with_the_valid_ones(tmp_path):
    """--family is checked after parsing (so --help stays light) against the converter's own families."""
    from nemo_kd.convert.hf_config import FAMILIES

    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", "import sys; from nemo_kd.convert.cli import megatron_to_hf_main; "
                           "sys.exit(megatron_to_hf_main())", "--megatron-dir", str(tmp_path / "x"),
                           "--out", str(tmp_path / "y"), "--family", "llama4"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"invalid choice 'llama4' (choose from {', '.join(sorted(set(FAMILIES.values())))})" in proc.stderr
    assert not os.path.exists(tmp_path / "y")


_HYDRA_ENTRY_POINTS = [
    pytest.param(os.path.join(REPO, "examples", f"{n}.py"), id=f"examples/{n}.py")
    for n in ("build_preference_pairs", "build_dasd_data", "compute_topk_logits", "serve_teacher")
] + [pytest.param("nemo_kd.teacher.extract:main", id="nemo-kd-compute-topk-logits"),
     pytest.param("nemo_kd.teacher.server:main", id="nemo-kd-serve-teacher")]


def _run_until_task(target, overrides, cwd):
    """Run a Hydra entry point whose task fails at once (an unknown key, refused by run_from_config):
    Hydra has made its run directory and ``.hydra`` by the time the task starts."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    code = ("import runpy, sys; t = sys.argv[1]; sys.argv = [t] + sys.argv[2:]\n"
            "if t.endswith('.py'): runpy.run_path(t, run_name='__main__')\n"
            "else:\n    import importlib; m, f = t.split(':'); getattr(importlib.import_module(m), f)()")
    proc = subprocess.run([sys.executable, "-c", code, target, "+no_such_key=1", *overrides], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "no_such_key" in out, out[-4000:]


@pytest.mark.parametrize("target", _HYDRA_ENTRY_POINTS)
def test_hydra_entry_points_leave_no_directories(target, tmp_path):
    _run_until_task(target, [], tmp_path)
    assert os.listdir(tmp_path) == []  # no outputs/<date>/.hydra, no <job>.log


def test_the_directory_check_sees_hydras_defaults(tmp_path):
    """Control: with Hydra's own defaults restored the same run leaves outputs/.../.hydra, so the test above
    would see a config that lost its settings."""
    _run_until_task(os.path.join(REPO, "examples", "build_dasd_data.py"),
                    ["hydra.run.dir=outputs/run", "hydra.output_subdir=.hydra"], tmp_path)
    assert os.path.isfile(tmp_path / "outputs" / "run" / ".hydra" / "config.yaml")


# ---------------------------------------------------------------- optional GPU extras: one line

_BUILD = r"""
import os, socket, warnings
s = socket.socket(); s.bind(("127.0.0.1", 0))
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1])); s.close()
import nemo_kd
from nemo.utils.exp_manager import exp_manager  # NeMo brings in Megatron's optimizer and OneLogger
import nemo_kd.models.engine
from nemo_kd.models import GPTModelConfig, build_gpt_model
from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
initialize_parallel(ParallelConfig())
build_gpt_model(GPTModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=64,
                               max_position_embeddings=16))
warnings.warn("an unrelated warning stays", UserWarning)
destroy_parallel()
"""
_ORIGINALS = ("not installed. Falling back to", "OneLogger: Setting error_handling_strategy",
              "No exporters were provided")


def _python(code, **env):
    full = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", **env)
    for key in ("RANK", "SLURM_PROCID", "WORLD_SIZE"):
        if key not in env:
            full.pop(key, None)
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], env=full, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def test_missing_gpu_extras_are_one_line():
    """Importing the engine (after NeMo's exp_manager) and building a model: the missing extras are named in
    one line, once; none of Megatron's TE/apex fallback warnings nor OneLogger's lines is left; an unrelated
    warning still shows. Control: Megatron imported without nemo_kd does print them."""
    import importlib.util

    missing = [m for m in ("transformer_engine", "apex") if importlib.util.find_spec(m) is None]
    out = _python(_BUILD)
    line = f"nemo_kd: optional GPU extras not installed: {', '.join(missing)} (Megatron's local fallbacks are used)"
    assert out.count("optional GPU extras not installed") == (1 if missing else 0), out[-3000:]
    if missing:
        assert line in out
    for original in _ORIGINALS:
        assert original not in out, (original, out[-3000:])
    assert "UserWarning: an unrelated warning stays" in out

    control = _python("import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs")
    if "apex" in missing:
        assert "Apex is not installed. Falling back to Torch Norm" in control, control[-2000:]
    if len(missing) == 2:
        assert "Transformer Engine and Apex are not installed. Falling back to" in control, control[-2000:]


def test_gpu_extras_line_only_on_rank_zero():
    out = _python("import nemo_kd.parallel", RANK="1")
    assert "optional GPU extras" not in out and not any(o in out for o in _ORIGINALS), out[-2000:]
