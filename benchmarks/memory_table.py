"""What fits where: the peak memory of one training step per device, estimated by qstar/core/memory.py for the
models users train, and the estimate checked against steps measured on this CPU with both backends.

    python benchmarks/memory_table.py --publish

The estimated table is the README's (bfloat16, L=256, k=12, A=4, P=2, one sequence a device, two-pass steps with
--grad-checkpoint; LoRA rank 8 on the last 16 layers; QLoRA: NF4 (bitsandbytes) on torch, 4-bit in groups of 64 on
MLX); the measured one compares what
a step adds to its loaded model (gradients, optimizer state, activations) with the estimate of those terms.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import publish, record, render  # noqa: E402

from qstar.core.bench import BenchConfig, added_by_the_step, bench_train, measure_memory, memory_step  # noqa: E402
from qstar.core.memory import MODELS, TABLE_MODELS, Step, estimate, fitting  # noqa: E402

STEP = Step()
"""The README's: bfloat16, L=256, k=12, A=4, P=2, one sequence a device, two-pass with --grad-checkpoint."""
GPUS = 8
MEASURED: list[dict[str, Any]] = [
    dict(seq_len=64, fine_tune_type="full"),
    dict(seq_len=256, fine_tune_type="full"),
    dict(seq_len=64, fine_tune_type="lora"),
    dict(seq_len=256, fine_tune_type="lora"),
    dict(seq_len=64, fine_tune_type="qlora"),
    dict(seq_len=256, fine_tune_type="qlora"),
]
"""Small steps (the BenchConfig default: the `small` Llama, hidden 256, 4 layers, k=8, A=4, P=2, float32) measured
here."""


def gb(step: Step, name: str) -> dict[str, Any]:
    total = sum(estimate(MODELS[name], step).values())
    return {"gb": total / 1e9, "fits": fitting(total, step)}


def estimated_rows() -> list[dict[str, Any]]:
    rows = []
    for name in TABLE_MODELS:
        for fine_tune in ("full", "lora", "qlora"):
            step = replace(STEP, fine_tune=fine_tune)
            row: dict[str, Any] = {"model": name, "fine_tune": fine_tune}
            row["one_gpu"] = gb(step, name)
            row["gpus"] = gb(replace(step, devices=GPUS), name)
            row["mac"] = gb(replace(step, backend="mlx"), name)
            rows.append(row)
    return rows


def measured_rows(threads: int) -> list[dict[str, Any]]:
    rows = []
    for backend in ("torch", "mlx"):
        for shape in MEASURED:
            length, fine_tune = int(shape["seq_len"]), str(shape["fine_tune_type"])
            cpu_threads = threads if backend == "torch" else None  # MLX chooses its own
            train = bench_train(backend=backend, grad_checkpoint=True, threads=cpu_threads, max_seq_length=length)
            adapters = "lora" if fine_tune == "qlora" else fine_tune
            cfg = BenchConfig(replace(train, fine_tune_type=adapters), device="cpu", quantized=fine_tune == "qlora")
            estimated = added_by_the_step(estimate(cfg.model_config(), memory_step(cfg)))
            measured = measure_memory(cfg)
            print(backend, shape, f"measured {measured:.3f} GB, estimated {estimated:.3f} GB", flush=True)
            rows.append({"backend": backend, **shape, "measured_gb": measured, "estimated_gb": estimated})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch's CPU threads")
    parser.add_argument("--publish", action="store_true", help="record the results and write the docs tables")
    parser.add_argument("--estimates-only", action="store_true", help="skip the measured table")
    args = parser.parse_args()
    r, a = STEP.recipe, STEP.adapters
    step = dict(
        seq_len=STEP.seq_len,
        thought_tokens=r.thought_tokens,
        lookahead=r.lookahead,
        thoughts_per_position=r.thoughts_per_position,
        batch=STEP.batch,
        lora_rank=a.rank,
        lora_layers=a.num_layers,
        q_bits=STEP.q_bits,
        gpus=GPUS,
    )
    estimates = {"command": "python benchmarks/memory_table.py --publish", "date": "-", "machine": "-"}
    rows = estimated_rows()
    print(render("memory-fits", {**estimates, "step": step, "rows": rows}))
    if args.publish:
        for name, kept in (("memory-fits", rows), ("memory-fits-7b", [r for r in rows if "7B" in r["model"]])):
            record(name, kept, "python benchmarks/memory_table.py --publish", step=step)  # -7b: the README's rows
            publish(name)
    if not args.estimates_only:
        rows = measured_rows(args.threads)
        command = f"python benchmarks/memory_table.py --threads {args.threads} --publish"
        if args.publish:
            record("memory-measured", rows, command)
            publish("memory-measured")
