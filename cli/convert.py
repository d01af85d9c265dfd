"""`qstar convert SRC DST`: an HF or authors' checkpoint (dir or hub id) -> a qstar checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from qstar.cli.errors import user_errors


@user_errors
def convert(
    src: Annotated[
        str, typer.Argument(help="HF checkpoint directory or hub id (owner/name), or an authors' checkpoint")
    ],
    dst: Annotated[str, typer.Argument(help="Output directory (must not exist)")],
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16, float16 or float64 (default: the source's)")
    ] = None,
    recipe: Annotated[str, typer.Option(help="Recipe preset saved with the checkpoint: default or paper")] = "default",
    backend: Annotated[str, typer.Option(help="auto, torch or mlx (only used to read the weights)")] = "auto",
) -> None:
    """Convert a checkpoint: base weights under their HF names, <start>/<end> thought tokens initialised from the
    recipe's init_token, a mixing head that starts the model exactly as the base LM, tokenizer with the two tokens."""
    import qstar

    console = Console(stderr=True)
    with console.status(f"converting {src}"):
        model = qstar.convert(src, dst, dtype=dtype, recipe=recipe, backend=backend)
    info = model.info
    console.print(
        f"wrote {dst}: {info.config.model_type}, {model.dtype}, recipe {recipe}, "
        f"<start>={info.start_id} <end>={info.end_id}"
    )
