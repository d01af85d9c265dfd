"""Sampling rules: a draw at a real temperature (<start>/<end> never drawn in a thought), and where its randomness
comes from: the backend's generator in training (`DeviceNoise`), or noise keyed by what the draw belongs to
(`KeyedNoise`: row, position, step) wherever a seed is given: evaluation, generation, serving, seeded losses. Both
draw by inverting the cumulative softmax at one uniform a draw (`invert_cdf`): a (..., V) Gumbel-max draw needs V
uniforms and two logarithms each, 9% of a CPU training step at the benchmark's L = 64 (docs/PERFORMANCE.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from qstar.core.ops import Array, Ops


@dataclass(frozen=True)
class Where:
    """What a draw belongs to, besides its row: the position of each draw (an integer array that broadcasts
    against the draws, e.g. (1, S) for every row's streams or (B,) for one draw a row) and the step (a thought's
    step s = 1..k; 0 for an emitted token)."""

    positions: np.ndarray
    step: int


class Noise(Protocol):
    """Where the randomness of a draw comes from."""

    def draw(self, ops: Ops, z: Array, where: Where | None) -> Array:
        """One token id per row of z (..., V), logits already scaled by 1/T, banned ids at -inf: a draw from
        softmax(z); `where` says what the draws belong to (None where the noise needs not know: DeviceNoise)."""


def invert_cdf(ops: Ops, z: Array, u: Array) -> Array:
    """The draw from softmax(z) (..., V) at the uniforms u (...) in (0, 1): the first token whose cumulative
    probability reaches u times the total. u > 0 skips the tokens of probability 0 (banned ids) and u < 1 keeps the
    index below V."""
    cdf = ops.cumsum(ops.softmax(z, axis=-1), axis=-1)
    return ops.searchsorted(cdf, u * cdf[..., -1])


class DeviceNoise:
    """Uniforms from the backend's own random state: what training draws with (one generator per process, saved
    with every checkpoint, captured whole by a compiled sampling loop)."""

    def draw(self, ops: Ops, z: Array, where: Where | None) -> Array:
        return invert_cdf(ops, z, ops.uniform(tuple(z.shape[:-1]), z))


M32 = 0xFFFFFFFF
MIX = 0x45D9F3B
"""A 32-bit integer mixing function's multiplier; below 2**27, so that every product of the hash stays below 2**63
in int64 arithmetic on any backend (no overflow, the same bits everywhere)."""


def mix(x: Any) -> Any:
    """A 32-bit integer hash of x in [0, 2**32) (an int, or a backend int64 array, elementwise)."""
    x = (((x >> 16) ^ x) * MIX) & M32
    x = (((x >> 16) ^ x) * MIX) & M32
    return (x >> 16) ^ x


def row_key(seed: int | Sequence[int]) -> int:
    """A row's 32-bit key from its seed (an int, or a tuple such as (seed, request, sample))."""
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


class KeyedNoise:
    """Counter-based noise: the uniform of a draw is a hash of (its row's key, its position, its step), computed on
    the device, and the token is drawn by inverting the cumulative softmax at it. A row's draws depend on nothing else:
    not on the rows beside it, their order or number, nor on which other positions draw, and every backend computes
    the same uniforms. Rows are keyed by their own seeds (`seeds`), or by (seed, row index) for a batch seeded as a
    whole (`seed`). Rows join and leave a running batch (`add`, `keep`); `rows` draws for some rows only."""

    def __init__(self, seeds: Sequence[int | Sequence[int]] = (), seed: int | None = None) -> None:
        self.keys, self.seed = [row_key(s) for s in seeds], seed

    def row_keys(self, rows: int) -> np.ndarray:
        """(rows,) int64 keys of the batch's rows."""
        keys = self.keys if self.seed is None else [row_key((self.seed, r)) for r in range(rows)]
        if len(keys) != rows:
            raise ValueError(f"noise for {rows} rows, but {len(keys)} row seeds")
        return np.asarray(keys, np.int64)

    def uniform(self, ops: Ops, shape: tuple[int, ...], where: Where, like: Array) -> Array:
        """Uniforms in (0, 1) of `shape` (rows first), in like's dtype, on the device."""
        keys = self.row_keys(shape[0]).reshape(shape[0], *[1] * (len(shape) - 1))
        key, position = ops.asarray(keys), ops.asarray(np.asarray(where.positions, np.int64))
        h = mix(key ^ mix(position ^ mix(where.step)))
        return (ops.astype(h >> 8, like.dtype) + 0.5) * 2.0**-24

    def draw(self, ops: Ops, z: Array, where: Where | None) -> Array:
        assert where is not None, "keyed noise draws for a position and a step"
        return invert_cdf(ops, z, self.uniform(ops, tuple(z.shape[:-1]), where, z))

    def rows(self, index: Sequence[int]) -> KeyedNoise:
        """The noise of the rows `index` of a batch keyed row by row."""
        chosen = KeyedNoise()
        chosen.keys = [self.keys[i] for i in index]
        return chosen

    def keep(self, index: Sequence[int]) -> None:
        self.keys = [self.keys[i] for i in index]

    def add(self, seeds: Sequence[int | Sequence[int]]) -> None:
        self.keys += [row_key(s) for s in seeds]


def banned_mask(vocab_size: int, banned_ids: Sequence[int]) -> np.ndarray:
    """(V,) bool, True for ids that may never be sampled (the thought delimiters when they are in the vocab)."""
    mask = np.zeros(vocab_size, dtype=bool)
    ids = [i for i in banned_ids if 0 <= i < vocab_size]
    mask[ids] = True
    return mask


def nucleus(ops: Ops, logits: Array, top_k: int | None, top_p: float | None) -> Array:
    """Logits with everything outside the top-k tokens and outside the smallest set of probability >= top_p set
    to -inf (the kept tokens' relative probabilities are unchanged)."""
    z = logits
    if top_k is not None and top_k < z.shape[-1]:
        kth = ops.sort(z, axis=-1)[..., z.shape[-1] - top_k]
        z = ops.where(z < kth[..., None], float("-inf"), z)
    if top_p is not None and top_p < 1:
        ascending = ops.sort(z, axis=-1)
        probs = ops.exp(ascending - ops.logsumexp(ascending, axis=-1)[..., None])
        above = 1 - ops.cumsum(probs, axis=-1)  # mass of the tokens ranked strictly higher
        kept = ops.sum(ops.where(above < top_p, 1, 0), axis=-1)
        cut = ops.take_along_axis(ascending, (z.shape[-1] - kept)[..., None], axis=-1)
        z = ops.where(z < cut, float("-inf"), z)
    return z


def allowed(ops: Ops, logits: Array, banned: Array | None) -> Array:
    """Logits in at least float32 with the banned ids at -inf (banned None: nothing is banned)."""
    z = ops.upcast(logits)
    return z if banned is None else ops.where(banned, float("-inf"), z)


def scaled(z: Array, temperature: float) -> Array:
    """z / T, skipping the pass over z at T = 1; a product, a third of a division's time on the CPU."""
    return z if temperature == 1 else z * (1 / temperature)


def sample_tokens(
    ops: Ops, logits: Array, banned: Array | None, temperature: float, noise: Noise | None, where: Where | None
) -> Array:
    """One draw from softmax(logits / T) over the allowed ids, with `noise`'s randomness; T = 0 (or no noise) is
    greedy."""
    z = allowed(ops, logits, banned)
    if temperature == 0 or noise is None:
        return ops.argmax(z, axis=-1)
    return noise.draw(ops, scaled(z, temperature), where)
