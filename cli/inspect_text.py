"""`qstar inspect`: where thinking helps, token by token, as a self-contained HTML page."""

from __future__ import annotations

from math import nan
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from qstar.cli.errors import user_errors
from qstar.cli.options import ModelChoice, model_options


@user_errors
@model_options
def inspect_text(
    model: ModelChoice,
    text: Annotated[Path, typer.Option(help="Text file to read")],
    out: Annotated[Path, typer.Option(help="HTML report to write")] = Path("report.html"),
    seed: Annotated[int, typer.Option(help="Seed of the thoughts")] = 0,
) -> None:
    """For every token: log-prob without thought vs after the thought sampled before it, the thought on hover. Blank
    lines separate documents, each scored on its own (as `qstar train` reads a .txt); the hard tokens of synthetic
    documents (their answers) are scored apart."""
    from qstar.core import synthetic
    from qstar.core.data import txt_documents
    from qstar.core.files import write_atomic
    from qstar.core.inspect_report import hard_line, render_html, summary_line

    if not text.is_file():
        raise FileNotFoundError(f"{text} not found: pass a text file with --text")
    content = text.read_text()
    if not content.strip():
        raise ValueError(f"{text} is empty: give it some text to inspect")

    def logprob(logits: np.ndarray, ids: list[int]) -> list[float]:
        z = logits[0, :-1].astype(np.float64)
        top = z.max(-1, keepdims=True)
        lse = (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))[:, 0]
        return [nan] + (z[np.arange(len(ids) - 1), ids[1:]] - lse).tolist()

    m = model.load()
    if m.tokenizer is None:
        raise ValueError(f"{model.path} has no tokenizer files: inspect needs text in and out")
    tokens: list[str] = []
    base: list[float] = []
    thoughtful: list[float] = []
    thought_text: list[str] = []
    hard: list[bool] = []
    for n, document in enumerate(txt_documents(text)):  # blank lines separate documents, as `qstar train` reads
        if n:  # an unscored separator on the page
            tokens.append("\n")
            base.append(nan)
            thoughtful.append(nan)
            thought_text.append("")
            hard.append(False)
        encoded = m.tokenizer(document, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        m.config.check_length(len(ids))
        chars = synthetic.hard_mask(document)  # the answers of synthetic documents, if the text holds any
        hard += [any(chars[a:b]) for a, b in encoded["offset_mapping"]]
        plain, mixed, thoughts = m.next_token_logits(np.array([ids]), seed=seed + n)
        tokens += [m.tokenizer.decode([t]) for t in ids]
        thought_text += [""] + [m.tokenizer.decode(t, skip_special_tokens=True) for t in thoughts[0, :-1]]
        base += logprob(plain, ids)
        thoughtful += logprob(mixed, ids)
    page = render_html(tokens, base, thoughtful, thought_text, title=f"qstar inspect: {text.name}", hard=hard)
    write_atomic(out, page)
    console = Console(stderr=True)
    console.print(summary_line(tokens, base, thoughtful))
    line = hard_line(base, thoughtful, hard)
    if line is not None:
        console.print(line)
    console.print(f"wrote {out}")
