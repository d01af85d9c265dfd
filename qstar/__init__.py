"""qstar: Quiet-STaR training and inference for Llama-family models, on PyTorch or MLX."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from qstar import backends
from qstar.backends import available as available_backend
from qstar.core import backend as _backend
from qstar.core.api import LossOutput, QStarModel
from qstar.core.recipe import PRESETS, Recipe, make_recipe

__all__ = ["load", "convert", "available_backend", "Recipe", "make_recipe", "PRESETS", "QStarModel", "LossOutput"]
__version__ = "0.1.0"


def load(
    path: str | Path,
    backend: str = "auto",
    dtype: str = "float32",
    recipe: str | Recipe | None = None,
    device: str | None = None,
    step_mode: str | None = None,
    adapter_path: str | Path | None = None,
    **recipe_overrides: Any,
) -> QStarModel:
    """Load a qstar, authors' or plain Hugging Face checkpoint (local directory or hub id), or an adapter directory
    (its base model with the adapter applied).

    `backend`: auto (mlx on Apple silicon when installed, else torch), torch or mlx.
    `recipe`: a preset name or Recipe; None uses the recipe saved in a qstar checkpoint, else "default".
    `step_mode`: how training steps score sampled thoughts, one-pass or two-pass (the same numbers); None: the faster
    one where the model computes.
    `adapter_path`: an adapter (lora/dora) to apply to the model at `path`.
    `recipe_overrides`: recipe field values, e.g. thought_tokens=3.
    """
    return _backend.load(
        backends.get(backend), path, dtype, recipe, device, step_mode, adapter_path, **recipe_overrides
    )


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    recipe: str | None = None,
    backend: str = "auto",
    gguf_file: str | None = None,
    quantize: tuple[int, int] | None = None,
    **recipe_overrides: Any,
) -> QStarModel:
    """Write a qstar checkpoint at `dst` from an HF or authors' checkpoint (local or hub id), a GGUF file (or a
    directory and `gguf_file`), or a qstar one.

    `dtype` None keeps the checkpoint's own dtype where it has one (else float32). `recipe` None keeps the
    checkpoint's own recipe (a qstar or authors' one), else "default"; `recipe_overrides` change single fields.
    `quantize` (bits, group_size): quantize the base weights (MLX, mlx-lm's format: a QLoRA base).
    Nothing is left at `dst` if anything fails.
    """
    import tempfile
    from contextlib import nullcontext

    from qstar.core.checkpoint import source_dtype
    from qstar.core.files import remove_orphans
    from qstar.core.hub import resolve
    from qstar.gguf import gguf_source, gguf_to_hf

    if Path(dst).exists():
        raise FileExistsError(f"{dst} already exists: choose a new output directory or remove it first")
    remove_orphans(Path(dst).parent, lambda message: print(message, file=sys.stderr))  # what killed converts left
    gguf = gguf_source(src, gguf_file)
    with tempfile.TemporaryDirectory(prefix="qstar-gguf-") if gguf else nullcontext("") as scratch:
        local = gguf_to_hf(*gguf, Path(scratch)) if gguf else resolve(src)
        model = load(local, backend=backend, dtype=dtype or source_dtype(local), recipe=recipe, **recipe_overrides)
        if quantize is not None:
            model.quantize(*quantize)

        def generation_config(tmp: Path) -> None:  # eos ids and sampling defaults travel with the checkpoint
            if (local / "generation_config.json").is_file():
                shutil.copyfile(local / "generation_config.json", tmp / "generation_config.json")

        model.save(dst, extra=generation_config)
    return model
