"""The CPU overhead table of docs/PERFORMANCE.md: `qstar bench` for L = 64, 128, 256, per backend and step mode.

    python benchmarks/thought_overhead.py --backend torch --publish
    python benchmarks/thought_overhead.py --backend torch --step-mode one-pass --step-mode two-pass --publish

Same shape as the performance issue: Llama, hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 704, vocab 4096,
thought_tokens=8, lookahead=4, P=2, batch 1, float32. --publish records benchmarks/results/overhead-BACKEND.json and
writes its table into the docs (benchmarks/tables.py); generation speeds go to generation-BACKEND.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import publish, record  # noqa: E402

from qstar.core.bench import BenchConfig, bench_train, generation_speed, overhead  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", action="append", choices=["torch", "mlx"], help="default: every installed one")
    parser.add_argument("--step-mode", action="append", choices=["one-pass", "two-pass"], help="default: the device's")
    parser.add_argument("--compile", action="store_true", help="torch: compile the thought steps (TrainConfig.compile)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--no-generation", action="store_true", help="skip the generation speeds")
    parser.add_argument("--publish", action="store_true", help="record the results and write the docs tables")
    args = parser.parse_args()
    command = "python benchmarks/thought_overhead.py " + shlex.join(sys.argv[1:])
    for backend in args.backend or ("torch", "mlx"):
        if importlib.util.find_spec(backend) is None:
            continue
        base = BenchConfig(bench_train(backend=backend, threads=args.threads, compile=args.compile), steps=args.steps)
        rows = []
        for mode in args.step_mode or [None]:
            label = ", ".join([backend, *([mode] if mode else []), *(["--compile"] if args.compile else [])])
            for length in args.lengths:
                r = overhead(replace(base, train=replace(base.train, max_seq_length=length, step_mode=mode)))
                rows.append({"label": label, **r})
                print(
                    f"{label} L={r['seq_len']}: ratio {r['ratio']:.2f}, price {r['price']:.1f}, qstar step "
                    f"{r['qstar_step_s']:.3f}s, LM step {r['lm_step_s']:.3f}s, memory added "
                    f"{r['qstar_memory_added_gb']:.2f} GB",
                    flush=True,
                )
        generation = [] if args.no_generation else generation_speed(base)
        if args.publish:
            record(f"overhead-{backend}", rows, command, threads=args.threads)
            publish(f"overhead-{backend}")
            if generation:
                record(f"generation-{backend}", generation, command, threads=args.threads)
                publish(f"generation-{backend}")
