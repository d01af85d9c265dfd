"""`qstar inspect`: where thinking helps, token by token, as a self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console

from qstar.cli.errors import user_errors
from qstar.cli.options import AdapterPath, recipe_options


@user_errors
@recipe_options
def inspect_text(
    model: Annotated[str, typer.Option(help="qstar checkpoint (or any checkpoint qstar.load takes)")],
    text: Annotated[Path, typer.Option(help="Text file to read")],
    out: Annotated[Path, typer.Option(help="HTML report to write")] = Path("report.html"),
    seed: Annotated[int, typer.Option(help="Seed of the thoughts")] = 0,
    backend: Annotated[str, typer.Option(help="auto, torch or mlx")] = "auto",
    adapter_path: AdapterPath = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or float64 (or fp32, bf16, fp16)")] = "float32",
    recipe_overrides: dict[str, Any] | None = None,
) -> None:
    """For every token: log-prob without thought vs after the thought sampled before it, the thought on hover."""
    import qstar
    from qstar.core.files import write_atomic
    from qstar.core.report import render_html, summary_line

    if not text.is_file():
        raise FileNotFoundError(f"{text} not found: pass a text file with --text")
    content = text.read_text()
    if not content.strip():
        raise ValueError(f"{text} is empty: give it some text to inspect")
    m = qstar.load(model, backend=backend, dtype=dtype, adapter_path=adapter_path, **(recipe_overrides or {}))
    if m.tokenizer is None:
        raise ValueError(f"{model} has no tokenizer files: inspect needs text in and out")
    ids = m.tokenizer(content)["input_ids"]
    m.config.check_length(len(ids))
    plain, mixed, thoughts = m.next_token_logits(np.array([ids]), seed=seed)

    def logprob(logits: np.ndarray) -> list[float]:
        z = logits[0, :-1].astype(np.float64)
        top = z.max(-1, keepdims=True)
        lse = (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))[:, 0]
        return [float("nan")] + (z[np.arange(len(ids) - 1), ids[1:]] - lse).tolist()

    tokens = [m.tokenizer.decode([t]) for t in ids]
    thought_text = [""] + [m.tokenizer.decode(t, skip_special_tokens=True) for t in thoughts[0, :-1]]
    base, thoughtful = logprob(plain), logprob(mixed)
    write_atomic(out, render_html(tokens, base, thoughtful, thought_text, title=f"qstar inspect: {text.name}"))
    console = Console(stderr=True)
    console.print(summary_line(tokens, base, thoughtful))
    console.print(f"wrote {out}")
