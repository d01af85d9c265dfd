"""`qstar bench`: what a training step costs (time, both prices, memory) and thoughtful generation speed; `--memory`:
the peak memory of a step per device, estimated term by term (and measured here with --measure)."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from qstar.cli.errors import user_errors
from qstar.cli.options import RECIPE_FIELDS, field_flags, plain_table
from qstar.core.bench import BENCH_DEFAULTS, BenchConfig, bench_train
from qstar.core.model_config import SHAPES
from qstar.core.recipe import Recipe
from qstar.core.train_config import TrainConfig

STEP_FLAGS = (
    "backend",
    "dtype",
    "batch_size",
    "threads",
    "grad_checkpoint",
    "step_mode",
    "attention",
    "compile",
    "fine_tune_type",
)
"""The training settings a benchmarked step takes as flags (TrainConfig's, with their help)."""
SHAPE_FLAGS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)
"""config.json fields of the random model a flag may change."""


@user_errors
def bench(
    model: Annotated[
        str | None, typer.Option(help="Checkpoint to measure [default: a random model of --shape]")
    ] = None,
    shape: Annotated[str, typer.Option(help=f"Random model shape: {', '.join(SHAPES)}")] = "small",
    seq_len: Annotated[
        list[int] | None, typer.Option(help="Sequence length L, repeatable [default: 64 128 256]")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda (torch) or gpu (mlx) [default: the backend's]")] = None,
    steps: Annotated[
        int, typer.Option(help="Measured steps of each kind, alternating (median), after 2 warm-up steps")
    ] = 5,
    peak_tflops: Annotated[
        float | None, typer.Option(help="Device peak TFLOP/s for MFU [default: known GPUs, 16-bit]")
    ] = None,
    generation: Annotated[bool, typer.Option(help="Also measure thoughtful vs plain decoding")] = True,
    memory: Annotated[bool, typer.Option(help="Estimate the peak memory of a step per device, term by term")] = False,
    devices: Annotated[int, typer.Option(help="--memory: torchrun processes (full fine-tuning shards: FSDP2)")] = 1,
    quantized: Annotated[bool, typer.Option(help="--memory: adapters on a 4-bit quantized base (QLoRA)")] = False,
    measure: Annotated[bool, typer.Option(help="--memory: also run the step here and measure what it adds")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here")] = None,
    **flags: Any,
) -> None:
    """Measure what a step costs and how fast generation runs.

    Side by side in one process, a Quiet-STaR step against ordinary LM steps over the same W tokens (the
    implementation's efficiency) and over the same text (the user's price); --memory: the peak memory of a step."""
    step_settings = {k: v for k, v in flags.items() if k in STEP_FLAGS and v is not None}
    overrides = {k: v for k, v in flags.items() if k in SHAPE_FLAGS and v is not None}
    if shape not in SHAPES:
        raise ValueError(f"unknown --shape {shape!r}: choose one of {', '.join(SHAPES)}")
    recipe = {k: v for k, v in flags.items() if k in RECIPE_FIELDS and v is not None}
    train = bench_train(recipe, **step_settings)
    base = BenchConfig(train, model, shape, overrides, device, steps, peak_tflops=peak_tflops)
    if memory:
        report = memory_report(base, (seq_len or [256])[0], devices, quantized, measure)
    else:
        report = timing_report(base, seq_len or [64, 128, 256], generation)
    if out is not None:
        from qstar.core.files import write_atomic

        write_atomic(out, json.dumps(report, indent=2))
        typer.echo(f"wrote {out}")


bench.__signature__ = inspect.signature(bench).replace(
    parameters=[
        *(p for p in inspect.signature(bench, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD),
        *field_flags(TrainConfig, "Step", only=STEP_FLAGS, defaults=BENCH_DEFAULTS),
        *(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(
                    None, help=f"config.json's {name} [default: the shape's]", rich_help_panel="Shape"
                ),
                annotation=Optional[int],  # noqa: UP045
            )
            for name in SHAPE_FLAGS
        ),
        *field_flags(Recipe, "Recipe", recipe="the default"),
    ]
)


def timing_report(base: BenchConfig, lengths: list[int], generation: bool) -> dict[str, Any]:
    """The training table (one row per L) and the generation one, printed as they are measured."""
    from qstar.core.bench import generation_speed, overhead

    recipe = base.train.make_recipe()
    title = (
        f"a Quiet-STaR step against LM steps ({base.train.backend}, {base.train.dtype}, k={recipe.thought_tokens}, "
        f"A={recipe.lookahead}, P={recipe.thoughts_per_position}, B={base.train.batch_size}, "
        f"{base.model or base.shape}); "
        "ratio: against an LM step over the same W tokens; price: over the same text"
    )
    columns = ["L", "mode", "W", "qstar s", "LM(W) s", "ratio", "LM(text) s", "price", "tok/s", "GB qstar/LM", "MFU"]
    columns.append("1st step s")  # with --compile: tracing and compiling
    results, rows = [], []
    for length in lengths:
        r = overhead(replace(base, train=replace(base.train, max_seq_length=length)))
        results.append(r)
        rows.append(
            [str(length), r["step_mode"], str(r["W"]), f"{r['qstar_step_s']:.3f}", f"{r['lm_step_s']:.3f}"]
            + [f"{r['ratio']:.2f}", f"{r['lm_text_step_s']:.3f}", f"{r['price']:.1f}", f"{r['qstar_tokens_per_s']:.0f}"]
            + [
                f"{r['qstar_memory_added_gb']:.2f}/{r['lm_memory_added_gb']:.2f}",
                "-" if r["mfu"] is None else f"{r['mfu']:.1%}",
                f"{r['qstar_first_step_s']:.1f}",
            ]
        )
    typer.echo(plain_table(title, columns, rows))
    report: dict[str, Any] = {"training": results}
    if generation:
        report["generation"] = speed = generation_speed(base)
        columns = ["batch", "plain", "with thoughts", "target 0.7 x plain / (k+3)", "met"]
        rows = [
            [str(g["batch"]), f"{g['plain_tokens_per_s']:.1f}", f"{g['thought_tokens_per_s']:.1f}"]
            + [f"{g['target_tokens_per_s']:.1f}", "yes" if g["meets_target"] else "NO"]
            for g in speed
        ]
        typer.echo(plain_table("\ngeneration (emitted tokens/s)", columns, rows))
    return report


def memory_report(base: BenchConfig, length: int, devices: int, quantized: bool, measure: bool) -> dict[str, Any]:
    """The estimate's terms and total per device, where it fits, and with --measure what the step adds here."""
    from qstar.core.bench import added_by_the_step, measure_memory, memory_step
    from qstar.core.memory import TABLE_MODELS, estimate, fitting

    cfg = replace(base, train=replace(base.train, max_seq_length=length), quantized=quantized)
    step = memory_step(cfg, devices)
    terms = estimate(cfg.model_config(), step)
    total = sum(terms.values())
    r = step.recipe
    title = (
        f"peak memory a device, estimated ({cfg.model or cfg.shape}, {step.fine_tune}, {devices} device(s), "
        f"{step.dtype}, L={length}, k={r.thought_tokens}, A={r.lookahead}, P={r.thoughts_per_position}, "
        f"B={step.batch}, {step.step_mode}{', grad checkpoint' if step.grad_checkpoint else ''})"
    )
    rows = [[term, f"{value / 1e9:.2f}"] for term, value in terms.items()] + [["total", f"{total / 1e9:.2f}"]]
    typer.echo(plain_table(title, ["term", "GB"], rows))
    fits = fitting(total, step)
    typer.echo(f"fits: {', '.join(fits) or 'none of the devices in the table'}")
    report: dict[str, Any] = {"terms": terms, "total": total, "fits": fits}
    if measure:
        if cfg.model is None and cfg.shape in TABLE_MODELS:
            raise ValueError(
                f"--measure runs the step here: --shape {cfg.shape} is estimated only (its random model would not fit "
                "a CPU test): pass a smaller --shape, or --model DIR"
            )
        added, measured = added_by_the_step(terms), measure_memory(cfg)
        typer.echo(f"measured here: the step adds {measured:.3f} GB; estimated {added:.3f} GB")
        report |= {"measured_added_gb": measured, "estimated_added_gb": added}
    return report
