"""A wheel of qstar, installed into a fresh virtual environment, trains out of the box from any directory: the CLI
installs as qstar.cli and the default model ships inside the package."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import venv
from pathlib import Path

from helpers import ROOT


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{args}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_wheel_in_a_fresh_venv_trains_the_shipped_model(tmp_path):
    wheels = tmp_path / "wheels"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        wheels,
        ROOT,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("qstar_lm-*.whl")  # the distribution qstar-lm; the import and command stay qstar
    env = tmp_path / "env"
    venv.create(env)
    python = env / "bin" / "python"
    run(
        sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path
    )
    # The dependencies (torch, transformers, ...) come from this interpreter's environment, not a download: a path
    # file lists its site-packages (no .pth there is processed, so no editable qstar leaks in).
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path)
    (Path(purelib.stdout.strip()) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    where = run(python, "-c", "import qstar, qstar.cli.main; print(qstar.__file__)", cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    done = run(env / "bin" / "qstar", "train", "--backend", "torch", "--iters", "2", "--val-batches", "1", cwd=work)
    assert "done: runs/qstar/model" in done.stdout
    config = json.loads((work / "runs" / "qstar" / "config.json").read_text())
    assert Path(config["model"]).is_relative_to(env) and config["model"].endswith("arith-llama")
    assert (work / "runs" / "qstar" / "model" / "model.safetensors").is_file()
    run(python, "-m", "qstar", "--help", cwd=work)
