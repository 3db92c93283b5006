"""The installable tool: the wheel installs into a fresh environment and its commands run from
any directory; `python -m glow.cli.*` works under accelerate (DDP, DeepSpeed); the library's
public API loads lazily; each job type imports only what it needs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers.repo import REPO, cpu_env
from tests.helpers.toy import build_toy_shards

# Packages that only the extras install (eval, shards, demo, trackers, tests): training needs none.
EXTRAS_ONLY = {"matplotlib", "sklearn", "scipy", "skimage", "wandb", "tensorboard", "mlflow", "pytorch_fid"}
COMMANDS = {"glow-train": "train", "glow-eval": "evaluate", "glow-figures": "figures", "glow-report": "report",
            "glow-shards": "shards", "glow-launch": "launch"}


def _python(code: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env or cpu_env(),
                          cwd=cwd, timeout=300)


# -- the library ---------------------------------------------------------------------------
def test_public_api_loads_lazily_and_reports_without_torch():
    code = """
import json, sys
import glow
light = 'torch' not in sys.modules
import glow.report.figures, glow.report.scores, glow.config
report_light = 'torch' not in sys.modules
from glow import GlowConfig, ood_metrics, load_config
config_light = 'torch' not in sys.modules
from glow import Glow, load_model
print(json.dumps({"light": light, "report_light": report_light, "config_light": config_light,
                  "torch_for_model": 'torch' in sys.modules, "version": glow.__version__,
                  "all": sorted(glow.__all__), "model": Glow.__module__, "load": load_model.__module__,
                  "metrics": sorted(ood_metrics([0.0, 1.0, 2.0], [3.0, 4.0]))}))
"""
    out = _python(code)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["light"] and got["report_light"] and got["config_light"] and got["torch_for_model"]
    assert got["model"] == "glow.model.glow" and got["load"] == "glow.checkpoint"
    assert "auroc" in got["metrics"] and got["version"] not in ("", None)
    assert set(got["all"]) >= {"Glow", "GlowConfig", "load_model", "ood_metrics", "__version__"}
    assert (REPO / "glow" / "py.typed").is_file()


def test_imports_change_no_backend_and_no_environment():
    code = """
import json, os, sys
import accelerate, matplotlib.pyplot, numpy, scipy.stats, sklearn.metrics, torch  # their own import effects first
before = dict(os.environ)
import matplotlib
raw = lambda: str(dict.__getitem__(matplotlib.rcParams, "backend"))  # unresolved: reading it would resolve it
default = raw()
import glow, glow.report.figures, glow.evaluation.latents, glow.tracking, glow.cli.figures, glow.cli.evaluate
print(json.dumps({"env_same": dict(os.environ) == before, "backend_same": raw() == default}))
"""
    env = cpu_env()
    env.pop("MPLBACKEND", None)
    out = _python(code, env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"env_same": True, "backend_same": True}


def test_training_runs_without_the_extras_packages(tmp_path):
    """A training job (run.logger none) needs none of the optional extras' packages: they are
    made unimportable (as if not installed; a dependency that merely tries them, such as
    DeepSpeed's autotuner trying mlflow, carries on) and a tiny run still finishes."""
    shards = build_toy_shards(tmp_path / "shards", n_train=32, n_test=8, n_ood=8)
    code = f"""
import importlib.machinery, json, runpy, sys
BLOCKED = {sorted(EXTRAS_ONLY)!r}
class Absent:  # finds the blocked packages first, and fails to load them
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}} (blocked by the test)", name=spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Absent())
sys.argv = ["glow-train", "--config", "tiny", "run.root={tmp_path / 'runs'}", "data.root={shards}",
            "data.dataset=toy", "train.max_steps=2", "train.checkpoint_every=2", "train.sample_every=2"]
try:
    runpy.run_module("glow.cli.train", run_name="__main__")
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
"""
    out = _python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(json.loads(out.stdout.splitlines()[-1]))
    assert {"torch", "accelerate", "glow"} <= loaded and not loaded & EXTRAS_ONLY
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "step-00000002" / "COMPLETE").is_file()


# -- the wheel -----------------------------------------------------------------------------
def _build_wheel(tmp_path: Path) -> Path:
    """A wheel from a copy of the files that make the package (the checkout stays clean), offline."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "glow", src / "glow", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("glow_ood-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed (not editable) and, through a .pth line, the heavy
    dependencies of this environment's site-packages (nothing copied). The .pth is added
    after the install, so pip never sees this environment's editable glow-ood; .pth files in
    a directory added that way are not executed, so its editable finder never loads."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                          "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "heavy-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_wheel_installs_and_its_commands_train_and_evaluate_from_any_directory(tmp_path):
    wheel = _build_wheel(tmp_path)
    venv = _fresh_venv(tmp_path, wheel)
    bin_dir, py = venv / "bin", venv / "bin" / "python"
    shards = build_toy_shards(tmp_path / "shards", n_train=64, n_test=20, n_ood=12)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in cpu_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"

    def run(*cmd: str) -> subprocess.CompletedProcess:
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=work,
                                timeout=300)
        assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    where = json.loads(run(py, "-c", "import glow, json; print(json.dumps([glow.__file__, glow.__version__]))").stdout)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    assert Path(where[0]).resolve() == (site / "glow" / "__init__.py").resolve()  # the wheel's, not the checkout's
    assert where[1] == wheel.name.split("-")[1]
    for command in COMMANDS:  # every console script; the `-m glow.cli.<module>` entries: tests/test_help.py
        assert "usage:" in run(bin_dir / command, "--help").stdout.lower()
    assert "usage:" in run(py, "-m", "glow.cli.train", "--help").stdout.lower()
    listed = run(bin_dir / "glow-train", "--list-configs").stdout
    assert f"tiny{' ' * 20} {site / 'glow' / 'configs' / 'tiny.yaml'}" in listed
    launch = run(bin_dir / "glow-train", "--launch-config", "cpu_2proc").stdout.strip()
    assert Path(launch) == site / "glow" / "launch" / "cpu_2proc.yaml"

    # the console script with a shipped config by name (accelerate launching `-m glow.cli.train` on 2
    # processes, DeepSpeed's launch file: tests/test_trainer.py's DeepSpeed proof)
    run(bin_dir / "glow-train", "--config", "tiny", "run.root=runs", f"data.root={shards}", "data.dataset=toy",
        "train.max_steps=4", "train.checkpoint_every=4", "train.sample_every=4", "train.log_every=2")
    assert "finished: 4 steps" in (work / "runs" / "tiny" / "log.txt").read_text()
    run(bin_dir / "glow-eval", "--checkpoint", "runs/tiny/checkpoints/latest", "--task", "dump",
        "--data", "toy/test", "--data", "toyood/test")
    figures = run(bin_dir / "glow-figures", "--run", "runs/tiny", "--in", "toy/test", "--ood", "toyood/test",
                  "-k", "2").stdout
    assert "log_likelihood" in figures and (work / "runs" / "tiny" / "figures" / "ood.json").is_file()
    assert not (work / "glow").exists() and not list(work.glob("*.egg-info"))
