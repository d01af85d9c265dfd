"""qstar: Quiet-STaR training and inference for Llama-family models, on PyTorch or MLX."""

from __future__ import annotations

from typing import Any

from qstar.core.api import LossOutput, QStarModel, check_dtype
from qstar.core.hub import resolve
from qstar.core.recipe import PRESETS, Recipe, make_recipe

__all__ = ["load", "convert", "available_backend", "Recipe", "make_recipe", "PRESETS", "QStarModel", "LossOutput"]
__version__ = "0.1.0"

BACKENDS = ("torch", "mlx")


def available_backend(preferred: str = "auto") -> str:
    """ "auto" picks mlx on Apple silicon when installed, else torch; an explicit name must be importable."""
    import importlib.util
    import platform

    installed = {b: importlib.util.find_spec(b) is not None for b in BACKENDS}
    if preferred == "auto":
        on_mac = platform.system() == "Darwin" and platform.machine() == "arm64"
        order = ("mlx", "torch") if on_mac else ("torch", "mlx")
        for name in order:
            if installed[name]:
                return name
        raise RuntimeError("neither torch nor mlx is installed: pip install 'qstar[torch]' or 'qstar[mlx]'")
    if preferred not in BACKENDS:
        raise ValueError(f"unknown backend {preferred!r}: choose auto, {' or '.join(BACKENDS)}")
    if not installed[preferred]:
        raise RuntimeError(f"the {preferred} backend is not installed: pip install 'qstar[{preferred}]'")
    return preferred


def load(
    path: str,
    backend: str = "torch",
    dtype: str = "float32",
    recipe: str | Recipe | None = None,
    device: str | None = None,
    **recipe_overrides: Any,
) -> QStarModel:
    """Load a qstar, authors' or plain Hugging Face checkpoint (local directory or hub id).

    `recipe`: a preset name or Recipe; None uses the recipe saved in a qstar checkpoint, else "default".
    `recipe_overrides`: recipe field values, e.g. thought_tokens=3.
    """
    from qstar.core import checkpoint

    check_dtype(dtype)
    backend = available_backend(backend)
    info = checkpoint.inspect(resolve(path))
    chosen = make_recipe(recipe if recipe is not None else (info.saved_recipe or "default"), **recipe_overrides)
    if backend == "torch":
        from qstar import torch_backend

        return torch_backend.load(info, chosen, dtype, device)
    from qstar import mlx_backend

    return mlx_backend.load(info, chosen, dtype, device)


def convert(
    src: str,
    dst: str,
    dtype: str | None = None,
    recipe: str | None = None,
    backend: str = "auto",
    **recipe_overrides: Any,
) -> QStarModel:
    """Write a qstar checkpoint at `dst` from an HF or authors' checkpoint (local or hub id) or a qstar one.

    `dtype` None keeps the checkpoint's own dtype where it has one (else float32). Nothing is left at
    `dst` if anything fails.
    """
    from pathlib import Path

    from qstar.core.checkpoint import source_dtype

    if Path(dst).exists():
        raise FileExistsError(f"{dst} already exists: choose a new output directory or remove it first")
    local = resolve(src)
    model = load(str(local), backend=backend, dtype=dtype or source_dtype(local), recipe=recipe, **recipe_overrides)
    model.save(dst)
    return model
