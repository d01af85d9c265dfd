"""The core's QStarModel on MLX: any supported checkpoint built into `Backbone`, and the hooks the core's model needs
of the framework (parameters, gradients, tensor files, freezing, adapters, quantization)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from safetensors import safe_open
from safetensors.numpy import save_file

from qstar.core import checkpoint
from qstar.core.checkpoint import CheckpointInfo
from qstar.core.lora import QUANTIZE_BITS, QUANTIZE_GROUPS, LoraConfig
from qstar.core.model import QStarModel
from qstar.core.recipe import Recipe
from qstar.mlx_backend import lora
from qstar.mlx_backend.backbone import Backbone
from qstar.mlx_backend.ops import HALF, MLXOps, flat, from_numpy

MLX_DTYPES = {
    "float32": mx.float32,
    "bfloat16": mx.bfloat16,
    "float16": mx.float16,
    "float64": mx.float64,
}
METADATA = {"format": "mlx"}


def select_device(dtype: str, device: str | None) -> mx.Device:
    """The device to compute on; loading makes it MLX's process-wide default device.

    float64 exists only on the CPU: without a device it runs there, on the GPU it is an error."""
    if device is None:
        return mx.Device(mx.cpu) if dtype == "float64" else mx.default_device()
    if device not in ("cpu", "gpu"):
        raise ValueError(f"unknown MLX device {device!r}: choose 'cpu' or 'gpu'")
    if device == "gpu" and not mx.is_available(mx.gpu):
        raise ValueError("MLX has no GPU on this machine: use device='cpu'")
    if device == "gpu" and dtype == "float64":
        raise ValueError("MLX computes float64 only on the CPU: use device='cpu' or another dtype")
    return mx.Device(mx.cpu if device == "cpu" else mx.gpu)


class MLXQStar(QStarModel):
    backbone: Backbone
    ops: MLXOps

    def parameters(self) -> dict[str, mx.array]:
        # an adapted layer keeps its Linear as `.linear` (mlx-lm's layers): its weights keep their checkpoint names
        return {name.replace(".linear.", "."): v for name, v in flat(self.backbone.parameters()).items()}

    def gradients_of(self, loss_fn: Callable[[], mx.array]) -> dict[str, np.ndarray]:
        params = self.backbone.trainable_parameters()
        try:
            _, grads = nn.value_and_grad(self.backbone, loss_fn)()
        finally:  # value_and_grad leaves its traced copies in the model: put the real arrays back
            self.backbone.update(params)
        return {name: self.ops.to_numpy(g) for name, g in flat(grads).items()}

    def write_tensors(self, tensors: dict[str, mx.array], file: Path) -> None:
        if any(v.dtype == mx.float64 for v in tensors.values()):  # mx.save_safetensors writes no float64
            save_file({k: np.array(v) for k, v in tensors.items()}, str(file), metadata=METADATA)
        else:
            mx.save_safetensors(str(file), tensors, metadata=METADATA)

    @staticmethod
    def nbytes(tensor: mx.array) -> int:
        return tensor.nbytes

    def read_tensors(self, file: Path) -> dict[str, mx.array]:
        return read_safetensors(file)

    def assign(self, tensors: dict[str, mx.array]) -> None:
        dtypes = {k: v.dtype for k, v in self.parameters().items()}
        self.backbone.update(tree_unflatten([(k, v.astype(dtypes[k])) for k, v in tensors.items()]))
        mx.eval(self.backbone.parameters())

    def wrap_adapters(self, cfg: LoraConfig) -> None:
        lora.wrap(self.backbone, cfg, self.config.num_layers)

    def freeze(self, trainable: Callable[[str], bool]) -> None:
        self.backbone.freeze()
        for name in self.parameters():
            if trainable(name):
                owner, _, leaf = name.rpartition(".")
                lora.module(self.backbone, owner).unfreeze(keys=[leaf], recurse=False)

    def merge_adapters(self) -> None:
        lora.fuse(self.backbone)

    def quantize_weights(self, bits: int, group_size: int) -> dict[str, Any]:
        if bits not in QUANTIZE_BITS or group_size not in QUANTIZE_GROUPS:
            raise ValueError(f"--q-bits must be one of {QUANTIZE_BITS} and --q-group-size one of {QUANTIZE_GROUPS}")
        self.backbone.quantize(bits, group_size)
        mx.eval(self.backbone.parameters())
        return {"quantization": {"group_size": group_size, "bits": bits}}


def to_float64(x: mx.array) -> np.ndarray:
    """Exact float64 copy (numpy has no bfloat16; every half value is exact in float32)."""
    return np.array(x.astype(mx.float32, stream=mx.cpu) if x.dtype in HALF else x, dtype=np.float64)


def read_safetensors(file: Path) -> dict[str, mx.array]:
    """mx.load, except for files holding float64, which mx.load rejects: those come through numpy."""
    with safe_open(str(file), framework="numpy") as f:
        if any(f.get_slice(k).get_dtype() == "F64" for k in f.keys()):
            return {k: from_numpy(f.get_tensor(k)) for k in f.keys()}
    return cast(dict[str, mx.array], mx.load(str(file)))


def embedding_rows(embedding: mx.array, ids: list[int]) -> np.ndarray:
    return to_float64(mx.take(embedding, mx.array(ids), axis=0, stream=mx.cpu) if ids else embedding)


def build_model(info: CheckpointInfo, recipe: Recipe, dtype: str, device: str | None = None) -> MLXQStar:
    """Build the model (MLX initialises lazily, so nothing is computed), then fill it from the checkpoint."""
    if "quantization_config" in info.raw_config:
        raise ValueError(
            f"{info.path / 'config.json'} is a 4-bit NF4 base for the torch backend (qstar convert --backend torch "
            "--quantize): pass --backend torch, or convert the source with --backend mlx --quantize for MLX"
        )
    mx.set_default_device(select_device(dtype, device))
    model = Backbone(info.config, recipe.embedding_scale)
    quantization = info.raw_config.get("quantization")
    if quantization is not None:  # a QLoRA base (qstar convert --quantize): quantized layers before their weights
        model.quantize(quantization["bits"], quantization["group_size"])
    expected = {k: tuple(v.shape) for k, v in flat(model.parameters()).items()}
    tensors = checkpoint.model_tensors(info, recipe, read_safetensors, embedding_rows, from_numpy, expected)
    mlx_dtype = MLX_DTYPES[dtype]
    floating = {k for k, v in tensors.items() if mx.issubdtype(v.dtype, mx.floating)}  # not the packed weights
    arrays = [(k, v.astype(mlx_dtype, stream=mx.cpu) if k in floating else v) for k, v in tensors.items()]
    model.update(tree_unflatten(arrays))
    mx.eval(model.parameters())
    return MLXQStar(model, recipe, info, dtype)
