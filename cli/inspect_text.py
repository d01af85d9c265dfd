"""`qstar inspect`: where thinking helps, token by token, as a self-contained HTML page, and the held-out NLL with vs
without thoughts summed up (qstar/core/heldout.py), on any text, without training."""

from __future__ import annotations

import json
from math import nan
from pathlib import Path
from typing import Annotated

import typer

from qstar.cli.errors import user_errors
from qstar.cli.options import ModelChoice, model_options
from qstar.core.console import console as rich_console
from qstar.core.heldout import Scored
from qstar.core.model import QStarModel


@user_errors
@model_options
def inspect_text(
    model: ModelChoice,
    text: Annotated[Path, typer.Option(help="Text to read: a .txt (documents separated by blank lines) or .jsonl")],
    text_field: Annotated[str, typer.Option(help=".jsonl: the field(s) holding the text, comma-separated")] = "text",
    limit: Annotated[int | None, typer.Option(help="Only the first N documents")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Keep the last N tokens of a longer document")] = None,
    out: Annotated[Path | None, typer.Option(help="HTML page to write [default: report.html]")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the summary (and per-document NLL) here")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(help="Rank the hardest tokens by this model's NLL (the untrained one) [default: --model]"),
    ] = None,
    hardest: Annotated[float, typer.Option(help="Share of the tokens counted as the hardest")] = 0.1,
    control: Annotated[
        str,
        typer.Option(
            help="none, or other thoughts through the same computation: random, fixed, shuffled (another document's), "
            "perturbed or perturbed_last (its own, first or last number changed)"
        ),
    ] = "none",
    seed: Annotated[int, typer.Option(help="Seed of the thoughts (document n draws with seed + n)")] = 0,
) -> None:
    """Show where thinking helps, token by token, as an HTML page.

    For every token: log-prob without thought vs after the thought sampled before it, the thought on hover; the NLL
    over every token, the hard ones the text marks (the synthetic corpus's answers, GSM8K's final answers) and the
    hardest share by NLL without thoughts."""
    from itertools import islice

    from qstar.core import heldout
    from qstar.core.data import open_documents
    from qstar.core.files import write_atomic
    from qstar.core.inspect_report import render_html, summary_line

    if not text.is_file():
        raise FileNotFoundError(f"{text} not found: pass a .txt or .jsonl file with --text")
    documents = list(islice(open_documents(str(text), text_field), limit))
    m = model.load()
    scores = heldout.score(m, documents, seed, control, max_tokens)
    ranked = None
    if reference is not None:
        ranked = heldout.plain_nll(ModelChoice(reference, model.backend, model.dtype).load(), documents, max_tokens)
    summary = heldout.summary(scores, ranked, hardest)
    console = rich_console()
    tokens, base, talk, thoughts, hard = page_rows(m, scores)
    if out is not None or json_out is None:
        page = render_html(tokens, base, talk, thoughts, title=f"qstar inspect: {text.name}", hard=hard)
        write_atomic(out or Path("report.html"), page)
        console.print(f"wrote {out or 'report.html'}")
    console.print(summary_line(tokens, base, talk))
    views = {
        "all": "all tokens",
        "hard": "hard tokens the text marks",
        "hardest": f"hardest {hardest:.0%} by {reference or 'this model'}'s NLL without thoughts",
    }
    for view, label in views.items():
        if view in summary:
            v = summary[view]
            console.print(
                f"{label} ({v['tokens']}): NLL {v['nll_base']:.4f} -> {v['nll_talk']:.4f} with thoughts "
                f"(gain {v['gain']:+.4f})"
            )
    if json_out is not None:
        documents_nll = [{"nll_base": s.nll_base.tolist(), "nll_talk": s.nll_talk.tolist()} for s in scores]
        record = {
            "model": model.path,
            "text": str(text),
            "control": control,
            "summary": summary,
            "documents": documents_nll,
        }
        write_atomic(json_out, json.dumps(record))
        console.print(f"wrote {json_out}")


def page_rows(m: QStarModel, scores: list[Scored]) -> tuple[list[str], list[float], list[float], list[str], list[bool]]:
    """The page's rows: every token of every document (an unscored line between documents), its log-prob without and
    with the thought before it (the first token of a document has none), that thought, whether it is hard."""
    tok = m.tokenizer
    tokens: list[str] = []
    base: list[float] = []
    talk: list[float] = []
    thoughts: list[str] = []
    hard: list[bool] = []
    for n, s in enumerate(scores):
        first = [nan] if n == 0 else [nan, nan]
        tokens += ([] if n == 0 else ["\n"]) + [tok.decode([t]) for t in s.ids]
        base += first + (-s.nll_base).tolist()
        talk += first + (-s.nll_talk).tolist()
        thoughts += [""] * len(first) + [tok.decode(t, skip_special_tokens=True) for t in s.thoughts]
        hard += [False] * len(first) + s.hard.tolist()
    return tokens, base, talk, thoughts, hard
