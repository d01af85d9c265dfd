"""The shipped default model, `arith-llama/`, and `build_default.py`, which rebuilds it. This folder installs as the
package `qstar.weights` (pyproject.toml's package-dir), so the model is found wherever qstar is installed."""

import filecmp
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

DEFAULT_MODEL = str(files(__name__) / "arith-llama")
"""The directory of the shipped model, wherever qstar is installed."""
IDENTITY = ("config.json", "model.safetensors")
"""The files that make a directory the shipped model."""


def default_preset(model: str | Path) -> str:
    """The recipe preset of a model that records none: toy for the shipped model (docs/TOY.md), else default."""
    return "toy" if is_shipped(str(Path(model).expanduser().resolve())) else "default"


@lru_cache(maxsize=64)
def is_shipped(resolved: str) -> bool:
    """Whether the directory `resolved` is the shipped model: the installed one, or a copy of its files (a clone's
    weights/arith-llama beside an installed qstar, or a copy of it)."""
    shipped = Path(DEFAULT_MODEL).resolve()
    if Path(resolved) == shipped:
        return True
    copies = [Path(resolved, name) for name in IDENTITY]
    return all(c.is_file() for c in copies) and all(filecmp.cmp(c, shipped / c.name, shallow=False) for c in copies)
