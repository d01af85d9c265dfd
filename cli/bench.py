"""`qstar bench`: the thought overhead ratio (and memory) of a training step, and thoughtful generation speed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from qstar.cli.errors import user_errors

if TYPE_CHECKING:
    from qstar.bench import BenchConfig


@user_errors
def bench(
    backend: Annotated[str, typer.Option(help="torch or mlx")] = "torch",
    model: Annotated[
        str | None, typer.Option(help="Checkpoint to measure (default: a random model of --shape)")
    ] = None,
    seq_len: Annotated[list[int] | None, typer.Option(help="Sequence length L (repeatable)")] = None,
    thought_tokens: Annotated[int, typer.Option(help="k")] = 8,
    lookahead: Annotated[int, typer.Option(help="A")] = 4,
    thoughts_per_position: Annotated[int, typer.Option(help="P")] = 2,
    batch: Annotated[int, typer.Option(help="Sequences per step")] = 1,
    shape: Annotated[
        str, typer.Option(help="Random model shape: issue (Llama, hidden 256, 4 layers) or qwen2-0.5b")
    ] = "issue",
    hidden: Annotated[int | None, typer.Option(help="Hidden size (overrides the shape)")] = None,
    layers: Annotated[int | None, typer.Option(help="Layers (overrides the shape)")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads (overrides the shape)")] = None,
    kv_heads: Annotated[int | None, typer.Option(help="Key/value heads (overrides the shape)")] = None,
    intermediate: Annotated[int | None, typer.Option(help="MLP size (overrides the shape)")] = None,
    vocab: Annotated[int | None, typer.Option(help="Vocabulary size (overrides the shape)")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16")] = "float32",
    device: Annotated[str | None, typer.Option(help="cpu or cuda (torch); default: cuda when available")] = None,
    steps: Annotated[
        int, typer.Option(help="Measured steps of each kind (qstar and LM alternate; median) after 2 warm-up steps")
    ] = 5,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch")] = None,
    compile: Annotated[bool, typer.Option(help="torch: compile the thought steps (TrainConfig.compile)")] = False,
    attention: Annotated[str, typer.Option(help="torch: split or flex (FlexAttention, CUDA)")] = "split",
    step_mode: Annotated[str | None, typer.Option(help="one-pass or two-pass [default: the device's]")] = None,
    peak_tflops: Annotated[
        float | None, typer.Option(help="Device peak TFLOP/s for MFU (default: known CUDA GPUs in bf16/fp16)")
    ] = None,
    generation: Annotated[bool, typer.Option(help="Also measure thoughtful vs plain decoding")] = True,
    memory: Annotated[
        bool, typer.Option(help="Estimate the peak memory of one step per device, term by term (no timing)")
    ] = False,
    fine_tune_type: Annotated[str, typer.Option(help="--memory: full, lora, dora or qlora")] = "full",
    devices: Annotated[
        int, typer.Option(help="--memory: torchrun processes (full fine-tuning shards over them: FSDP2)")
    ] = 1,
    grad_checkpoint: Annotated[bool, typer.Option(help="Recompute layer activations in backward")] = False,
    measure: Annotated[
        bool, typer.Option(help="--memory: also run the step here and measure what it adds (full, lora, dora)")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here")] = None,
) -> None:
    """Measure, side by side in one run, a Quiet-STaR step against an ordinary LM step over the same W tokens."""
    from qstar.bench import SHAPES, BenchConfig, bench_generation
    from qstar.bench import bench as run
    from qstar.core.files import write_atomic
    from qstar.core.memory import MODELS

    if shape not in SHAPES and not (memory and shape in MODELS):
        named = ", ".join([*SHAPES, *(f"{m} (--memory)" for m in MODELS)])
        raise ValueError(f"unknown --shape {shape!r}: choose one of {named}")
    dims = dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate, vocab=vocab)
    base = BenchConfig(
        backend=backend,
        model=model,
        **{**SHAPES.get(shape, {}), **{k: v for k, v in dims.items() if v is not None}},
        thought_tokens=thought_tokens,
        lookahead=lookahead,
        thoughts_per_position=thoughts_per_position,
        batch=batch,
        dtype=dtype,
        device=device,
        steps=steps,
        threads=threads,
        compile=compile,
        step_mode=step_mode,
        attention=attention,
        peak_tflops=peak_tflops,
        grad_checkpoint=grad_checkpoint,
        fine_tune_type=fine_tune_type,
    )
    console = Console()
    if memory:
        report_memory(console, base, shape, (seq_len or [256])[0], devices, measure, out)
        return
    table = Table(
        title=f"thought overhead ({backend}, {dtype}, k={thought_tokens}, A={lookahead}, "
        f"P={thoughts_per_position}, B={batch}, {shape if model is None else model})"
    )
    columns = (
        "L",
        "mode",
        "W",
        "qstar step s",
        "LM step s",
        "ratio",
        "qstar tok/s",
        "memory added GB (qstar / LM)",
        "MFU",
    )
    for column in columns:
        table.add_column(column, justify="right")
    results = []
    for length in seq_len or [64, 128, 256]:
        r = run(replace(base, seq_len=length))
        results.append(r)
        table.add_row(
            str(length),
            r["step_mode"],
            str(r["W"]),
            f"{r['qstar_step_s']:.3f}",
            f"{r['lm_step_s']:.3f}",
            f"{r['ratio']:.2f}",
            f"{r['qstar_tokens_per_s']:.0f}",
            f"{r['qstar_memory_added_gb']:.2f} / {r['lm_memory_added_gb']:.2f}",
            "-" if r["mfu"] is None else f"{r['mfu']:.1%}",
        )
    console.print(table)
    report = {"training": results}
    if generation:
        rows = bench_generation(base)
        gen = Table(title="generation (emitted tokens/s)")
        for column in ("batch", "plain", "with thoughts", "target 0.7 x plain / (k+3)", "met"):
            gen.add_column(column, justify="right")
        for g in rows:
            gen.add_row(
                str(g["batch"]),
                f"{g['plain_tokens_per_s']:.1f}",
                f"{g['thought_tokens_per_s']:.1f}",
                f"{g['target_tokens_per_s']:.1f}",
                "yes" if g["meets_target"] else "NO",
            )
        console.print(gen)
        report["generation"] = rows
    if out is not None:
        write_atomic(out, json.dumps(report, indent=2))
        console.print(f"wrote {out}")


def report_memory(
    console: Console, cfg: BenchConfig, shape: str, length: int, devices: int, measure: bool, out: Path | None
) -> None:
    """`qstar bench --memory`: the estimate's terms and total per device, where it fits, and with --measure what the
    step adds when it runs here."""
    from qstar.bench import added_by_the_step, measure_memory, memory_step, shape_config
    from qstar.core.files import write_atomic
    from qstar.core.hf_config import read_config
    from qstar.core.memory import GIB, MODELS, estimate, fitting

    cfg = replace(cfg, seq_len=length)
    config = read_config(cfg.model)[0] if cfg.model else MODELS.get(shape) or shape_config(cfg)
    step = memory_step(cfg, devices)
    terms = estimate(config, step)
    total = sum(terms.values())
    name = cfg.model or shape
    table = Table(
        title=f"peak memory a device, estimated ({name}, {step.fine_tune}, {devices} device(s), {cfg.dtype}, "
        f"L={length}, k={step.thought_tokens}, A={step.lookahead}, P={step.thoughts_per_position}, B={step.batch}, "
        f"{step.step_mode}{', grad checkpoint' if step.grad_checkpoint else ''})"
    )
    table.add_column("term")
    table.add_column("GiB", justify="right")
    for term, value in terms.items():
        table.add_row(term, f"{value / GIB:.2f}")
    table.add_row("[bold]total[/bold]", f"[bold]{total / GIB:.2f}[/bold]")
    console.print(table)
    fits = fitting(total, step)
    console.print(f"fits: {', '.join(fits) or 'none of an 80 GB GPU, a 141 GB GPU, a 64 GB Mac'}")
    report: dict[str, object] = {"terms": terms, "total": total, "fits": fits}
    if measure:
        if cfg.model is None and shape in MODELS:
            raise ValueError(f"--measure runs the step here: --shape {shape} is estimated only; pass --model DIR")
        added = added_by_the_step(terms)
        measured = measure_memory(cfg)
        console.print(f"measured here: the step adds {measured:.3f} GB; estimated {added:.3f} GB")
        report |= {"measured_added_gb": measured, "estimated_added_gb": added}
    if out is not None:
        write_atomic(out, json.dumps(report, indent=2))
