"""`qstar generate`: continue a prompt, thinking before every token; --show-thoughts prints each thought dimmed."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from qstar.cli.errors import user_errors


@user_errors
def generate(
    model: Annotated[str, typer.Option(help="qstar checkpoint (or any checkpoint qstar.load takes)")],
    prompt: Annotated[str, typer.Option(help="Text to continue")],
    thoughts: Annotated[bool, typer.Option(help="Think before every token")] = True,
    show_thoughts: Annotated[bool, typer.Option(help="Print the thought before each token, dimmed")] = False,
    max_tokens: Annotated[int, typer.Option(help="Tokens to emit at most")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of emitted tokens (0 = greedy)")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely tokens")] = None,
    top_p: Annotated[float | None, typer.Option(help="Sample among the smallest set of probability >= p")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling noise")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this text (repeatable)")] = None,
    backend: Annotated[str, typer.Option(help="auto, torch or mlx")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or float64")] = "float32",
) -> None:
    """Generate text with thoughts (KV cache; each thought is computed on top of the cached prefix, then dropped)."""
    import qstar

    m = qstar.load(model, backend=backend, dtype=dtype)
    result = m.generate(
        prompt,
        max_tokens=max_tokens,
        thoughts=thoughts,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stop or (),
    )[0]
    console = Console(highlight=False)
    if not show_thoughts:
        console.print(escape(prompt + result.text), soft_wrap=True)
        return
    pieces, shown = [escape(prompt)], ""
    for i, thought in enumerate(result.thoughts):
        text = m.tokenizer.decode(result.tokens[: i + 1], skip_special_tokens=True)[: len(result.text)]
        piece, shown = text[len(shown) :], text
        if piece:
            pieces.append((f"[dim]<{escape(thought)}>[/dim]" if thoughts else "") + escape(piece))
    console.print("".join(pieces), soft_wrap=True)
