"""Checkpoints written before a change keep loading after it: the committed format-version-1 checkpoints
(tests/fixtures/format-v1, written at commit 97c7c3d) compute the numbers they computed then, on both backends, and
their runs resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import backend_params
from typer.testing import CliRunner

import qstar
from qstar.cli.main import app

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "format-v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
IDS = np.array(EXPECTED["ids"])


def checkpoint(run: str) -> Path:
    return FIXTURE / run / "checkpoints" / "step-0000002"


def loaded(run: str, backend: str) -> qstar.QStarModel:
    if run == "mlx-lora-run":
        return qstar.load(str(FIXTURE / "base"), backend=backend, adapter_path=str(checkpoint(run)))
    return qstar.load(str(checkpoint(run)), backend=backend)


@pytest.mark.parametrize("backend", backend_params("torch", "mlx"))
@pytest.mark.parametrize("run", ["torch-run", "mlx-lora-run"])
def test_old_checkpoints_compute_what_they_computed(run, backend):
    want = EXPECTED[f"{run}/{backend}"]
    m = loaded(run, backend)
    logits = np.asarray(m.logits(IDS), np.float64)
    assert abs(logits.sum() - want["logits_sum"]) <= 1e-4 * abs(want["logits_sum"])
    np.testing.assert_allclose(logits[0, 0, :8], want["logits_00"], rtol=1e-5, atol=1e-6)
    out = m.loss(IDS, seed=3)
    assert out.thoughts.tolist() == want["thoughts"]
    assert abs(out.total - want["total"]) < 1e-5


@pytest.mark.parametrize(("backend", "run"), backend_params(("torch", "torch-run"), ("mlx", "mlx-lora-run")))
def test_old_runs_resume(backend, run, tmp_path):
    out = tmp_path / run
    shutil.copytree(FIXTURE / run, out)
    state_file = out / "checkpoints" / "step-0000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["model"] = str(FIXTURE / "base")  # where the base model is now
    state_file.write_text(json.dumps(state))
    result = CliRunner().invoke(app, ["train", "--resume", "--out", str(out), "--iters", "3"])
    assert result.exit_code == 0, result.output
    assert (out / "checkpoints" / "step-0000003" / "trainer_state.json").is_file()
