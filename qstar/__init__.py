"""qstar: Quiet-STaR training and inference for Hugging Face causal LMs, on PyTorch or MLX.

m = qstar.load("runs/qstar/model")   # any checkpoint: qstar, plain Hugging Face, the authors' release
m.loss(ids), m.gradients(ids), m.generate(prompts), m.save(path)
"""

from __future__ import annotations

from qstar.core.backend import available as available_backend
from qstar.core.loading import convert, load
from qstar.core.model import LossOutput, QStarModel
from qstar.core.recipe import PRESETS, Recipe, make_recipe

__all__ = ["load", "convert", "available_backend", "Recipe", "make_recipe", "PRESETS", "QStarModel", "LossOutput"]
__version__ = "0.1.0"
