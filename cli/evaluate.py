"""`qstar eval gsm8k|csqa`: zero-shot chain of thought under a protocol, with or without thoughts; resumable."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from qstar.cli.errors import user_errors
from qstar.cli.options import ModelChoice, model_options


@user_errors
@model_options
def evaluate(
    task: Annotated[str, typer.Argument(help="gsm8k or csqa")],
    model: ModelChoice,
    data: Annotated[
        str | None, typer.Option(help="Local JSONL (the task's own format) or a hub dataset id [default: the task's]")
    ] = None,
    protocol: Annotated[
        str,
        typer.Option(
            help="qstar or paper (the authors' zero-shotcot-eval.py); for the harness: python -m qstar.lm_eval"
        ),
    ] = "qstar",
    limit: Annotated[
        int | None, typer.Option(help="Only the first N questions (after the protocol's shuffle) [paper: 128]")
    ] = None,
    votes: Annotated[int | None, typer.Option(help="Samples per question; > 1 reports cot-maj@K [paper: 8]")] = None,
    thoughts: Annotated[bool, typer.Option(help="Think before every token")] = True,
    batch_size: Annotated[int, typer.Option(help="Samples generated together")] = 8,
    max_tokens: Annotated[int | None, typer.Option(help="Reasoning tokens at most [qstar: 256; paper: 385]")] = None,
    answer_tokens: Annotated[int | None, typer.Option(help="Answer tokens at most [qstar: 16; paper: 13]")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (0 = greedy) [paper: 0.9]")] = None,
    teacher_forced: Annotated[bool, typer.Option(help="Also the paper's teacher-forced answer probability")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the sampling noise (every question draws its own)")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(help="Directory of questions.jsonl and results.json [runs/eval/MODEL/TASK-PROTOCOL-THOUGHTS]"),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Start over in --out instead of resuming it")] = False,
) -> None:
    """Evaluate as the paper does: `Q: ...\\nA: Let's think step by step.`, generate, append the answer trigger, read
    the first number (or letter). An interrupted run continues from out/questions.jsonl; the same command gives the
    same answers."""
    from qstar.core.eval.run import EvalSettings, evaluate_task
    from qstar.core.eval.tasks import get_task, load_examples

    spec = get_task(task)
    settings = EvalSettings(
        protocol=protocol,
        votes=votes,
        temperature=temperature,
        max_tokens=max_tokens,
        answer_tokens=answer_tokens,
        limit=limit,
        thoughts=thoughts,
        batch_size=batch_size,
        seed=seed,
        teacher_forced=teacher_forced,
    )
    name = re.sub(r"[^\w.-]+", "-", model.path).strip("-")  # every model its own directory
    out = out or Path("runs") / "eval" / name / f"{task}-{protocol}-{'thoughts' if thoughts else 'no-thoughts'}"
    examples = load_examples(spec, data)
    m = model.load()
    console = Console(stderr=True)
    chosen = len(examples) if settings.limit is None else min(settings.limit, len(examples))
    columns = [
        TextColumn(f"[bold]{task}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as progress:
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
