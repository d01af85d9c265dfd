"""Each rank's peak resident memory while a sharded run (FSDP2, 4 processes under torchrun, gloo on the CPU) steps,
saves a checkpoint and resumes from it: a save or a resume should cost a rank no more than a step (rank 0 holds
one extra copy of the whole state on the host, which it writes or reads), not the whole model and its AdamW moments
on every rank.

    python benchmarks/sharded_memory.py --model /work/models/smol-base \\
        [--before /tmp/qstar-before] [--publish]

Runs `qstar train` (its trainer, in process) twice under torchrun: 2 steps of full fine-tuning with a checkpoint at
the end, then --resume from it. Each rank reads its VmHWM (Linux; reset through /proc/self/clear_refs, as
qstar.core.ops.reset_peak_rss does) around each step, around the save (with what each adds to the resident set
before it), and from its start through the restore of the resumed run. --before PATH measures the code of another
checkout too (e.g. `git worktree add /tmp/qstar-before COMMIT`), imported from there instead of this tree, in the
same invocation: the table's before and after rows.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("step", "save", "resume")
RUN = {
    "backend": "torch",
    "distributed": "fsdp",
    "dtype": "float32",
    "batch_size": 1,
    "max_seq_length": 32,
    "thought_tokens": 2,
    "lookahead": 2,
    "iters": 2,
    "save_every": 2,
    "val_batches": 1,
    "steps_per_report": 1,
    "warmup_steps": 1,
    "threads": 1,
}
"""The run: small enough for 4 processes on a 2-core machine, the model's full weights and optimizer state all the
same."""


def measured(peaks: dict[str, float], phase: str, fn: Callable[..., Any], reset: bool = True) -> Callable[..., Any]:
    """`fn` recording the highest VmHWM it reaches under `phase` and, reset before it, the most it adds to the resident
    set (without reset: counted from the process's start). Before a reset, glibc's malloc_trim gives back what earlier
    phases freed: else the allocator's kept pages would hide what this phase allocates."""
    from qstar.core.ops import peak_rss_gb, reset_peak_rss, rss_gb

    def call(*args: Any, **kwargs: Any) -> Any:
        start = 0.0
        if reset:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            reset_peak_rss()
            start = rss_gb()
        result = fn(*args, **kwargs)
        peaks[phase] = max(peaks.get(phase, 0.0), peak_rss_gb())
        peaks[f"{phase}_adds"] = max(peaks.get(f"{phase}_adds", 0.0), peak_rss_gb() - start)
        return result

    return call


def worker(model: str, out: Path, resume: bool) -> None:
    """One rank: train (steps and a save) or resume, through the trainer, its peaks written to out/rank-N.json."""
    from qstar.core import backend, trainer
    from qstar.core.train_config import resolve_config
    from qstar.torch_backend.session import Session

    peaks: dict[str, float] = {}
    if resume:  # from the process's start: the model's load, the session and the restored state
        trainer.Loop.restore = measured(peaks, "resume", trainer.Loop.restore, reset=False)  # type: ignore[method-assign]
    else:
        Session.step = measured(peaks, "step", Session.step)  # type: ignore[method-assign]
        trainer.Loop.save = measured(peaks, "save", trainer.Loop.save)  # type: ignore[method-assign]
    cfg = resolve_config({**RUN, "model": model, "out": str(out / "run")})
    trainer.train(cfg, backend.get("torch"), resume=resume, overwrite=not resume, show_progress=False)
    file = out / f"rank-{os.environ['RANK']}.json"  # the training run's peaks, then the resumed run's with them
    file.write_text(json.dumps(peaks | (json.loads(file.read_text()) if resume else {})))


def measure(model: str, tree: Path, processes: int) -> list[dict[str, float]]:
    """Each rank's peaks with the qstar of `tree`: a training run of 4 processes, then its resume."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in ("train", "resume"):
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
            command = [*launch, __file__, "--worker", phase, "--model", model, "--out", tmp]
            subprocess.run(command, env=env, check=True)
        return [json.loads((Path(tmp) / f"rank-{rank}.json").read_text()) for rank in range(processes)]


def commit(tree: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return done.stdout.strip() or str(tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a float32 qstar checkpoint (SmolLM2-135M converted)")
    parser.add_argument("--before", type=Path, help="another checkout whose code is measured too (the old path)")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--publish", action="store_true", help="record the results and write the docs table")
    parser.add_argument("--worker", choices=["train", "resume"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.out, args.worker == "resume")
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tables import publish, record, render

    trees = ([("before", args.before)] if args.before else []) + [("after", ROOT)]
    rows = [
        {"code": code, "commit": commit(tree), "rank": rank, **{f"{p}_gb": peaks[p] for p in PHASES}}
        | {f"{p}_adds_gb": peaks[f"{p}_adds"] for p in PHASES[:2]}
        for code, tree in trees
        for rank, peaks in enumerate(measure(args.model, tree, args.processes))
    ]
    command = "python benchmarks/sharded_memory.py --model MODEL" + (" --before OLD_CHECKOUT" if args.before else "")
    meta = {"ranks": args.processes, "model": Path(args.model).name, "run": RUN}
    print(render("sharded", {"command": command, "date": "-", "machine": "-", **meta, "rows": rows}))
    if args.publish:
        record("sharded", rows, command + " --publish", **meta)
        publish("sharded")


if __name__ == "__main__":
    main()
