"""The README's benchmark table: `qstar bench` for L = 64, 128, 256 on each installed backend.

    python benchmarks/thought_overhead.py --out benchmarks/results.json
    python benchmarks/thought_overhead.py --backend torch --compile --out benchmarks/results-compiled.json

Same shape as the performance issue: Llama, hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 704, vocab 4096,
thought_tokens=8, lookahead=4, P=2, batch 1, float32, 2 CPU threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

from qstar.bench import BenchConfig, bench, bench_generation

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", action="append", choices=["torch", "mlx"], help="default: every installed one")
    parser.add_argument("--compile", action="store_true", help="torch: compile the thought steps (TrainConfig.compile)")
    args = parser.parse_args()
    report = {}
    for backend in args.backend or ("torch", "mlx"):
        if importlib.util.find_spec(backend) is None:
            continue
        base = BenchConfig(backend=backend, steps=args.steps, threads=args.threads, compile=args.compile)
        rows = []
        for length in (64, 128, 256):
            rows.append(r := bench(replace(base, seq_len=length)))
            print(
                f"{backend} L={r['seq_len']}: ratio {r['ratio']:.2f}, qstar step {r['qstar_step_s']:.3f}s, "
                f"LM step {r['lm_step_s']:.3f}s, memory added {r['qstar_memory_added_gb']:.2f} GB",
                flush=True,
            )
        report[backend] = {"training": rows, "generation": bench_generation(base)}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
