"""qstar: Quiet-STaR training and inference for Llama-family models, on PyTorch or MLX."""

from __future__ import annotations

from typing import Any

from qstar.core.api import LossOutput, QStarModel, check_dtype
from qstar.core.hub import resolve
from qstar.core.recipe import PRESETS, Recipe, make_recipe

__all__ = ["load", "Recipe", "make_recipe", "PRESETS", "QStarModel", "LossOutput"]
__version__ = "0.1.0"

BACKENDS = ("torch", "mlx")


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
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    info = checkpoint.inspect(resolve(path))
    chosen = make_recipe(recipe if recipe is not None else (info.saved_recipe or "default"), **recipe_overrides)
    if backend == "torch":
        from qstar import torch_backend

        return torch_backend.load(info, chosen, dtype, device)
    from qstar import mlx_backend

    return mlx_backend.load(info, chosen, dtype, device)
