"""LoRA and DoRA in PyTorch, computing what mlx-lm's LoRALinear and DoRALinear compute (qstar/core/lora.py).

A wrapped Linear keeps its own parameters under their names (`q_proj.weight`, frozen) beside `q_proj.lora_a`,
`q_proj.lora_b` (and `q_proj.m`), so checkpoints and adapters read the same on both backends.
"""

from __future__ import annotations

import torch
from torch import nn

from qstar.core.lora import LoraConfig, fused_weight, initial_lora_a
from qstar.torch_backend import quantize


class LoRALinear(nn.Module):
    """linear(x) + scale * (dropout(x) @ lora_a) @ lora_b; DoRA: that, rescaled row by row to the magnitude m over the
    adapted weight's norm (not differentiated), bias added after (mlx-lm's order of operations, for parity). The
    weight may be a 4-bit one (QLoRA: quantize.NF4Linear's)."""

    def __init__(self, linear: nn.Linear | quantize.NF4Linear, name: str, cfg: LoraConfig) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        dtype = linear.dtype if isinstance(linear, quantize.NF4Linear) else linear.weight.dtype
        float_weight = quantize.dequantized(linear.weight).detach().to(dtype)
        out_features, in_features = float_weight.shape
        device = float_weight.device
        lora_a = torch.from_numpy(initial_lora_a(name, in_features, cfg.rank))
        self.lora_a = nn.Parameter(lora_a.to(dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(cfg.rank, out_features, dtype=dtype, device=device))
        self.scale, self.dropout = cfg.scale, nn.Dropout(cfg.dropout)
        self.dora = cfg.fine_tune_type == "dora"
        if self.dora:
            precise = torch.float64 if dtype == torch.float64 else torch.float32  # mlx-lm: float32 at least
            self.m = nn.Parameter(float_weight.to(precise).norm(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        if not self.dora:
            return quantize.linear(x, self.weight, self.bias) + (self.scale * z).to(x.dtype)
        out = quantize.linear(x, self.weight, None) + (self.scale * z).to(x.dtype)
        with torch.no_grad():  # the norm is not differentiated: a 4-bit weight's float form lives only for it
            adapted = quantize.dequantized(self.weight).to(x.dtype) + (self.scale * self.lora_b.T) @ self.lora_a.T
            norm = adapted.norm(dim=1)
        out = (self.m / norm).to(x.dtype) * out
        return out if self.bias is None else out + self.bias

    def fused(self) -> nn.Linear:
        """A plain Linear computing what this adapted one does (float, over a 4-bit base too)."""
        weight = quantize.dequantized(self.weight)
        w, a, b = (t.detach().double().cpu().numpy() for t in (weight, self.lora_a, self.lora_b))
        m = self.m.detach().double().cpu().numpy() if self.dora else None
        linear = nn.Linear(
            w.shape[1], w.shape[0], bias=self.bias is not None, device=weight.device, dtype=self.lora_a.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(fused_weight(w, a, b, self.scale, m)))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def wrap(model: nn.Module, cfg: LoraConfig, num_layers: int) -> None:
    """Replace the target Linear layers of `model` by LoRALinear, in place."""
    for path in cfg.targets(num_layers):
        linear = model.get_submodule(path)
        if not isinstance(linear, nn.Linear | quantize.NF4Linear):
            raise TypeError(f"{path} is a {type(linear).__name__}, not a Linear: check --lora-keys")
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, LoRALinear(linear, path, cfg))


def fuse(model: nn.Module) -> None:
    """Replace every LoRALinear of `model` by its fused Linear, in place."""
    for path, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent), attr, module.fused())
