"""Sampling rules for thought tokens: Gumbel-max at a real temperature, <start>/<end> never drawn."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from qstar.core.ops import Array, Ops

NoiseFn = Callable[[Sequence[int], Array], Array]
"""noise(shape, like): standard Gumbel noise of that shape, a backend array in like's dtype or a numpy array."""


def numpy_gumbel(seed: int) -> NoiseFn:
    """Noise drawn by numpy from one seed: the same thoughts on every backend for the same seed."""
    rng = np.random.default_rng(seed)
    return lambda shape, like: rng.gumbel(size=tuple(shape))


class RowGumbel:
    """Noise drawn per row, row r from a generator of its own seeded by seeds[r]: a row's draws do not depend on which
    other rows share its batch (every call's first axis is the batch row). Rows join and leave a running batch
    (`add`, `keep`); `rows` draws for some rows only, the others' generators untouched."""

    def __init__(self, seeds: Sequence[int | Sequence[int]]) -> None:
        self.generators = [np.random.default_rng(seed) for seed in seeds]

    def __call__(self, shape: Sequence[int], like: Array) -> np.ndarray:
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} rows, but {len(self.generators)} row seeds")
        return np.stack([g.gumbel(size=tuple(shape[1:])) for g in self.generators])

    def rows(self, index: Sequence[int]) -> RowGumbel:
        """The noise of the rows `index` (their generators shared, not copied)."""
        chosen = RowGumbel([])
        chosen.generators = [self.generators[i] for i in index]
        return chosen

    def keep(self, index: Sequence[int]) -> None:
        self.generators = [self.generators[i] for i in index]

    def add(self, seeds: Sequence[int | Sequence[int]]) -> None:
        self.generators += [np.random.default_rng(seed) for seed in seeds]


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
    """z / T, skipping the pass over z at T = 1."""
    return z if temperature == 1 else z / temperature


def sample_tokens(ops: Ops, logits: Array, banned: Array | None, temperature: float, noise: NoiseFn | None) -> Array:
    """argmax(logits / T + Gumbel) over allowed ids = one draw from softmax(logits / T); T = 0 is greedy."""
    z = allowed(ops, logits, banned)
    if temperature == 0 or noise is None:
        return ops.argmax(z, axis=-1)
    g = noise(tuple(z.shape), z)
    if isinstance(g, np.ndarray):
        g = ops.asarray(g, like=z)
    return ops.argmax(scaled(z, temperature) + g, axis=-1)
