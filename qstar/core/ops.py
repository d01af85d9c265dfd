"""The small array interface the core algorithm is written against; each backend implements it once.

Arrays also support the operators and methods torch and MLX share: `+ - * / @`, indexing and
slicing, `.shape`, `.reshape(...)`, `.dtype`.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Array = Any


def rss_gb() -> float:
    """This process's resident set now, in GB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:
        return peak_rss_gb()


def peak_rss_gb() -> float:
    """Peak resident set of this process in GB since reset_peak_rss (Linux's VmHWM; elsewhere since the start:
    ru_maxrss is in bytes on macOS)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (1e9 if sys.platform == "darwin" else 1e6)
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kib * 1024 / 1e9


def reset_peak_rss() -> None:
    """Restart the peak resident set from the current one (Linux), so that a step's peak is its own and not the
    model load's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class Ops(Protocol):
    ranks: int
    """Processes of a data-parallel run (qstar/core/distributed.py); 1 alone."""

    def all_sum(self, x: Array) -> Array:
        """The sum of x over the ranks, not differentiated (x itself alone): a masked mean's global denominator."""

    def asarray(self, x: np.ndarray, like: Array | None = None) -> Array:
        """A backend array on the model's device, with the dtype of `like` when given, else x's own."""

    def constant(self, x: np.ndarray) -> Array:
        """asarray of a host constant (a mask, an index, a table), kept on the device where the backend can: the same
        geometry every step is then copied to the device once."""

    def to_numpy(self, x: Array) -> np.ndarray: ...

    def no_grad(self) -> AbstractContextManager[Any]:
        """Context in which nothing is recorded for differentiation."""

    def stop_gradient(self, x: Array) -> Array: ...

    def zeros(self, shape: Sequence[int], like: Array) -> Array:
        """A zero array of `shape` in like's dtype (and device)."""

    def concat(self, xs: Sequence[Array], axis: int) -> Array: ...

    def stack(self, xs: Sequence[Array], axis: int) -> Array: ...

    def broadcast_to(self, x: Array, shape: Sequence[int]) -> Array: ...

    def transpose(self, x: Array, axes: Sequence[int]) -> Array:
        """Permute the axes (numpy `transpose`)."""

    def take(self, x: Array, index: Array, axis: int) -> Array:
        """Select entries of `axis` by an integer index array (numpy `take` semantics)."""

    def take_along_axis(self, x: Array, index: Array, axis: int) -> Array: ...

    def where(self, cond: Array, x: Array, y: Array | float) -> Array: ...

    def logsumexp(self, x: Array, axis: int) -> Array: ...

    def log_softmax(self, x: Array, axis: int) -> Array:
        """x - logsumexp(x) (one fused pass where the backend has it, forward and backward)."""

    def softmax(self, x: Array, axis: int) -> Array: ...

    def sigmoid(self, x: Array) -> Array: ...

    def silu(self, x: Array) -> Array:
        """x * sigmoid(x)."""

    def maximum(self, x: Array, y: float) -> Array: ...

    def sum(self, x: Array, axis: int | None = None) -> Array: ...

    def mean(self, x: Array, axis: int | None = None) -> Array: ...

    def argmax(self, x: Array, axis: int) -> Array: ...

    def sort(self, x: Array, axis: int) -> Array:
        """Ascending."""

    def cumsum(self, x: Array, axis: int) -> Array: ...

    def searchsorted(self, sorted: Array, values: Array) -> Array:
        """Per row of `sorted` (..., n), nondecreasing, the index of its first entry >= the row's value (...); an index
        within 0..n-1 whatever the values (a non-finite row's is unspecified)."""

    def exp(self, x: Array) -> Array: ...

    def cos(self, x: Array) -> Array: ...

    def sin(self, x: Array) -> Array: ...

    def power(self, base: float, exponents: np.ndarray) -> np.ndarray:
        """base ** exponents in float32, as the framework computes it on the CPU (its reference models' RoPE
        frequencies come from this pow, which differs from numpy's in the last bit for some sizes)."""

    def einsum(self, subscripts: str, *operands: Array) -> Array: ...

    def astype(self, x: Array, dtype: Any) -> Array:
        """x in a backend dtype (a no-op when it has it already)."""

    def upcast(self, x: Array) -> Array:
        """x in float32 when it is a half-precision float, else unchanged (losses accumulate in >= fp32)."""

    def all_finite(self, xs: Sequence[Array]) -> bool:
        """Whether every entry of every array is finite (one device-to-host read)."""

    def on_accelerator(self) -> bool:
        """Whether the model computes on a GPU (CUDA, or Apple silicon through MLX)."""

    def device_name(self) -> str:
        """Where the model computes, for people ("cuda:0 (NVIDIA H100)", "cpu")."""

    def peak_memory_gb(self) -> float:
        """Peak memory of this process in GB since reset_peak_memory: the device's on an accelerator, else the
        resident set."""

    def memory_gb(self) -> float:
        """Memory in use now, in GB: the device's on an accelerator, else the resident set."""

    def reset_peak_memory(self) -> None: ...

    def synchronize(self) -> None:
        """Wait until the device has finished the work queued so far (for timings)."""

    def uniform(self, shape: Sequence[int], like: Array) -> Array:
        """Uniforms in (0, 1) in like's dtype, drawn with the backend's own random state."""
