"""`qstar eval gsm8k|csqa`: zero-shot chain of thought under a protocol, with or without thoughts; resumable."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from qstar.cli.errors import user_errors
from qstar.cli.options import ModelChoice, model_options, settings_options
from qstar.core.console import console as rich_console
from qstar.core.eval.run import EvalSettings


@user_errors
@model_options
@settings_options(EvalSettings, "settings", "Evaluation")
def evaluate(
    task: Annotated[str, typer.Argument(help="gsm8k or csqa")],
    model: ModelChoice,
    settings: EvalSettings,
    data: Annotated[
        str | None, typer.Option(help="Local JSONL (the task's own format) or a hub dataset id [default: the task's]")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Directory of questions.jsonl and results.json [runs/eval/MODEL/TASK-PROTOCOL-THOUGHTS]"),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Start over in --out instead of resuming it")] = False,
) -> None:
    """Score zero-shot chain of thought on GSM8K or CommonsenseQA.

    As the paper does: `Q: ...\\nA: Let's think step by step.`, generate, append the answer trigger, read the first
    number (or letter). An interrupted run continues from out/questions.jsonl; the same command gives the same
    answers."""
    from qstar.core.eval.run import evaluate_task
    from qstar.core.eval.tasks import get_task, load_examples

    spec = get_task(task)
    protocol, thoughts = settings.protocol, settings.thoughts
    name = re.sub(r"[^\w.-]+", "-", model.path).strip("-")  # every model its own directory
    out = out or Path("runs") / "eval" / name / f"{task}-{protocol}-{'thoughts' if thoughts else 'no-thoughts'}"
    examples = load_examples(spec, data)
    m = model.load()
    console = rich_console()
    chosen = len(examples) if settings.limit is None else min(settings.limit, len(examples))
    columns = [
        TextColumn(f"[bold]{task}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:  # a file gets no bar
        bar = progress.add_task("", total=chosen)
        result = evaluate_task(
            m,
            spec,
            examples,
            out,
            settings,
            model.path,
            data=data or spec.hub_id,
            overwrite=overwrite,
            on_record=lambda record, accuracy: progress.update(bar, advance=1, description=str(accuracy)),
        )
    lines = [f"{name} = {value:.4f}" for name, value in result.metrics.items()]
    console.print(f"{task} ({protocol}): n={result.n}, thoughts={'on' if thoughts else 'off'}: " + ", ".join(lines))
    stops = ", ".join(f"{reason} {n}" for reason, n in result.counts["stops"].items())
    console.print(f"reasoning ended by: {stops}; prompts cut to the context: {result.counts['truncated_prompts']}")
    console.print(f"wrote {out / 'results.json'} and {out / 'questions.jsonl'}")
