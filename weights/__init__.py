"""The shipped default model, `arith-llama/` (installed with the package), and `build_default.py`, which rebuilds it."""

from importlib.resources import files

DEFAULT_MODEL = str(files(__name__) / "arith-llama")
"""The directory of the shipped model, wherever qstar is installed."""
