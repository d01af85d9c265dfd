"""`qstar eval gsm8k|csqa`: zero-shot chain of thought with or without thoughts; resumable; results JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from qstar.cli.errors import user_errors


@user_errors
def evaluate(
    task: Annotated[str, typer.Argument(help="gsm8k or csqa")],
    model: Annotated[str, typer.Option(help="qstar checkpoint (or any checkpoint qstar.load takes)")],
    data: Annotated[str | None, typer.Option(help="Local JSONL (the task's own format) or a hub dataset id")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N questions")] = None,
    votes: Annotated[int, typer.Option(help="Samples per question; > 1 reports cot-maj@K")] = 1,
    thoughts: Annotated[bool, typer.Option(help="Think before every token")] = True,
    batch_size: Annotated[int, typer.Option(help="Questions generated together")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Reasoning tokens at most")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of the reasoning (0 = greedy)")] = 0.0,
    teacher_forced: Annotated[bool, typer.Option(help="Also the paper's teacher-forced answer probability")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the sampling noise")] = 0,
    out: Annotated[Path, typer.Option(help="Directory of questions.jsonl and results.json")] = Path("eval-out"),
    backend: Annotated[str, typer.Option(help="auto, torch or mlx")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or float64")] = "float32",
) -> None:
    """Evaluate as the paper: `Q: ...\\nA: Let's think step by step.`, generate, append the answer trigger, read the
    first number (or letter). An interrupted run continues from out/questions.jsonl."""
    import qstar
    from qstar.core.eval.run import EvalSettings
    from qstar.core.eval.run import evaluate as run
    from qstar.core.eval.tasks import get_task, load_examples

    spec = get_task(task)
    settings = EvalSettings(
        votes=votes,
        thoughts=thoughts,
        batch_size=batch_size,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        teacher_forced=teacher_forced,
    )
    examples = load_examples(spec, data, limit)
    m = qstar.load(model, backend=backend, dtype=dtype)
    console = Console(stderr=True)
    columns = [
        TextColumn(f"[bold]{task}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("", total=len(examples))
        progress.update(bar, completed=0)
        result = run(
            m,
            spec,
            examples,
            out,
            settings,
            model,
            on_record=lambda record, accuracy: progress.update(bar, advance=1, description=str(accuracy)),
        )
    lines = [f"{name} = {value:.4f}" for name, value in result.metrics.items()]
    console.print(f"{task}: n={result.n}, thoughts={'on' if thoughts else 'off'}: " + ", ".join(lines))
    console.print(f"wrote {out / 'results.json'} and {out / 'questions.jsonl'}")
