"""The core's array interface for MLX."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import mlx.core as mx
import numpy as np

HALF = (mx.float16, mx.bfloat16)


class MLXOps:
    def asarray(self, x: np.ndarray, like: mx.array | None = None) -> mx.array:
        a = mx.array(np.ascontiguousarray(x))
        return a if like is None else a.astype(like.dtype)

    def to_numpy(self, x: mx.array) -> np.ndarray:
        # numpy has no bfloat16: half precision comes back as float32, like the torch backend.
        return np.array(x.astype(mx.float32) if x.dtype in HALF else x)

    def no_grad(self) -> AbstractContextManager[Any]:
        # MLX records nothing outside mx.grad/value_and_grad.
        return nullcontext()

    def stop_gradient(self, x: mx.array) -> mx.array:
        return mx.stop_gradient(x)

    def concat(self, xs: Sequence[mx.array], axis: int) -> mx.array:
        return mx.concatenate(list(xs), axis=axis)

    def stack(self, xs: Sequence[mx.array], axis: int) -> mx.array:
        return mx.stack(list(xs), axis=axis)

    def broadcast_to(self, x: mx.array, shape: Sequence[int]) -> mx.array:
        return mx.broadcast_to(x, tuple(shape))

    def take(self, x: mx.array, index: mx.array, axis: int) -> mx.array:
        return mx.take(x, index, axis=axis)

    def take_along_axis(self, x: mx.array, index: mx.array, axis: int) -> mx.array:
        return mx.take_along_axis(x, index, axis=axis)

    def where(self, cond: mx.array, x: Any, y: Any) -> mx.array:
        return mx.where(cond, x, y)

    def logsumexp(self, x: mx.array, axis: int) -> mx.array:
        return mx.logsumexp(x, axis=axis)

    def sigmoid(self, x: mx.array) -> mx.array:
        return mx.sigmoid(x)

    def maximum(self, x: mx.array, y: float) -> mx.array:
        return mx.maximum(x, y)

    def sum(self, x: mx.array, axis: int | None = None) -> mx.array:
        return mx.sum(x, axis=axis)

    def mean(self, x: mx.array, axis: int | None = None) -> mx.array:
        return mx.mean(x, axis=axis)

    def argmax(self, x: mx.array, axis: int) -> mx.array:
        return mx.argmax(x, axis=axis)

    def upcast(self, x: mx.array) -> mx.array:
        return x.astype(mx.float32) if x.dtype in HALF else x

    def gumbel(self, shape: Sequence[int], like: mx.array) -> mx.array:
        # mx.random draws no float64: draw in float32 (ample for sampling noise) and cast.
        return mx.random.gumbel(tuple(shape), dtype=mx.float32).astype(like.dtype)
