"""A 4-bit NF4 base for QLoRA on PyTorch, through bitsandbytes: every decoder layer's Linear weight quantized in blocks
of 64 to the QLoRA paper's NormalFloat, its absmax double-quantized (bitsandbytes' defaults, as transformers'
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` makes them);
embeddings, norms, the LM head, the thought vectors and the mixing head stay float.

Chosen over torchao's NF4Tensor by measurement on a CPU (docs/PERFORMANCE.md#qlora-on-pytorch): the same NF4 error,
2x faster forward and 3.8x faster forward+backward, and on CUDA the kernels PEFT's QLoRA runs. Stored as transformers
stores a bitsandbytes 4-bit model (config.json `quantization_config`; per weight the packed uint8 data beside its
quant-state tensors `weight.absmax`, `weight.quant_map`, ...), so transformers loads the base too.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from qstar.core.extras import require_extra
from qstar.core.model_config import is_linear

BITS, BLOCK = 4, 64
STATE_PREFIX = "weight."
"""A quantized weight's quant-state tensors are stored as `<layer>.weight.<part>` (transformers' names)."""


def bitsandbytes() -> Any:
    # On a CPU with AVX512-BF16 bitsandbytes looks for an optional inference kernel on the Hugging Face Hub when it is
    # imported and warns when it cannot have it (offline): qstar does not use that kernel (NF4Linear).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    return require_extra("bitsandbytes", "qlora", "a 4-bit base on the torch backend")


def config(dtype: torch.dtype) -> dict[str, Any]:
    """config.json's quantization_config, transformers' BitsAndBytesConfig fields."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": ["lm_head"],
    }


def stored(raw_config: dict[str, Any]) -> bool:
    """Whether config.json describes a 4-bit NF4 base (one clear error for a quantization qstar cannot read)."""
    spec = raw_config.get("quantization_config")
    if spec is None:
        return False
    if (
        spec.get("quant_method") != "bitsandbytes"
        or not spec.get("load_in_4bit")
        or spec.get("bnb_4bit_quant_type") != "nf4"
    ):
        raise ValueError(
            f"config.json's quantization_config ({spec.get('quant_method')}) is not one qstar reads: convert a float "
            "checkpoint, with --quantize for a 4-bit NF4 base"
        )
    bitsandbytes()
    return True


def check(bits: int, group_size: int) -> None:
    if bits != BITS or group_size != BLOCK:
        raise ValueError(
            f"--q-bits {bits} --q-group-size {group_size}: the torch backend quantizes to 4-bit NF4 in blocks of 64 "
            "(bitsandbytes, as transformers loads it): pass --q-bits 4 --q-group-size 64, or --backend mlx"
        )


class NF4Linear(nn.Module):
    """x @ dequantize(weight).T + bias with bitsandbytes' 4-bit kernels, computed in the model's dtype, the same in
    training and inference (bitsandbytes' own Linear4bit switches CPU kernels in eval mode, which changes results, and
    looks them up on the Hub)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight, self.bias, self.dtype = weight, bias, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def is_quantized(weight: torch.Tensor) -> bool:
    return getattr(weight, "quant_state", None) is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for a float or a 4-bit weight."""
    if not is_quantized(weight):
        return nn.functional.linear(x, weight, bias)
    out = bitsandbytes().matmul_4bit(x, weight, bias=None, quant_state=weight.quant_state)  # type: ignore[attr-defined]
    return out if bias is None else out + bias


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The float weight (out, in) a 4-bit one stands for, in the dtype it was quantized from (a float one itself)."""
    if not is_quantized(weight):
        return weight
    return bitsandbytes().functional.dequantize_4bit(weight.data, weight.quant_state)  # type: ignore[attr-defined]


def state_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 4-bit weight's quant state as the tensors transformers stores beside it (`weight.absmax`, ...)."""
    return {STATE_PREFIX + k: v.detach() for k, v in weight.quant_state.as_dict(packed=True).items()}  # type: ignore[attr-defined]


def quantize(net: nn.Module, dtype: torch.dtype) -> None:
    """Replace every decoder layer's Linear by its 4-bit NF4 form, in place."""
    bnb = bitsandbytes()
    for path, module in list(net.named_modules()):
        if isinstance(module, nn.Linear) and is_linear(path + ".weight"):
            data = module.weight.detach().to(torch.float32 if dtype == torch.float64 else dtype)  # bnb: 16/32 bits
            weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4", blocksize=BLOCK)._quantize(
                data.device
            )
            replace(net, path, NF4Linear(weight, module.bias, dtype))


def dequantize(net: nn.Module) -> None:
    """Replace every 4-bit layer by the float Linear it stands for, in place."""
    for path, module in list(net.named_modules()):
        if isinstance(module, NF4Linear):
            weight = dequantized(module.weight).to(module.dtype)
            linear = nn.Linear(weight.shape[1], weight.shape[0], module.bias is not None, weight.device, module.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            replace(net, path, linear)


def stored_tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every 4-bit layer's quant-state tensors, under the names they are stored with."""
    return {
        f"{path}.{name}": value
        for path, module in net.named_modules()
        if isinstance(module, NF4Linear)
        for name, value in state_tensors(module.weight).items()
    }


def split_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Take the quant-state tensors out of a stored base's tensors (what is left has the model's names)."""
    return {
        k: tensors.pop(k) for k in list(tensors) if STATE_PREFIX in k and is_linear(k.split(STATE_PREFIX)[0] + "weight")
    }


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """How a float weight of `shape` is stored 4-bit: two weights a byte, one column."""
    return ((shape[0] * shape[1] + 1) // 2, 1)


def load(
    net: nn.Module, tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor], device: str, dtype: torch.dtype
) -> None:
    """Build the 4-bit layers of a stored base from its packed weights (taken out of `tensors`) and quant state."""
    bnb = bitsandbytes()
    for name in [k for k in tensors if is_linear(k) and tensors[k].dtype == torch.uint8]:
        parts = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}
        weight = bnb.nn.Params4bit.from_prequantized(tensors.pop(name), parts, requires_grad=False, device=device)
        path = name.removesuffix(".weight")
        bias = tensors.pop(path + ".bias", None)
        replace(net, path, NF4Linear(weight, None if bias is None else nn.Parameter(bias), dtype))


def replace(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(net.get_submodule(parent), attr, module)
