"""`qstar bench`: the thought overhead ratio (and memory) of a training step, and thoughtful generation speed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from qstar.cli.errors import user_errors


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
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here")] = None,
) -> None:
    """Measure, side by side in one run, a Quiet-STaR step against an ordinary LM step over the same W tokens."""
    from qstar.bench import SHAPES, BenchConfig, bench_generation
    from qstar.bench import bench as run
    from qstar.core.files import write_atomic

    if shape not in SHAPES:
        raise ValueError(f"unknown --shape {shape!r}: choose one of {', '.join(SHAPES)}")
    dims = dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate, vocab=vocab)
    base = BenchConfig(
        backend=backend,
        model=model,
        **{**SHAPES[shape], **{k: v for k, v in dims.items() if v is not None}},
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
    )
    console = Console()
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
