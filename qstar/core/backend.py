"""What a backend package offers the core (qstar.torch_backend, qstar.mlx_backend; qstar.backends finds them by
name), and loading any checkpoint through one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from qstar.core import checkpoint, lora
from qstar.core.api import QStarModel, check_dtype
from qstar.core.checkpoint import CheckpointInfo
from qstar.core.distributed import World
from qstar.core.hub import resolve
from qstar.core.recipe import Recipe, make_recipe
from qstar.core.session import Session
from qstar.core.thinker import check_step_mode
from qstar.weights import default_preset


class Backend(Protocol):
    def load(self, info: CheckpointInfo, recipe: Recipe, dtype: str, device: str | None = None) -> QStarModel:
        """The model of a recognised checkpoint, in `dtype` on `device` (None: the backend's default)."""

    @property
    def Session(self) -> Callable[..., Session]:  # noqa: N802 - the backend's session class
        """Session(model, train_config, world): a model's training session."""

    def join(self) -> World:
        """This process's place in a data-parallel run (alone without a launcher)."""


def load(
    backend: Backend,
    path: str | Path,
    dtype: str = "float32",
    recipe: str | Recipe | None = None,
    device: str | None = None,
    step_mode: str | None = None,
    adapter_path: str | Path | None = None,
    **recipe_overrides: Any,
) -> QStarModel:
    """A qstar, authors' or plain Hugging Face checkpoint (local directory or hub id) on `backend`.

    `recipe`: a preset name or Recipe; None uses the recipe saved in a qstar checkpoint (or adapter), else "default".
    `step_mode`: one-pass or two-pass (thinker.STEP_MODES); None: the faster where the model computes.
    `adapter_path`: an adapter directory (lora/dora) to apply; `path` may also be one, then its base model is the one
    it records.
    `recipe_overrides`: recipe field values, e.g. thought_tokens=3."""
    dtype = check_dtype(dtype)
    adapter = None if adapter_path is None else Path(adapter_path)
    if lora.is_adapter(path):  # the adapter (unless another is given) on the base model it records
        adapter = adapter or Path(path)
        path = base_model(Path(path), lora.read_adapter_config(Path(path)))
    if adapter is not None and recipe is None:
        recipe = (lora.read_adapter_config(adapter).get("qstar") or {}).get("recipe")
    local = resolve(path)
    info = checkpoint.inspect(local)
    saved = info.saved_recipe or default_preset(local)
    chosen = make_recipe(saved if recipe is None else recipe, **recipe_overrides)
    model = backend.load(info, chosen, dtype, device)
    model.source = str(local.resolve()) if Path(path).is_dir() else str(path)  # a hub id stays one
    if adapter is not None:
        model.load_adapter(adapter)
    if step_mode is not None:
        model.step_mode = check_step_mode(step_mode)
    return model


def base_model(adapter: Path, meta: dict[str, Any]) -> str:
    """The base model an adapter directory records (qstar writes it; mlx-lm's have none)."""
    base = meta.get("base_model")
    if not isinstance(base, str):
        raise ValueError(
            f"{adapter / lora.CONFIG_FILE} names no base_model: pass --model BASE --adapter-path {adapter}"
        )
    if base.startswith(("/", ".")) and not Path(base).is_dir():
        raise FileNotFoundError(
            f"{adapter} was trained on {base}, which is not there any more: pass --model BASE --adapter-path {adapter}"
        )
    return base
