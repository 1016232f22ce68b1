"""An installed (non-editable) package runs from any folder: the wheel carries the presets and the
shipped weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, env=None):
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_wheel_installs_and_evaluates_from_another_folder(tmp_path, fashion_mnist):
    # build from a copy, so that the checkout gets no build/ or egg-info folders
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", wheels, source], cwd=tmp_path)
    (wheel,) = wheels.glob("ssni-*.whl")
    # a fresh environment: the wheel installed into it, the dependencies (torch, ...) seen
    # through a path file, never the sources of this checkout
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    # --ignore-installed: without it pip uninstalls the ssni of the running environment (the
    # developer's editable install) before installing into the prefix
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
          "--ignore-installed", "--prefix", venv, wheel], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).strip())
    (site / "ssni_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SSNI_FASHION_MNIST_DIR"] = str(fashion_mnist)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([python, "-c", "import ssni; print(ssni.__file__)"], cwd=elsewhere, env=env)
    assert Path(where.strip()).is_relative_to(site)
    assert "fmnist-diffpure-constant-pgd-linf" in _run([python, "-m", "ssni", "presets"],
                                                       cwd=elsewhere, env=env)
    sets = dict(n=2, seeds=121, purify_steps=2, surrogate_steps=1, iterations=1, eot=1,
                batch_size=2)
    args = [python, "-m", "ssni", "--quiet", "evaluate", "--preset",
            "fmnist-diffpure-constant-pgd-linf", "--out", "run"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    _run(args, cwd=elsewhere, env=env)
    doc = json.loads((elsewhere / "run" / "report.json").read_text())
    row = doc["rows"][0]
    assert row["config"]["score_model"] == "fmnist-unet" and row["config"]["n"] == 2
    assert 0.0 <= row["metrics"]["clean_acc"] <= 1.0
