"""Dispatched operators of a training step, by phase: what a GPU launches one kernel (or more) for, each.

    python benchmarks/operator_count.py                  # Qwen2-0.5B depth (24 layers), tiny width, L=256, k=12
    python benchmarks/operator_count.py --publish        # ... and write the table of docs/PERFORMANCE.md

Counts every aten operator that reaches the dispatcher on the CPU (torch.utils._python_dispatch.TorchDispatchMode),
views apart, for the qstar step in each step mode (sampling without gradient; the differentiable forward; its
backward) and for transformers' causal-LM step over the same tokens (forward and backward). The ratios are what the
GPU report measures in kernels: a step bound by launches pays per operator.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tables import publish, record  # noqa: E402

from qstar.core.bench import BenchConfig, bench_train, random_checkpoint, token_batch  # noqa: E402
from qstar.core.thinker import Thinker  # noqa: E402


class Count(TorchDispatchMode):
    """Counts the aten operators dispatched inside it: compute and views apart."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops["view" if func.is_view else "compute"] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting(counts: dict[str, Counter[str]], phase: str) -> Any:
    with Count() as count:
        yield
    counts[phase] = count.ops


def qstar_counts(path: Path, cfg: BenchConfig, mode: str) -> dict[str, Counter[str]]:
    """Operators of one qstar step (forward and backward of the loss), by phase."""
    import qstar

    m = qstar.load(
        path, backend="torch", dtype=cfg.train.dtype, device="cpu", step_mode=mode, recipe=cfg.train.make_recipe()
    )
    ids = token_batch(cfg.model_config().vocab_size, cfg.train.batch_size, cfg.train.max_seq_length)
    m.loss(ids, seed=0)  # warm-up: rope tables, lazy inits
    counts: dict[str, Counter[str]] = {}
    sample = Thinker.sample_without_gradient

    def counted(*args: Any, **kwargs: Any) -> Any:  # two-pass: the sampling loop, without gradient
        with counting(counts, "sampling (no gradient)"):
            return sample(*args, **kwargs)

    Thinker.sample_without_gradient = counted  # type: ignore[method-assign]
    try:
        with Count() as forward:
            terms = m.terms(ids, seed=0)
        counts["forward"] = forward.ops - counts.get("sampling (no gradient)", Counter())
        with counting(counts, "backward"):
            terms.total.backward()
    finally:
        Thinker.sample_without_gradient = sample  # type: ignore[method-assign]
    return counts


def lm_counts(path: Path, cfg: BenchConfig) -> dict[str, Counter[str]]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    dtype = getattr(torch, cfg.train.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    rows = int(np.ceil(cfg.tokens / cfg.train.max_seq_length))
    x = torch.from_numpy(token_batch(cfg.model_config().vocab_size, rows, cfg.train.max_seq_length))
    model(x, labels=x).loss.backward()  # warm-up
    counts: dict[str, Counter[str]] = {}
    with counting(counts, "forward"):
        loss = model(x, labels=x).loss
    with counting(counts, "backward"):
        loss.backward()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--thought-tokens", type=int, default=12)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--publish", action="store_true", help="record and write the docs table")
    args = parser.parse_args()
    recipe = dict(thought_tokens=args.thought_tokens, lookahead=4, thoughts_per_position=2)
    train = bench_train(recipe, backend="torch", max_seq_length=args.seq_len, dtype=args.dtype)
    cfg = BenchConfig(train, shape="proxy-24", overrides={"num_hidden_layers": args.layers})
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(cfg.config_fields(), Path(tmp))
        lm = lm_counts(path, cfg)
        lm_total = sum(c["compute"] for c in lm.values())
        rows = [{"step": "LM (transformers)", "phase": p, **c} for p, c in lm.items()]
        for mode in ("one-pass", "two-pass"):
            counts = qstar_counts(path, cfg, mode)
            rows += [{"step": f"qstar {mode}", "phase": p, **c} for p, c in counts.items()]
    for r in rows:
        r.setdefault("view", 0)
        r.setdefault("compute", 0)
        print(f"{r['step']:>18} {r['phase']:>24}: {r['compute']:7d} compute, {r['view']:7d} views", flush=True)
    totals: Counter[str] = Counter()
    for r in rows:
        totals[str(r["step"])] += int(str(r["compute"]))
    for step, total in totals.items():
        print(f"{step:>18} total: {total} compute operators, {total / lm_total:.2f} x the LM step")
    if args.publish:
        shape = f"proxy-24 (Qwen2-0.5B's 24 layers at width 64), L={args.seq_len}, k={args.thought_tokens}, A=4, P=2"
        shape += f", {args.dtype}"
        command = "python benchmarks/operator_count.py --publish"
        record("operators", rows, command, shape=shape, lm_total=lm_total)
        publish("operators")


if __name__ == "__main__":
    main()
