"""What a backend package offers the core (qstar.torch_backend, qstar.mlx_backend; qstar.backends finds them by
name), and loading any checkpoint through one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from qstar.core import checkpoint
from qstar.core.api import QStarModel, check_dtype
from qstar.core.checkpoint import CheckpointInfo
from qstar.core.hub import resolve
from qstar.core.recipe import Recipe, make_recipe
from qstar.core.session import Session
from qstar.core.thinker import check_step_mode


class Backend(Protocol):
    def load(self, info: CheckpointInfo, recipe: Recipe, dtype: str, device: str | None = None) -> QStarModel:
        """The model of a recognised checkpoint, in `dtype` on `device` (None: the backend's default)."""

    @property
    def Session(self) -> Callable[..., Session]:  # noqa: N802 - the backend's session class
        """Session(model, train_config): a model's training session."""


def load(
    backend: Backend,
    path: str | Path,
    dtype: str = "float32",
    recipe: str | Recipe | None = None,
    device: str | None = None,
    step_mode: str | None = None,
    **recipe_overrides: Any,
) -> QStarModel:
    """A qstar, authors' or plain Hugging Face checkpoint (local directory or hub id) on `backend`.

    `recipe`: a preset name or Recipe; None uses the recipe saved in a qstar checkpoint, else "default".
    `step_mode`: one-pass or two-pass (thinker.STEP_MODES); None: the faster where the model computes.
    `recipe_overrides`: recipe field values, e.g. thought_tokens=3."""
    dtype = check_dtype(dtype)
    info = checkpoint.inspect(resolve(path))
    chosen = make_recipe(recipe if recipe is not None else (info.saved_recipe or "default"), **recipe_overrides)
    model = backend.load(info, chosen, dtype, device)
    if step_mode is not None:
        model.step_mode = check_step_mode(step_mode)
    return model
