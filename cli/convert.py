"""`qstar convert SRC DST`: an HF, GGUF or authors' checkpoint (directory, file or hub id) -> a qstar checkpoint."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from qstar.cli.errors import user_errors
from qstar.cli.options import Backend, SourceDtype, recipe_options
from qstar.core.console import console as rich_console
from qstar.core.recipe import PRESETS


@user_errors
@recipe_options
def convert(
    src: Annotated[
        str,
        typer.Argument(
            help="HF checkpoint directory or hub id (owner/name), a .gguf file, an authors' or qstar checkpoint"
        ),
    ],
    dst: Annotated[str, typer.Argument(help="Output directory (must not exist)")],
    dtype: SourceDtype = None,
    recipe: Annotated[
        str | None,
        typer.Option(help=f"Recipe preset: {', '.join(PRESETS)} [default: the checkpoint's own, else default]"),
    ] = None,
    gguf_file: Annotated[str | None, typer.Option(help="The .gguf file inside SRC, a directory")] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="A directory or hub id whose tokenizer the checkpoint takes (OpenELM ships none)"),
    ] = None,
    backend: Backend = "auto",
    quantize: Annotated[
        bool,
        typer.Option(
            help="Quantize the base weights (MLX, mlx-lm's format) for QLoRA: train it with --fine-tune-type lora"
        ),
    ] = False,
    q_bits: Annotated[int, typer.Option(help="Bits per quantized weight (with --quantize)")] = 4,
    q_group_size: Annotated[int, typer.Option(help="Weights per quantization group (with --quantize)")] = 64,
    recipe_overrides: dict[str, Any] | None = None,
) -> None:
    """Convert an HF, GGUF or authors' checkpoint into a qstar one.

    Base weights under their HF names, <start>/<end> thought tokens initialised from the recipe's init_token, a mixing
    head that starts the model exactly as the base LM, the tokenizer with the two tokens."""
    import qstar

    console = rich_console()
    with console.status(f"converting {src}"):
        model = qstar.convert(
            src,
            dst,
            dtype=dtype,
            recipe=recipe,
            backend=backend,
            gguf_file=gguf_file,
            tokenizer=tokenizer,
            quantize=(q_bits, q_group_size) if quantize else None,
            **(recipe_overrides or {}),
        )
    info, r = model.info, model.recipe
    console.print(
        f"wrote {dst}: {info.config.model_type}, {model.dtype}"
        + (f" quantized to {q_bits} bits (groups of {q_group_size})" if quantize else "")
        + f", {r.thought_tokens} thought tokens, lookahead "
        f"{r.lookahead}, <start>={info.start_id} <end>={info.end_id}"
    )
    if model.tokenizer is None:
        console.print(
            f"warning: {src} has no tokenizer files, so {dst} has none either: qstar generate, eval, inspect and train "
            "need them; copy the source model's tokenizer files (tokenizer.json, ...) into both and convert again"
        )
