"""LoRA and DoRA in MLX: mlx-lm's own layers (linear_to_lora_layers wraps Linear and QuantizedLinear), started from
qstar's adapter init (qstar/core/lora.py) so that both backends start from the same adapter."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from qstar.core.lora import LoraConfig, initial_lora_a
from qstar.mlx_backend.ops import from_numpy

ADAPTED = (LoRALinear, DoRALinear)


def module(model: nn.Module, path: str) -> Any:
    node: Any = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def wrap(model: nn.Module, cfg: LoraConfig, num_layers: int) -> None:
    """Wrap the target Linear layers of `model` (qstar's MLX Model) with mlx-lm's adapters, in place."""
    parameters = {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout, "keys": list(cfg.keys)}
    dtype = model.model.norm.weight.dtype
    linear_to_lora_layers(model.model, cfg.num_layers, parameters, use_dora=cfg.fine_tune_type == "dora")
    for path in cfg.targets(num_layers):
        layer = module(model, path)
        layer.lora_a = from_numpy(initial_lora_a(path, layer.lora_a.shape[0], cfg.rank)).astype(dtype)
        layer.lora_b = layer.lora_b.astype(dtype)
        if isinstance(layer, DoRALinear) and dtype == mx.float64:  # mlx-lm takes the norm in float32
            layer.m = mx.linalg.norm(layer._dequantized_weight().astype(mx.float64), axis=1)


def fuse(model: nn.Module) -> None:
    """Replace every adapted layer by mlx-lm's fused Linear, in place."""
    fused = [(path, m.fuse()) for path, m in model.named_modules() if isinstance(m, ADAPTED)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    mx.eval(model.parameters())
