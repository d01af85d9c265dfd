"""Data-parallel training under torchrun (gloo, 2 processes on this CPU): N ranks of batch b compute exactly what one
process computes on the N * b rows, a 2-rank run killed with SIGKILL resumes to what a straight 2-rank run gives, and a
sharded run saves and resumes through rank 0's CPU memory, never the whole model on every rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import TORCHRUN_ENV as ENV
from helpers import assert_same_runs, assert_whole_batch_gradients, torchrun, torchrun_train, uneven_batch
from safetensors.torch import load_file

import qstar

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("distributed", ["ddp", "fsdp", "fsdp ckpt"])
def test_two_ranks_compute_the_gradient_of_the_whole_batch(mixing_checkpoint, tmp_path, distributed):
    """Float64, given thoughts, rows padded unevenly (rank 0 has padding, rank 1 none): the averaged gradients and
    the mean loss equal one process's on the four rows, so the masked means use the global counts; sharded (FSDP2,
    each layer all-gathered for each of its calls) as replicated (DDP), and sharded with each layer call recomputed
    in backward (FSDP2 gathers the layer again for it)."""
    reference = qstar.load(str(mixing_checkpoint), backend="torch", dtype="float64")
    ids, mask, thoughts = uneven_batch(reference, tmp_path / "in.npz")
    inputs, out = str(tmp_path / "in.npz"), str(tmp_path / "out.npz")
    args = [str(HERE / "ddp_worker.py"), str(mixing_checkpoint), inputs, out, *distributed.split()]
    done = subprocess.run(torchrun(*args), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_whole_batch_gradients(tmp_path / "out.npz", reference, ids, mask, thoughts)


@pytest.mark.slow
@pytest.mark.parametrize("distributed", ["ddp", "auto"])
def test_a_killed_two_rank_run_resumes_exactly(llama_checkpoint, tmp_path, distributed):
    """Under DDP and under FSDP2 (auto for full fine-tuning): the sharded run's checkpoint is a whole one too."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = subprocess.run(
        torchrun_train(llama_checkpoint, whole, "--distributed", distributed),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("FSDP2" in done.stderr) == (distributed == "auto")
    process = subprocess.Popen(
        torchrun_train(llama_checkpoint, broken, "--distributed", distributed),
        env=ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (broken / "checkpoints" / "step-0000003").exists():
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.001)
    workers = [int(c) for c in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies mid-run: torchrun stops the other and fails
    assert process.wait(timeout=120) != 0
    assert not (broken / "checkpoints" / "step-0000012").exists()  # killed before the end: the resume reruns steps
    done = subprocess.run(
        torchrun_train(llama_checkpoint, broken, "--resume"), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_runs(whole, broken, 12)
    config = json.loads((whole / "config.json").read_text())
    assert config["batch_size"] == 2  # per rank: the run stepped on 4 rows
    wa = qstar.load(str(whole / "model"), backend="torch").parameters()  # a checkpoint one process loads
    wb = qstar.load(str(broken / "model"), backend="torch").parameters()
    assert all(bool((wa[k] == wb[k]).all()) for k in wa)


def test_a_sharded_run_saves_and_resumes_through_rank_0(mixing_checkpoint, tmp_path):
    """FSDP2 on 2 ranks: saving unshards no layer (the weights and optimizer state reach rank 0's CPU one tensor at a
    time; the spy sees the step's unshards), resuming opens the training state on rank 0 alone (the audit hook sees
    rank 0 open it), which broadcasts it, and the resumed session holds exactly the saved weights, optimizer state
    and each rank's random state."""
    args = [str(HERE / "sharded_state_worker.py"), str(mixing_checkpoint), str(tmp_path)]
    done = subprocess.run(torchrun(*args), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["unshards"]["step"] > 0 and "save" not in r["unshards"] for r in ranks), ranks
    assert all(r["sharded_while_saving"] and r["resumed_as_saved"] for r in ranks), ranks
    assert [r["opened"] for r in ranks] == [["optimizer_state.pt"], []]
    assert [r["gathered"] for r in ranks] == [True, False]


def test_fsdp_in_bfloat16_keeps_float32_master_shards(llama_checkpoint, tmp_path):
    """Mixed precision: bf16 compute, float32 master weights (the shards) in the checkpoint's training state, a
    bf16 model that one process loads."""
    out = tmp_path / "bf16"
    args = torchrun_train(
        llama_checkpoint, out, "--dtype", "bfloat16", "--grad-accumulation-steps", "2", "--iters", "2"
    )
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = load_file(out / "model" / "model.safetensors") | load_file(out / "model" / "qstar.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    model = qstar.load(str(out / "model"), backend="torch", dtype="bfloat16")
    masters = torch.load(out / "model" / "optimizer_state.pt", weights_only=True)["weights"]
    weights = {f"net.{k}": v for k, v in model.parameters().items()}
    assert sorted(masters) == sorted(weights)
    assert all(m.dtype == torch.float32 for m in masters.values())
    assert all(bool((m.bfloat16() == weights[k]).all()) for k, m in masters.items())  # bf16 weights = rounded masters
    assert any(bool((m != m.bfloat16().float()).any()) for m in masters.values())  # finer than bf16: not rounded
