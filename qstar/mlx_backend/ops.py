"""The core's array interface for MLX, and float64-accurate versions of the few MLX functions that need them.

MLX's CPU `exp` is a float32 approximation for float64 too (ml-explore/mlx#3047), and so are `softmax`,
`logsumexp`, `sigmoid` and `mx.fast.scaled_dot_product_attention`, which are built on it: float64 results
would be float32-accurate. For float64 the functions below go through `power` and `tanh`, which MLX
computes in double; every other dtype uses MLX's own fast kernels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from qstar.core.ops import peak_rss_gb, reset_peak_rss, rss_gb

HALF = (mx.float16, mx.bfloat16)


def exp(x: mx.array) -> mx.array:
    return mx.power(math.e, x) if x.dtype == mx.float64 else mx.exp(x)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    if x.dtype != mx.float64:
        return mx.softmax(x, axis=axis)
    e = exp(x - mx.stop_gradient(mx.max(x, axis=axis, keepdims=True)))
    return e / mx.sum(e, axis=axis, keepdims=True)


def logsumexp(x: mx.array, axis: int) -> mx.array:
    if x.dtype != mx.float64:
        return mx.logsumexp(x, axis=axis)
    top = mx.stop_gradient(mx.max(x, axis=axis, keepdims=True))
    return mx.squeeze(top + mx.log(mx.sum(exp(x - top), axis=axis, keepdims=True)), axis=axis)


def sigmoid(x: mx.array) -> mx.array:
    # the tanh form never overflows, in the value or in its derivative
    return 0.5 * (1 + mx.tanh(0.5 * x)) if x.dtype == mx.float64 else mx.sigmoid(x)


def flat(tree: Any) -> dict[str, mx.array]:
    """A nested dict/list tree of arrays (parameters, gradients, optimizer state) by dotted name."""
    return dict(cast(list[tuple[str, mx.array]], tree_flatten(tree)))


def random_state() -> mx.array:
    """The calling thread's MLX random key, the array compiled functions take as their random input."""
    return cast(list[mx.array], mx.random.state)[0]


def from_numpy(x: np.ndarray, dtype: mx.Dtype | None = None) -> mx.array:
    """mx.array(x) keeps x's dtype, float64 included (which plain mx.array silently rounds to float32)."""
    if dtype is None and x.dtype == np.float64:
        dtype = mx.float64
    return mx.array(np.ascontiguousarray(x).reshape(x.shape), dtype=dtype)


class MLXOps:
    ranks = 1
    """Set by a data-parallel Session (mx.distributed under mlx.launch)."""

    def all_sum(self, x: mx.array) -> mx.array:
        return x if self.ranks == 1 else mx.distributed.all_sum(mx.stop_gradient(x))

    def asarray(self, x: np.ndarray, like: mx.array | None = None) -> mx.array:
        return from_numpy(x, None if like is None else like.dtype)

    def constant(self, x: np.ndarray) -> mx.array:
        return from_numpy(x)  # a compiled step takes the constants into its graph: nothing to keep

    def to_numpy(self, x: mx.array) -> np.ndarray:
        # numpy has no bfloat16: half precision comes back as float32, like the torch backend.
        return np.array(x.astype(mx.float32) if x.dtype in HALF else x)

    recording = True
    """False inside no_grad(): work that no gradient will reach (sampling), which activation checkpointing must
    leave alone (mx.checkpoint would drop the sampling loop's in-place cache writes)."""

    @contextmanager
    def no_grad(self) -> Iterator[None]:
        # MLX records nothing outside mx.grad/value_and_grad; the flag only tells the backbone what is differentiated.
        recording, self.recording = self.recording, False
        try:
            yield
        finally:
            self.recording = recording

    def stop_gradient(self, x: mx.array) -> mx.array:
        return mx.stop_gradient(x)

    def zeros(self, shape: Sequence[int], like: mx.array) -> mx.array:
        return mx.zeros(tuple(shape), dtype=like.dtype)

    def concat(self, xs: Sequence[mx.array], axis: int) -> mx.array:
        return mx.concatenate(list(xs), axis=axis)

    def stack(self, xs: Sequence[mx.array], axis: int) -> mx.array:
        return mx.stack(list(xs), axis=axis)

    def broadcast_to(self, x: mx.array, shape: Sequence[int]) -> mx.array:
        return mx.broadcast_to(x, tuple(shape))

    def transpose(self, x: mx.array, axes: Sequence[int]) -> mx.array:
        return x.transpose(*axes)

    def take(self, x: mx.array, index: mx.array, axis: int) -> mx.array:
        return mx.take(x, index, axis=axis)

    def take_along_axis(self, x: mx.array, index: mx.array, axis: int) -> mx.array:
        return mx.take_along_axis(x, index, axis=axis)

    def where(self, cond: mx.array, x: Any, y: Any) -> mx.array:
        return mx.where(cond, x, y)

    def logsumexp(self, x: mx.array, axis: int) -> mx.array:
        return logsumexp(x, axis)

    def log_softmax(self, x: mx.array, axis: int) -> mx.array:
        return x - mx.expand_dims(logsumexp(x, axis), axis)

    def softmax(self, x: mx.array, axis: int) -> mx.array:
        return softmax(x, axis)

    def sigmoid(self, x: mx.array) -> mx.array:
        return sigmoid(x)

    def silu(self, x: mx.array) -> mx.array:
        return x * sigmoid(x)

    def maximum(self, x: mx.array, y: float) -> mx.array:
        return mx.maximum(x, y)

    def sum(self, x: mx.array, axis: int | None = None) -> mx.array:
        return mx.sum(x, axis=axis)

    def mean(self, x: mx.array, axis: int | None = None) -> mx.array:
        return mx.mean(x, axis=axis)

    def argmax(self, x: mx.array, axis: int) -> mx.array:
        return mx.argmax(x, axis=axis)

    def sort(self, x: mx.array, axis: int) -> mx.array:
        return mx.sort(x, axis=axis)

    def cumsum(self, x: mx.array, axis: int) -> mx.array:
        return mx.cumsum(x, axis=axis)

    def searchsorted(self, sorted: mx.array, values: mx.array) -> mx.array:
        return mx.argmax(mx.where(sorted >= values[..., None], 1.0, 0.0), axis=-1)  # MLX has no searchsorted

    def exp(self, x: mx.array) -> mx.array:
        return exp(x)

    def cos(self, x: mx.array) -> mx.array:
        return mx.cos(x)

    def sin(self, x: mx.array) -> mx.array:
        return mx.sin(x)

    def power(self, base: float, exponents: np.ndarray) -> np.ndarray:
        return np.array(mx.power(mx.array(base, mx.float32), mx.array(exponents.astype(np.float32)), stream=mx.cpu))

    def einsum(self, subscripts: str, *operands: mx.array) -> mx.array:
        return mx.einsum(subscripts, *operands)

    def astype(self, x: mx.array, dtype: mx.Dtype) -> mx.array:
        return x.astype(dtype)

    def upcast(self, x: mx.array) -> mx.array:
        return x.astype(mx.float32) if x.dtype in HALF else x

    def all_finite(self, xs: Sequence[mx.array]) -> bool:
        return bool(mx.all(mx.stack([mx.all(mx.isfinite(x)) for x in xs])))

    def on_accelerator(self) -> bool:
        return mx.default_device().type == mx.gpu

    def device_name(self) -> str:
        return str(mx.default_device())

    def peak_memory_gb(self) -> float:
        return mx.get_peak_memory() / 1e9 if self.on_accelerator() else peak_rss_gb()

    def memory_gb(self) -> float:
        return mx.get_active_memory() / 1e9 if self.on_accelerator() else rss_gb()

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory() if self.on_accelerator() else reset_peak_rss()

    def synchronize(self) -> None:
        mx.synchronize()

    def uniform(self, shape: Sequence[int], like: mx.array) -> mx.array:
        # mx.random draws no float64: draw in float32 (ample for sampling noise) and cast. [0, 1) -> (0, 1)
        u = mx.random.uniform(shape=tuple(shape), dtype=mx.float32)
        return mx.maximum(u, float(np.finfo(np.float32).tiny)).astype(like.dtype)
