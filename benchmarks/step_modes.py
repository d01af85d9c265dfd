"""One-pass against two-pass steps, side by side in one process (they alternate, so a busy machine slows both
alike): the measurement behind DEFAULT_CPU_STEP_MODE (qstar/core/model.py), the CPU's default mode.

    python benchmarks/step_modes.py --threads 2 --publish

Shape of benchmarks/thought_overhead.py (Llama, hidden 256, 4 layers, k=8, A=4, P=2, batch 1, float32); each step is
the loss and its backward (no optimizer), the median of --steps after two warm-up rounds.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import publish, record  # noqa: E402

import qstar  # noqa: E402
from qstar.core.bench import BenchConfig, random_checkpoint  # noqa: E402
from qstar.core.thinker import STEP_MODES  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--publish", action="store_true", help="record the results and write the docs table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BenchConfig()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(cfg.config_fields(), Path(tmp))
        m = qstar.load(str(path), backend="torch", recipe=cfg.train.make_recipe())
        for length in args.lengths:
            ids = np.random.default_rng(0).integers(4, cfg.model_config().vocab_size, (cfg.train.batch_size, length))
            times: dict[str, list[float]] = {mode: [] for mode in STEP_MODES}
            for _ in range(args.steps + 2):
                for mode in STEP_MODES:
                    m.step_mode = mode
                    for p in m.parameters().values():
                        p.grad = None
                    start = time.perf_counter()
                    m.terms(ids).total.backward()
                    times[mode].append(time.perf_counter() - start)
            row = {"seq_len": length, **{mode: statistics.median(t[2:]) for mode, t in times.items()}}
            rows.append(row)
            print(row, flush=True)
    if args.publish:
        record("modes-torch", rows, "python benchmarks/step_modes.py " + shlex.join(sys.argv[1:]), threads=args.threads)
        publish("modes-torch")
