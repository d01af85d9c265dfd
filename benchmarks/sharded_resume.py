"""A sharded run (FSDP2 under torchrun) saves, resumes and reproduces an uninterrupted run bit for bit, on the devices
at hand: NCCL on GPUs (benchmarks/gpu_check.sh runs it where two are present), gloo on the CPU elsewhere.

    python benchmarks/sharded_resume.py [--processes 2] [--steps 3] [--out DIR]

Three runs of the shipped model's full fine-tuning (`qstar train`, sharded by default under torchrun): 2N steps
straight; N steps, then `--resume --iters 2N` from the checkpoint the first N saved. Every step lies inside the warmup,
so both runs step with the same learning rates. The losses, gradient norms and validations of every step must be equal
bit for bit (tests/helpers.py's assert_same_runs, what tests/torch/test_distributed.py checks with gloo), and so must
the final weights. Every process runs with torch.use_deterministic_algorithms: CUDA's atomic adds (an embedding's
backward) would otherwise make two runs differ without anything being wrong.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: list[str]) -> None:
    """One rank: `qstar train ARGS` with deterministic algorithms."""
    import torch

    from qstar.cli.main import app

    torch.use_deterministic_algorithms(True, warn_only=True)
    app(args=args, prog_name="qstar")


def train(processes: int, out: Path, *args: str) -> None:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    run = ["train", "--out", str(out), "--threads", "1", "--save-every", "1", "--steps-per-report", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    subprocess.run([*launch, __file__, "--worker", *run, *args], env=env, check=True)


def same_weights(a: Path, b: Path) -> None:
    """The safetensors files of two checkpoints hold equal tensors, bit for bit."""
    from safetensors.numpy import load_file

    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in b.glob("*.safetensors")), (files, b)
    for name in files:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(x[k].tobytes() == y[k].tobytes() for k in x), name


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="N: the steps before the resume (2N in all)")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import assert_same_runs

    n = args.steps
    common = ("--warmup-steps", str(2 * n), "--steps-per-eval", str(n), "--val-batches", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        whole, broken = out / "whole", out / "broken"
        train(args.processes, whole, "--iters", str(2 * n), "--overwrite", *common)
        train(args.processes, broken, "--iters", str(n), "--overwrite", *common)
        train(args.processes, broken, "--resume", "--iters", str(2 * n))
        assert_same_runs(whole, broken, 2 * n)
        same_weights(whole / "model", broken / "model")
    print(f"sharded_resume: {args.processes} processes, {n} steps, saved, resumed to {2 * n}: bit-exact")


if __name__ == "__main__":
    main()
