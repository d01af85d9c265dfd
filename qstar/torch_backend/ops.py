"""The core's array interface for PyTorch."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from qstar.core.ops import peak_rss_gb, reset_peak_rss, rss_gb

HALF = (torch.float16, torch.bfloat16)
MAX_CONSTANTS = 256
"""Device copies of host constants kept, least recently used first out."""


class TorchOps:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.ranks = 1
        """Set by a data-parallel Session (torch.distributed)."""
        self.constants: OrderedDict[tuple[bytes, str, tuple[int, ...]], torch.Tensor] = OrderedDict()

    def asarray(self, x: np.ndarray, like: torch.Tensor | None = None) -> torch.Tensor:
        """On CUDA through pinned memory, without waiting: a copy from pageable memory would wait for the work queued
        on the device before it (a host sync every step, for the batch's ids and mask)."""
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t.to(self.device)
        return t if like is None else t.to(like.dtype)

    def constant(self, x: np.ndarray) -> torch.Tensor:
        key = (x.tobytes(), x.dtype.str, x.shape)
        if key in self.constants:
            self.constants.move_to_end(key)
            return self.constants[key]
        self.constants[key] = value = self.asarray(x)
        if len(self.constants) > MAX_CONSTANTS:  # generation's growing masks would otherwise pile up
            self.constants.popitem(last=False)
        return value

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach().cpu()
        return (x.float() if x.dtype in HALF else x).numpy()

    def no_grad(self) -> AbstractContextManager[Any]:
        return torch.no_grad()

    def stop_gradient(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    def zeros(self, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=like.dtype, device=like.device)

    def concat(self, xs: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(list(xs), dim=axis)

    def stack(self, xs: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.stack(list(xs), dim=axis)

    def broadcast_to(self, x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return x.expand(*shape)

    def transpose(self, x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
        return x.permute(*axes)

    def take(self, x: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.index_select(x, axis, index)

    def take_along_axis(self, x: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.gather(x, axis, index)

    def where(self, cond: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
        return torch.where(cond, x, y)

    def logsumexp(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.logsumexp(x, dim=axis)

    def log_softmax(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.log_softmax(x, dim=axis)

    def softmax(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.softmax(x, dim=axis)

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.ranks == 1:
            return x
        total = x.detach().clone()
        torch.distributed.all_reduce(total)
        return total

    def maximum(self, x: torch.Tensor, y: float) -> torch.Tensor:
        return torch.clamp_min(x, y)

    def sum(self, x: torch.Tensor, axis: int | None = None) -> torch.Tensor:
        return x.sum() if axis is None else x.sum(dim=axis)

    def mean(self, x: torch.Tensor, axis: int | None = None) -> torch.Tensor:
        return x.mean() if axis is None else x.mean(dim=axis)

    def argmax(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.argmax(x, dim=axis)

    def sort(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.sort(x, dim=axis).values

    def cumsum(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.cumsum(x, dim=axis)

    def searchsorted(self, sorted: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        index = torch.searchsorted(sorted, values[..., None]).squeeze(-1)
        return index.clamp_max_(sorted.shape[-1] - 1)  # non-finite rows reach no entry: keep the index in range

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)

    def cos(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cos(x)

    def sin(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)

    def power(self, base: float, exponents: np.ndarray) -> np.ndarray:
        return (float(base) ** torch.from_numpy(exponents.astype(np.float32))).numpy()

    def einsum(self, subscripts: str, *operands: torch.Tensor) -> torch.Tensor:
        return torch.einsum(subscripts, *operands)

    def astype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype)

    def upcast(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if x.dtype in HALF else x

    def all_finite(self, xs: Sequence[torch.Tensor]) -> bool:
        return bool(torch.stack([torch.isfinite(x).all() for x in xs]).all())

    def on_accelerator(self) -> bool:
        return self.device.type != "cpu"

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'' if threads == 1 else 's'})"

    def peak_memory_gb(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else peak_rss_gb()

    def memory_gb(self) -> float:
        return torch.cuda.memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else rss_gb()

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device) if self.device.type == "cuda" else reset_peak_rss()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def uniform(self, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        u = torch.rand(tuple(shape), device=self.device, dtype=like.dtype)  # torch's default generator: [0, 1)
        return u.clamp_min_(torch.finfo(like.dtype).tiny)
