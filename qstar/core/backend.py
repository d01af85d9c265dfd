"""The backends: what a backend package offers (`Backend`), and the registry that turns a name into one, the only
place that does. Everything that differs between frameworks lives behind this interface, in qstar/torch_backend/ and
qstar/mlx_backend/; a third backend is one more package of the same shape and one more line in PACKAGES."""

from __future__ import annotations

import importlib
import importlib.util
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

import numpy as np

from qstar.core.checkpoint import CheckpointInfo
from qstar.core.distributed import World
from qstar.core.extras import install_hint, require_extra
from qstar.core.model import QStarModel
from qstar.core.ops import Ops
from qstar.core.recipe import Recipe
from qstar.core.session import Session
from qstar.core.train_config import TrainConfig

PACKAGES = {"torch": "qstar.torch_backend", "mlx": "qstar.mlx_backend"}
"""Backend name -> its package; the name is also the framework it needs."""
NAMES = ("auto", *PACKAGES)


class Backend(Protocol):
    name: str

    def build_model(self, info: CheckpointInfo, recipe: Recipe, dtype: str, device: str | None = None) -> QStarModel:
        """The model of a recognised checkpoint, in `dtype` on `device` (None: the backend's default)."""

    @property
    def Session(self) -> Callable[..., Session]:  # noqa: N802 - the backend's session class
        """Session(model, train_config, world): a model's training session."""

    def join(self) -> World:
        """This process's place in a data-parallel run (alone without a launcher)."""

    def make_ops(self, device: str | None = None) -> Ops:
        """The array interface on `device`: synchronisation and memory for measurements with no model loaded."""

    def set_threads(self, threads: int | None, parameters: int) -> None:
        """Compute on `threads` CPU threads, or on what the backend finds fastest for a model of `parameters`."""

    def check_settings(self, cfg: TrainConfig) -> None:
        """Refuse, with one clear line, what this backend cannot run of a run's settings (before anything is
        written)."""

    def lm_step(self, path: Path, ids: np.ndarray, dtype: str, device: str | None) -> Callable[[], None]:
        """One training step of the framework's own causal LM (transformers, mlx-lm) on the checkpoint at `path`
        over the rows `ids`, with AdamW: the yardstick a Quiet-STaR step is measured against."""


def available(preferred: str = "auto") -> str:
    """ "auto" picks mlx on Apple silicon when installed, else torch; an explicit name must be importable."""
    installed = {name: importlib.util.find_spec(name) is not None for name in PACKAGES}
    if preferred == "auto":
        on_mac = platform.system() == "Darwin" and platform.machine() == "arm64"
        for name in ("mlx", "torch") if on_mac else ("torch", "mlx"):
            if installed[name]:
                return name
        raise RuntimeError(f"neither torch nor mlx is installed: {install_hint('torch')}, or {install_hint('mlx')}")
    if preferred not in PACKAGES:
        raise ValueError(f"unknown backend {preferred!r}: choose {', '.join(NAMES)}")
    if not installed[preferred]:
        raise RuntimeError(f"the {preferred} backend is not installed: {install_hint(preferred)}")
    return preferred


def get(name: str = "auto") -> Backend:
    """The backend package of `name` (or of `available(name)` for "auto")."""
    chosen = available(name)  # each backend's extra is named as the backend
    return cast(Backend, require_extra(PACKAGES[chosen], chosen, f"the {chosen} backend"))


def gguf_to_hf(directory: Path, gguf_file: str, out: Path) -> Path:
    """A GGUF checkpoint as a Hugging Face directory: transformers' GGUF loader builds PyTorch tensors, so this reads
    it through the torch backend, whichever backend then trains the model."""
    reader = require_extra(PACKAGES["torch"] + ".gguf", "torch", "reading GGUF")
    return cast(Path, reader.gguf_to_hf(directory, gguf_file, out))
