"""Data-parallel training under mlx.launch (mx.distributed's ring backend, 2 processes over loopback): N ranks of
batch b compute what one process computes on the N * b rows, and a 2-rank run with one process SIGKILLed resumes to
what a straight 2-rank run gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TRAIN_SMALL, assert_same_runs, assert_whole_batch_gradients, uneven_batch

import qstar

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(*command: str) -> list[str]:
    launcher = Path(sys.executable).parent / "mlx.launch"
    return [str(launcher), "-n", "2", "--backend", "ring", "--", *command]


def test_two_ranks_compute_the_gradient_of_the_whole_batch(mixing_checkpoint, tmp_path):
    """Float64, given thoughts, rows padded unevenly: averaged gradients and mean loss == one process's on 4 rows."""
    reference = qstar.load(str(mixing_checkpoint), backend="mlx", dtype="float64")
    ids, mask, thoughts = uneven_batch(reference, tmp_path / "in.npz")
    worker = [sys.executable, str(HERE / "ddp_worker.py"), str(mixing_checkpoint), str(tmp_path / "in.npz")]
    done = subprocess.run(launch(*worker, str(tmp_path / "out.npz")), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert_whole_batch_gradients(tmp_path / "out.npz", reference, ids, mask, thoughts)


def train(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    qstar_cli = str(Path(sys.executable).parent / "qstar")
    args = [qstar_cli, "train", "--backend", "mlx", "--model", str(checkpoint), "--out", str(out), "--iters", "8"]
    return launch(*args, "--save-every", "1", "--steps-per-eval", "4", *TRAIN_SMALL, *extra)


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes_exactly(llama_checkpoint, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = subprocess.run(train(llama_checkpoint, whole), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    process = subprocess.Popen(
        train(llama_checkpoint, broken),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (broken / "checkpoints" / "step-0000003").exists():
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.001)
    os.killpg(process.pid, signal.SIGKILL)  # mlx.launch and the ranks it started in its session
    process.wait()
    time.sleep(1)
    assert not (broken / "checkpoints" / "step-0000008").exists()  # killed before the end: the resume reruns steps
    done = subprocess.run(
        train(llama_checkpoint, broken, "--resume"), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert_same_runs(whole, broken, 8)
