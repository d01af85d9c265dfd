"""The shipped default model, `arith-llama/`, and `build_default.py`, which rebuilds it. This folder installs as the
package `qstar.weights` (pyproject.toml's package-dir), so the model is found wherever qstar is installed."""

from importlib.resources import files
from pathlib import Path

DEFAULT_MODEL = str(files(__name__) / "arith-llama")
"""The directory of the shipped model, wherever qstar is installed."""


def default_preset(model: str | Path) -> str:
    """The recipe preset of a model that records none: toy for the shipped model (docs/TOY.md), else default."""
    return "toy" if Path(model).expanduser().resolve() == Path(DEFAULT_MODEL).resolve() else "default"
