"""`qstar train` on PyTorch: the loss goes down, checkpoints load, and a killed run resumes bit-exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

import qstar
from cli.main import app

SMALL = ["--thought-tokens", "2", "--lookahead", "2", "--max-seq-length", "16", "--batch-size", "2",
         "--policy-weight", "1", "--steps-per-report", "1", "--val-batches", "1", "--warmup-steps", "2"]


def records(out: Path, split: str = "train") -> dict[int, dict]:
    """The last record per step (a resumed run repeats the steps after its checkpoint)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["split"] == split}


def test_short_training_lowers_the_loss_and_saves_a_loadable_model(llama_checkpoint, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--backend", "torch", "--model", str(llama_checkpoint), "--out", str(out), "--iters", "30",
            "--learning-rate", "3e-3", "--steps-per-eval", "15", "--save-every", "15", *SMALL]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    train = records(out)
    first = np.mean([train[s]["lm"] for s in (1, 2, 3)])
    last = np.mean([train[s]["lm"] for s in (28, 29, 30)])
    assert last < first - 0.3
    assert set(records(out, "val")) == {15, 30}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000015", "step-0000030"]
    model = qstar.load(str(out / "model"), backend="torch")
    assert model.recipe.thought_tokens == 2 and model.recipe.policy_weight == 1
    assert json.loads((out / "config.json").read_text())["iters"] == 30


def run_cli(args: list[str]) -> subprocess.Popen:
    code = "import sys; from cli.main import app; sys.argv = ['qstar', *sys.argv[1:]]; app()"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONHASHSEED": "0"})


def test_killed_run_resumes_exactly(llama_checkpoint, tmp_path):
    common = ["train", "--backend", "torch", "--model", str(llama_checkpoint), "--iters", "12", "--save-every", "3",
              "--steps-per-eval", "6", "--keep-checkpoints", "5", *SMALL]
    whole = tmp_path / "whole"
    assert CliRunner().invoke(app, [*common, "--out", str(whole)]).exit_code == 0

    broken = tmp_path / "broken"
    process = run_cli([*common, "--out", str(broken)])
    deadline = time.time() + 120
    while not (broken / "checkpoints" / "step-0000006").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # wherever it is, even mid-save
    process.wait()
    result = CliRunner().invoke(app, ["train", "--resume", "--out", str(broken)])
    assert result.exit_code == 0, result.output

    a, b = records(whole), records(broken)
    assert set(a) == set(b) == set(range(1, 13))
    for step in a:
        for key in ("loss", "lm", "policy", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
    wa = qstar.load(str(whole / "model"), backend="torch").parameters()
    wb = qstar.load(str(broken / "model"), backend="torch").parameters()
    assert all(bool((wa[k] == wb[k]).all()) for k in wa)
