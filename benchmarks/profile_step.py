"""Where a torch training step's time goes: torch.profiler over one qstar step and one LM step after warm-up.

    python benchmarks/profile_step.py --shape Qwen2.5-0.5B --dtype bfloat16 --seq-len 256 --thought-tokens 12

Prints, per kind, each warm-up step's time (the first includes any compiling), the kernels launched and their
summed device time (on a GPU, wall time far above kernel time means the step is bound by launching kernels, not by
computing them), then the top operators.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from qstar.core import backend
from qstar.core.bench import BenchConfig, bench_train, make_step, random_checkpoint
from qstar.core.model_config import SHAPES


def profile_kind(cfg: BenchConfig, kind: str, path: Path, rows: int) -> None:
    step, ops = make_step(cfg, kind, path), backend.get("torch").make_ops(cfg.device)
    for i in range(cfg.warmup + 1):
        tic = time.perf_counter()
        step()
        ops.synchronize()
        wall = time.perf_counter() - tic
        print(f"{kind} step {i + 1}: {wall:.3f} s", flush=True)
    cuda = ops.on_accelerator()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        ops.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    kernel_s = sum(e.self_device_time_total for e in kernels) / 1e6
    print(
        f"\n== {kind}: {wall:.3f} s per step unprofiled; {sum(e.count for e in kernels)} kernels, "
        f"{kernel_s:.3f} s of kernel time; {sum(e.count for e in events)} profiled events",
        flush=True,
    )
    print(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--thought-tokens", type=int, default=8)
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--thoughts-per-position", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="compile the thought steps (TrainConfig.compile)")
    parser.add_argument("--step-mode", choices=["one-pass", "two-pass"], default=None, help="default: the device's")
    parser.add_argument("--rows", type=int, default=25, help="operators listed per kind")
    parser.add_argument("--kind", choices=["qstar", "lm", "both"], default="both", help="which step to profile")
    args = parser.parse_args()
    recipe = dict(
        thought_tokens=args.thought_tokens, lookahead=args.lookahead, thoughts_per_position=args.thoughts_per_position
    )
    train = bench_train(
        recipe,
        backend="torch",
        max_seq_length=args.seq_len,
        dtype=args.dtype,
        threads=args.threads,
        compile=args.compile,
        step_mode=args.step_mode,
    )
    cfg = BenchConfig(train, shape=args.shape, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = random_checkpoint(cfg.config_fields(), Path(tmp))
        for kind in ("qstar", "lm") if args.kind == "both" else (args.kind,):
            profile_kind(cfg, kind, checkpoint, args.rows)
