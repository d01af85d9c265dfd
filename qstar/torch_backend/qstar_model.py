"""The core's QStarModel on PyTorch: any supported checkpoint built into `Backbone`, and the hooks the core's model
needs of the framework (parameters, gradients, tensor files, freezing, adapters)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qstar.core import checkpoint
from qstar.core.checkpoint import CheckpointInfo
from qstar.core.lora import LoraConfig
from qstar.core.model import QStarModel
from qstar.core.model_config import is_linear
from qstar.core.recipe import Recipe
from qstar.torch_backend import lora, quantize
from qstar.torch_backend.backbone import Backbone
from qstar.torch_backend.ops import TorchOps

TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def select_device(device: str | None) -> str:
    """The device to compute on: `device`, or by default CUDA where PyTorch sees it, else the CPU. A CUDA device this
    machine lacks is one clear error here, not an assertion from deep inside PyTorch."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a PyTorch device: pass cpu, cuda or cuda:N") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if chosen.type == "cuda" and (chosen.index or 0) >= count:
        raise ValueError(
            f"device {device} is not available: this PyTorch ({torch.__version__}) sees {count} CUDA "
            f"device{'' if count == 1 else 's'}; pass --device cpu, or leave --device out"
        )
    return device


class TorchQStar(QStarModel):
    backbone: Backbone
    ops: TorchOps

    whole: dict[str, torch.Tensor] | None = None
    """A sharded run's weights gathered whole into rank 0's CPU memory while it saves (Session.gathered): what
    `parameters` answers then, instead of the shards."""

    def parameters(self) -> dict[str, torch.Tensor]:
        return dict(self.backbone.named_parameters()) if self.whole is None else self.whole

    def gradients_of(self, loss_fn: Callable[[], torch.Tensor]) -> dict[str, np.ndarray]:
        self.backbone.zero_grad(set_to_none=True)
        loss_fn().backward()
        return {
            name: self.ops.to_numpy(p.grad) if p.grad is not None else np.zeros(tuple(p.shape))
            for name, p in self.backbone.named_parameters()
            if p.requires_grad
        }

    def write_tensors(self, tensors: dict[str, torch.Tensor], file: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(file))

    @staticmethod
    def nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    def read_tensors(self, file: Path) -> dict[str, torch.Tensor]:
        return load_file(str(file))

    def assign(self, tensors: dict[str, torch.Tensor]) -> None:
        params = self.parameters()
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)

    def wrap_adapters(self, cfg: LoraConfig) -> None:
        lora.wrap(self.backbone, cfg, self.config.num_layers)

    def freeze(self, trainable: Callable[[str], bool]) -> None:
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(trainable(name))

    def merge_adapters(self) -> None:
        lora.fuse(self.backbone)
        quantize.dequantize(self.backbone)  # a 4-bit base fuses into a float model
        raw = {k: v for k, v in self.info.raw_config.items() if k != "quantization_config"}
        self.info = replace(self.info, raw_config=raw)

    def quantize_weights(self, bits: int, group_size: int) -> dict[str, Any]:
        quantize.check(bits, group_size)
        if self.config.model_type == "openelm":
            raise ValueError("the torch backend does not quantize OpenELM's fused projections: pass --backend mlx")
        quantize.quantize(self.backbone, self.backbone.dtype)
        return {"quantization_config": quantize.config(self.backbone.dtype)}

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return self.parameters() | quantize.stored_tensors(self.backbone)


def embedding_rows(embedding: torch.Tensor, ids: list[int]) -> np.ndarray:
    return (embedding[ids] if ids else embedding).double().numpy()


def build_model(info: CheckpointInfo, recipe: Recipe, dtype: str, device: str | None = None) -> TorchQStar:
    """Build the network on the meta device, then fill it from the checkpoint (extras created for plain HF; a 4-bit
    base's layers built from their packed weights)."""
    if "quantization" in info.raw_config:
        raise ValueError(
            f"{info.path / 'config.json'} is an MLX-quantized model (qstar convert --backend mlx --quantize): pass "
            "--backend mlx, or convert the source with --backend torch --quantize for this backend"
        )
    four_bit = quantize.stored(info.raw_config)
    device = select_device(device)
    with torch.device("meta"):
        model = Backbone(info.config, recipe.embedding_scale, device)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    if four_bit:
        expected = {k: quantize.packed_shape(v) if is_linear(k) else v for k, v in expected.items()}

    def read(file: Path) -> dict[str, torch.Tensor]:
        tensors = load_file(str(file))
        state.update(quantize.split_state(tensors) if four_bit else {})
        return tensors

    tensors = checkpoint.model_tensors(info, recipe, read, embedding_rows, torch.from_numpy, expected)
    torch_dtype = TORCH_DTYPES[dtype]
    tensors = {
        k: v.to(device=device, dtype=torch_dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()
    }
    if four_bit:
        quantize.load(model, tensors, state, device, torch_dtype)
    model.load_state_dict(tensors, assign=True, strict=not four_bit)  # strict: check_weights read the names
    return TorchQStar(model, recipe, info, dtype)
