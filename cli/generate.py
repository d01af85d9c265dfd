"""`qstar generate`: continue a prompt, thinking before every token; --show-thoughts prints each thought."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from qstar.cli.errors import user_errors
from qstar.cli.options import ModelChoice, model_options, settings_options
from qstar.core.console import console
from qstar.core.generate import Sampling
from qstar.core.model import Completion

THOUGHT_OPEN, THOUGHT_CLOSE = "\x02", "\x03"
"""Around each thought when --show-thoughts writes to a pipe or file: ASCII start/end of text, which a tokenizer's
text never holds, so a program can split them off."""


@user_errors
@model_options
@settings_options(Sampling, "sampling", "Sampling", skip=("logit_bias",))  # a mapping: the API takes it
def generate(
    model: ModelChoice,
    sampling: Sampling,
    prompt: Annotated[str, typer.Option(help="Text to continue; - reads it from standard input")],
    show_thoughts: Annotated[
        bool,
        typer.Option(help="Print the thought before each token: dimmed on a terminal, else between \\x02 and \\x03"),
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Write one JSON object: text, tokens with their thoughts, stop, speeds")
    ] = False,
    chat_template: Annotated[bool, typer.Option(help="Wrap the prompt in the tokenizer's chat template")] = False,
    system_prompt: Annotated[
        str | None, typer.Option(help="System message for the chat template (implies --chat-template)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling noise")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this text (repeatable)")] = None,
) -> None:
    """Continue a prompt, thinking before every token.

    KV cache: each thought is computed on top of the cached prefix, then dropped."""

    err = console()
    text = sys.stdin.read() if prompt == "-" else prompt
    if sampling.temperature == 0 and (sampling.top_k is not None or sampling.top_p is not None):
        err.print("warning: greedy decoding (--temperature 0) ignores --top-k and --top-p: pass --temperature > 0")
    m = model.load()
    if m.tokenizer is None:
        raise ValueError(
            f"{model.path} has no tokenizer files, so it cannot read --prompt: convert a checkpoint that has them"
        )
    prompt_ids: str | list[int] = text
    if chat_template or system_prompt is not None:
        if not m.tokenizer.chat_template:
            raise ValueError(f"{model.path}'s tokenizer has no chat template: drop --chat-template and --system-prompt")
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        prompt_ids = m.chat_ids([*messages, {"role": "user", "content": text}])
        text = m.decode(prompt_ids, special=True)
    prompts = [prompt_ids] if isinstance(prompt_ids, list) else prompt_ids
    result = m.generate(prompts, **asdict(sampling), seed=seed, stop=stop or ())[0]
    pieces = token_pieces(m.tokenizer, result.tokens, result.text)
    if json_output:
        record = {
            "prompt": text,
            "text": result.text,
            "tokens": [{"text": p, "thought": t} for p, t in zip(pieces, result.thoughts, strict=False)],
            "stop": result.stop,
            "prompt_tokens": result.prompt_tokens,
            "prompt_tps": result.prompt_tps,
            "generation_tps": result.generation_tps,
            "peak_memory_gb": result.peak_memory_gb,
        }
        typer.echo(json.dumps(record, ensure_ascii=False))
    elif show_thoughts and sampling.thoughts:
        show_with_thoughts(text, pieces, result.thoughts, err)
    else:
        typer.echo(text + result.text)
    summarize(result, err)


def show_with_thoughts(text: str, pieces: list[str], thoughts: list[str], err: Console) -> None:
    """The text with each token's thought before it: dimmed in <> on a terminal, else between \\x02 and \\x03."""
    out = console(stderr=False)
    pairs = list(zip(pieces, thoughts, strict=False))
    if out.is_terminal:
        out.print(escape(text) + "".join(f"[dim]<{escape(t)}>[/dim]{escape(p)}" for p, t in pairs))
        return
    typer.echo(text + "".join(f"{THOUGHT_OPEN}{t}{THOUGHT_CLOSE}{p}" for p, t in pairs))
    err.print(
        "note: each thought stands between \\x02 and \\x03 (ASCII STX, ETX) before its token; --json gives fields"
    )


ENDED = {
    "eos": "the model's end-of-text token",
    "stop": "a --stop text",
    "max_tokens": "--max-tokens",
    "context": "the model's context",
}


def summarize(result: Completion, err: Console) -> None:
    """Speeds, memory and why the generation ended, as mlx_lm.generate prints them (on standard error)."""
    if result.stop == "eos" and len(result.tokens) == 1:
        err.print("note: the model ended the text at once: its first token was its end-of-text token")
    err.print(f"Prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.1f} tokens-per-sec")
    err.print(
        f"Generation: {len(result.tokens)} tokens, {result.generation_tps:.1f} tokens-per-sec "
        f"(ended by {ENDED[result.stop]})"
    )
    err.print(f"Peak memory: {result.peak_memory_gb:.3f} GB")


def token_pieces(tokenizer: Any, tokens: list[int], text: str) -> list[str]:
    """The text each emitted token adds (decoding token by token would split multi-byte characters)."""
    pieces, shown = [], ""
    for i in range(len(tokens)):
        now = tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)[: len(text)]
        pieces.append(now[len(shown) :])
        shown = now
    return pieces
