"""HSDP under torchrun (gloo, 4 processes on this CPU as 2 nodes of 2, each node its own torchrun as on a cluster):
FSDP2 shards within a node and replicates across nodes, 4 ranks compute exactly what one process computes on the
whole batch, a run with one process killed resumes to the straight run's numbers, and shard groups that cannot be
formed are one clear line each."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import TORCHRUN_ENV as ENV
from helpers import TRAIN_SMALL, assert_same_runs, assert_whole_batch_gradients, torchrun_nodes, uneven_batch
from typer.testing import CliRunner

import qstar
from qstar.cli.main import app
from qstar.core.distributed import World
from qstar.core.train_config import TrainConfig
from qstar.torch_backend.parallelize import parallelize

HERE = Path(__file__).resolve().parent
GROUPS = "within groups of 2 processes, replicated across 2 groups (HSDP)"
"""The run header's account of 2 nodes of 2 processes (the shard group defaults to a node's)."""


def start(commands: list[list[str]], logs: Path) -> list[subprocess.Popen]:
    """Every node's torchrun at once, each writing to its own file (pipes read one after the other could fill up
    and stall the collectives of both)."""
    logs.mkdir()
    nodes = []
    for i, command in enumerate(commands):
        with (logs / f"node-{i}.log").open("w") as log:
            nodes.append(
                subprocess.Popen(command, env=ENV, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
            )
    return nodes


def finish(nodes: list[subprocess.Popen], logs: Path, timeout: float = 600) -> tuple[list[int], str]:
    """Every node's exit code and all their output; whatever is still running after `timeout` is killed."""
    deadline = time.time() + timeout
    try:
        codes = [node.wait(timeout=max(deadline - time.time(), 1)) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    return codes, "".join(log.read_text() for log in sorted(logs.iterdir()))


def run_nodes(commands: list[list[str]], logs: Path) -> str:
    """Run every node to the end; all must succeed. Returns their output."""
    codes, output = finish(start(commands, logs), logs)
    assert codes == [0] * len(commands), output[-3000:]
    return output


def train(checkpoint: Path, out: Path, *extra: str) -> list[list[str]]:
    """`qstar train --distributed hsdp` of 8 small steps on 2 nodes of 2 processes, a checkpoint after each."""
    args = ["-m", "qstar.cli.main", "train", "--backend", "torch", "--model", str(checkpoint), "--out", str(out)]
    args += ["--distributed", "hsdp", "--iters", "8", "--save-every", "1", "--steps-per-eval", "4", *TRAIN_SMALL]
    return torchrun_nodes(*args, *extra)


def test_four_ranks_in_two_shard_groups_compute_the_gradient_of_the_whole_batch(mixing_checkpoint, tmp_path):
    """Float64, given thoughts, one row a rank, padded unevenly (the first shard group's rows padded, the second's
    not): the gradients, reduce-scattered in each group and all-reduced across them, and the mean loss equal one
    process's on the four rows."""
    reference = qstar.load(str(mixing_checkpoint), backend="torch", dtype="float64")
    ids, mask, thoughts = uneven_batch(reference, tmp_path / "in.npz")
    assert ids.shape[0] == 4  # a row for each rank
    args = [str(HERE / "ddp_worker.py"), str(mixing_checkpoint), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")]
    output = run_nodes(torchrun_nodes(*args, "hsdp"), tmp_path / "logs")
    assert GROUPS in output
    assert_whole_batch_gradients(tmp_path / "out.npz", reference, ids, mask, thoughts)


@pytest.mark.slow
def test_a_killed_two_node_run_resumes_exactly(llama_checkpoint, tmp_path):
    """One of the 4 processes SIGKILLed at a random moment (after a random number of steps, then inside the next:
    its forward, backward, log line or save): both nodes stop, and the run resumed on 2 new nodes logs the straight
    run's losses bit for bit and ends at its weights, from whole checkpoints rank 0 wrote."""
    rng = random.Random(0)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert GROUPS in run_nodes(train(llama_checkpoint, whole), tmp_path / "whole-logs")
    nodes = start(train(llama_checkpoint, broken), tmp_path / "broken-logs")
    target = broken / "checkpoints" / f"step-{rng.randint(1, 4):07d}"
    deadline = time.time() + 300
    while not target.exists():
        assert time.time() < deadline and all(node.poll() is None for node in nodes)
        time.sleep(0.001)
    time.sleep(rng.uniform(0, 0.5))
    workers = [int(c) for n in nodes for c in Path(f"/proc/{n.pid}/task/{n.pid}/children").read_text().split()]
    assert len(workers) == 4
    os.kill(rng.choice(workers), signal.SIGKILL)
    codes, output = finish(nodes, tmp_path / "broken-logs", timeout=180)
    assert all(code != 0 for code in codes), output[-3000:]  # torchrun stops the others and fails, on both nodes
    assert not (broken / "checkpoints" / "step-0000008").exists()  # killed before the end: the resume reruns steps
    run_nodes(train(llama_checkpoint, broken, "--resume"), tmp_path / "resume-logs")
    assert_same_runs(whole, broken, 8)
    wa = qstar.load(str(whole / "model"), backend="torch").parameters()  # a checkpoint one process loads
    wb = qstar.load(str(broken / "model"), backend="torch").parameters()
    assert all(bool((wa[k] == wb[k]).all()) for k in wa)


@pytest.mark.parametrize(
    ("settings", "processes", "message"),
    [
        (
            dict(shard_size=3),
            4,
            "--shard-size 3 does not divide the run's 4 processes into equal shard groups: pass --shard-size 1, 2 or 4",
        ),
        (dict(shard_size=3), 2, "--shard-size 3 does not divide the run's 2 processes"),
        (dict(), 6, "--shard-size (default: the processes of one node) 4 does not divide the run's 6 processes"),
        (dict(compile=True), 4, "--compile does not run under --distributed hsdp yet: pass --distributed ddp"),
        (dict(), 1, "--distributed hsdp shards the model across several processes: start qstar train with torchrun"),
    ],
    ids=["not-a-divisor", "above-the-world", "a-node-by-default", "compile", "one-process"],
)
def test_shard_groups_that_cannot_be_formed_are_one_clear_line(
    llama_checkpoint, monkeypatch, settings, processes, message
):
    """Checked before the device mesh is made (a 6-process run on nodes of 4: LOCAL_WORLD_SIZE is 4)."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    model = qstar.load(str(llama_checkpoint), backend="torch")
    cfg = TrainConfig(model=str(llama_checkpoint), distributed="hsdp", **settings)
    with pytest.raises(ValueError) as error:
        parallelize(model, cfg, World(size=processes))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_shard_size_flags_are_one_clear_line(llama_checkpoint, tmp_path):
    """From the command line: --shard-size below 1 or without hsdp, and hsdp started without torchrun."""
    base = ["train", "--backend", "torch", "--model", str(llama_checkpoint), "--iters", "1", *TRAIN_SMALL]
    for flags, message in [
        (["--distributed", "hsdp", "--shard-size", "0"], "--shard-size must be >= 1, got 0"),
        (["--shard-size", "2"], "--shard-size sizes the shard groups of --distributed hsdp: pass that too"),
        (["--distributed", "hsdp"], "--distributed hsdp shards the model across several processes"),
    ]:
        result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "run"), "--overwrite", *flags])
        output = " ".join(result.output.split())
        assert result.exit_code == 1 and message in output and "Traceback" not in output, result.output
