"""Dispatched operators of a training step, by phase: what a GPU launches one kernel (or more) for, each.

    python benchmarks/operator_count.py                  # Qwen2-0.5B depth (24 layers), tiny width, L=256, k=12
    python benchmarks/operator_count.py --publish        # ... and write the table of docs/PERFORMANCE.md
    python benchmarks/operator_count.py --compile --threads 1 --publish   # the compiled step, the shipped model

Counts every aten operator that reaches the dispatcher on the CPU (torch.utils._python_dispatch.TorchDispatchMode),
views apart, for the qstar step in each step mode (sampling without gradient; the differentiable forward; its
backward) and for transformers' causal-LM step over the same tokens (forward and backward). The ratios are what the
GPU report measures in kernels: a step bound by launches pays per operator.

--compile counts the step `--compile` runs (inductor: the layers' thought steps and the sampling loop, two-pass) on
`--model` (default: the shipped model) with the step its default run takes (its recipe, batch and length), after a
warm-up that compiles it, from torch.profiler's events of one step (forward and backward): the compiled-graph calls,
inductor's generated kernels each call launches (an event per kernel: torch._inductor.config.cpp.enable_kernel_profile),
the aten operators the graphs call (extern kernels such as matmuls, fallbacks) and the operators the step still
dispatches eagerly outside them; against the LM step and the eager two-pass step counted from the same
events. A dispatch mode cannot count a compiled step: torch.compile runs eagerly under one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tables import RESULTS, commit, load, machine, publish, record  # noqa: E402

from qstar.core.bench import BenchConfig, bench_train, random_checkpoint, token_batch  # noqa: E402
from qstar.core.thinker import Thinker  # noqa: E402
from qstar.core.train_config import TrainConfig  # noqa: E402


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


@cache
def overloads(name: str) -> list[Any]:
    """The overloads of an aten operator named as the profiler names it ("aten::empty": no overload)."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    return [] if packet is None else [getattr(packet, o) for o in packet.overloads()]


@cache
def is_view(name: str) -> bool:
    """Whether the operator is a view, as TorchDispatchMode's func.is_view says."""
    return any(op.is_view for op in overloads(name))


@cache
def is_composite(name: str) -> bool:
    """An operator made of others (aten::linear), by its default overload (the profiler names none; else the first
    one): the dispatcher sees the operators it is made of, not it."""
    names = [op.name() for op in overloads(name) if torch._C._dispatch_has_kernel(op.name())]  # no TorchScript-only
    first = min(names, key=lambda n: "." in n, default=None)  # "aten::linear" before "aten::linear.out"
    return first is not None and torch._C._dispatch_has_kernel_for_dispatch_key(first, "CompositeImplicitAutograd")


def profiled_counts(step: Callable[[], Any]) -> Counter[str]:
    """What one call of `step` launches, from torch.profiler's events: compiled-graph calls ("graph calls"), the
    generated kernels they run ("kernels"), and aten operators inside the graphs ("in graphs") and outside them
    ("eager"), views apart ("views"). An operator counts where a TorchDispatchMode sees it: the outermost one that is
    not a composite of others (the ones a kernel calls inside itself do not count)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts: Counter[str] = Counter()
    for event in prof.events():
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        in_graph = any(a.startswith(GRAPH_CALL) for a in ancestors)
        if event.name.startswith(GRAPH_CALL):
            counts["graph calls"] += 1
        elif in_graph and not event.name.startswith("aten::"):  # inductor's kernel events: graph_N_cpp_fused_...
            counts["kernels"] += 1
        elif event.name.startswith("aten::") and not is_composite(event.name):
            if not any(a.startswith("aten::") and not is_composite(a) for a in ancestors):
                counts["views" if is_view(event.name) else "in graphs" if in_graph else "eager"] += 1
    return counts


def dispatched(step: Callable[[], Any]) -> int:
    """The compute operators of one call of an eager `step` as the dispatch mode counts them: the check of
    profiled_counts' rule."""
    with Count() as count:
        step()
    return count.ops["compute"]


GRAPH_CALL = "## Call CompiledFxGraph"
"""The profiler event of a call of an inductor graph (torch/_inductor/output_code.py)."""


def one_step(m: Any, ids: np.ndarray) -> Callable[[], None]:
    """A two-pass step's forward and backward with training's noise (torch's generator, which a compiled sampling
    loop captures), the gradients cleared after."""

    def step() -> None:
        torch.manual_seed(0)
        m.terms(ids).total.backward()
        m.backbone.zero_grad(set_to_none=True)

    return step


def compiled_counts(cfg: BenchConfig) -> tuple[list[dict[str, Any]], int]:
    """The profiled launches of the LM step, the eager two-pass step and the compiled one on cfg.model; and how many
    kernels inductor generated while compiling (torch._inductor.metrics.generated_kernel_count)."""
    import torch._inductor.config
    import torch._inductor.metrics
    from transformers import AutoModelForCausalLM

    import qstar

    assert cfg.model is not None
    rows = int(np.ceil(cfg.tokens / cfg.train.max_seq_length))
    lm = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=getattr(torch, cfg.train.dtype))
    x = torch.from_numpy(token_batch(cfg.model_config().vocab_size, rows, cfg.train.max_seq_length))
    lm(x, labels=x).loss.backward()  # warm-up
    counted = {"LM (transformers)": profiled_counts(lambda: lm(x, labels=x).loss.backward())}
    counted["LM (transformers)"]["dispatched"] = dispatched(lambda: lm(x, labels=x).loss.backward())
    recipe, dtype = cfg.train.make_recipe(), cfg.train.dtype
    m = qstar.load(cfg.model, backend="torch", dtype=dtype, device="cpu", step_mode="two-pass", recipe=recipe)
    ids = token_batch(cfg.model_config().vocab_size, cfg.train.batch_size, cfg.train.max_seq_length)
    step = one_step(m, ids)
    step()  # warm-up: rope tables, lazy inits
    counted["qstar two-pass"] = profiled_counts(step)
    counted["qstar two-pass"]["dispatched"] = dispatched(step)
    torch._inductor.config.cpp.enable_kernel_profile = True  # a profiler event per generated kernel call
    torch._inductor.config.fx_graph_cache = False  # generate every kernel here, for the count
    torch._inductor.metrics.reset()
    backbone: Any = m.backbone  # torch's (qstar/torch_backend/backbone.py), what --compile compiles
    backbone.compile_thought_steps()
    backbone.compile_sampling_loop()
    step()  # compiles
    step()
    generated = torch._inductor.metrics.generated_kernel_count
    counted["qstar two-pass, compiled"] = profiled_counts(step)
    return [{"step": name, **c} for name, c in counted.items()], generated


def publish_compiled(cfg: BenchConfig, rows: list[dict[str, Any]], generated: int, command: str) -> None:
    """Record the compiled counts as operators.json's "compiled" (its other keys kept) and write the table."""
    r = cfg.train.make_recipe()
    shape = f"{Path(str(cfg.model)).name}, the step of its default run: L={cfg.train.max_seq_length}, "
    shape += f"batch {cfg.train.batch_size}, k={r.thought_tokens}, A={r.lookahead}, P={r.thoughts_per_position}, "
    shape += f"{cfg.train.dtype}, {torch.get_num_threads()} thread(s)"
    compiled: dict[str, Any] = {"command": command, "date": datetime.date.today().isoformat(), "commit": commit()}
    compiled |= {"machine": machine(), "shape": shape, "generated_kernels": generated, "rows": rows}
    results = load("operators") | {"compiled": compiled}
    (RESULTS / "operators.json").write_text(json.dumps(results, indent=2) + "\n")
    publish("operators")


def measure_compiled(args: argparse.Namespace) -> None:
    from qstar.weights import DEFAULT_MODEL

    model = args.model or DEFAULT_MODEL
    cfg = BenchConfig(TrainConfig(model=model, backend="torch"), model=model)
    torch.set_num_threads(args.threads)
    rows, generated = compiled_counts(cfg)
    lm_total = rows[0]["eager"]
    for r in rows:
        total = r.get("kernels", 0) + r.get("in graphs", 0) + r.get("eager", 0)
        print(
            f"{r['step']:>26}: {r.get('graph calls', 0)} graph calls, {r.get('kernels', 0)} generated kernels, "
            f"{r.get('in graphs', 0)} operators in graphs, {r.get('eager', 0)} outside, {r.get('views', 0)} views: "
            f"{total} launches, {total / lm_total:.2f} x the LM step",
            flush=True,
        )
    print(f"inductor generated {generated} kernels while compiling")
    if args.publish:
        command = "python benchmarks/operator_count.py --compile" + (" --model MODEL" if args.model else "")
        publish_compiled(cfg, rows, generated, f"{command} --threads {args.threads} --publish")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--thought-tokens", type=int, default=12)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compile", action="store_true", help="count the compiled step's launches on --model")
    parser.add_argument("--model", help="with --compile: a checkpoint (default: the shipped model), its default step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--publish", action="store_true", help="record and write the docs table")
    args = parser.parse_args()
    if args.compile:
        measure_compiled(args)
        return
    recipe = dict(thought_tokens=args.thought_tokens, lookahead=4, thoughts_per_position=2)
    train = bench_train(recipe, backend="torch", max_seq_length=args.seq_len, dtype=args.dtype)
    cfg = BenchConfig(train, shape="proxy-24", overrides={"num_hidden_layers": args.layers})
    torch.set_num_threads(args.threads)
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
        kept = {k: v for k, v in load("operators").items() if k == "compiled"}  # measured by --compile
        record("operators", rows, command, shape=shape, lm_total=lm_total, **kept)
        publish("operators")


if __name__ == "__main__":
    main()
