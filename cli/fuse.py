"""`qstar fuse`: merge an adapter into its base model, a plain qstar checkpoint (as `mlx_lm.fuse`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qstar.cli.errors import user_errors
from qstar.cli.options import Backend, SourceDtype
from qstar.core.console import console as rich_console


@user_errors
def fuse(
    adapter_path: Annotated[str, typer.Option(help="The adapter directory (a lora/dora run's checkpoint)")],
    out: Annotated[str, typer.Option(help="Output directory of the fused checkpoint (must not exist)")],
    model: Annotated[str | None, typer.Option(help="The base model [default: the one the adapter records]")] = None,
    dtype: SourceDtype = None,
    backend: Backend = "auto",
) -> None:
    """Merge a LoRA or DoRA adapter into its base model.

    W + scale * (lora_a @ lora_b)^T, DoRA rescaled to its magnitude, saved as a qstar checkpoint with the adapter's
    thought vectors and mixing head: every command takes it, no adapter."""
    import qstar
    from qstar.core import lora
    from qstar.core.checkpoint import source_dtype
    from qstar.core.hub import resolve
    from qstar.core.loading import base_model

    base = model or base_model(Path(adapter_path), lora.read_adapter_config(Path(adapter_path)))
    console = rich_console()
    with console.status(f"fusing {adapter_path} into {base}"):
        m = qstar.load(base, backend=backend, dtype=dtype or source_dtype(resolve(base)), adapter_path=adapter_path)
        m.fuse()
        m.save(out)
    console.print(f"wrote {out}: {base} with {adapter_path} merged, {m.dtype}")
