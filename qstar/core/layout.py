"""Positions and attention structure of the parallel thought streams, as small numpy arrays.

Every thinking position p ("stream") owns a thought. The token fed at thought step s (s >= 1) of
stream p has position id p + s; it sees the real tokens 0..p and its own stream's steps 1..s,
nothing else. The base tokens (step 0) use ordinary causal attention. Backends never build the
dense (K*L)^2 mask: they consume the two parts below, which together say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepGeometry:
    """Where a call's thought steps sit, as a backend's `think` consumes it. A leading axis of 1 is shared by every
    row; of B, it is per sequence (generation with left padding, one thought per row)."""

    positions: np.ndarray
    """(B|1, n, S) position ids."""
    base_mask: np.ndarray
    """(B|1, S, T) bool: base keys each stream may see."""
    own_mask: np.ndarray
    """(n, m) bool over the stream's own thought keys, steps 1..first+n-1."""


@dataclass(frozen=True)
class ThoughtLayout:
    seq_len: int
    """L, the number of real tokens."""
    streams: np.ndarray
    """(S,) sorted positions that think."""

    @classmethod
    def every(cls, seq_len: int, stride: int = 1) -> ThoughtLayout:
        return cls(seq_len, np.arange(0, seq_len, stride, dtype=np.int64))

    @property
    def num_streams(self) -> int:
        return len(self.streams)

    def causal_mask(self) -> np.ndarray:
        """(L, L) bool, True where base query i may see base key j (j <= i)."""
        i = np.arange(self.seq_len)
        return i[None, :] <= i[:, None]

    def base_mask(self) -> np.ndarray:
        """(S, L) bool, True where a thought token of stream p may see base key j (j <= p)."""
        return np.arange(self.seq_len)[None, :] <= self.streams[:, None]

    def step_positions(self, first_step: int, num_steps: int) -> np.ndarray:
        """(n, S) position ids of thought steps first_step..first_step+n-1 of every stream."""
        steps = np.arange(first_step, first_step + num_steps)
        return self.streams[None, :] + steps[:, None]

    @staticmethod
    def own_mask(first_step: int, num_steps: int, keys: int | None = None) -> np.ndarray:
        """(n, m) bool over a stream's own thought keys, steps 1..m (m = keys, default first_step+n-1): key step <=
        query step. m larger than the steps so far describes a preallocated cache whose later slots are unwritten."""
        q = np.arange(first_step, first_step + num_steps)
        k = np.arange(1, (keys or first_step + num_steps - 1) + 1)
        return k[None, :] <= q[:, None]

    def steps(self, first_step: int, num_steps: int, keys: int | None = None) -> StepGeometry:
        """The geometry of thought steps first_step..first_step+n-1 of every stream, shared by all rows (own keys:
        see own_mask)."""
        return StepGeometry(
            self.step_positions(first_step, num_steps)[None],
            self.base_mask()[None],
            self.own_mask(first_step, num_steps, keys),
        )

    def unrolled(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense form, for tests and reading: position ids (T,) and mask (T, T) of the unrolled sequence
        whose slot 0..L-1 holds the base tokens and slot L + (s-1)*S + n holds step s of stream n."""
        length, count = self.seq_len, self.num_streams
        pos = np.concatenate([np.arange(length), self.step_positions(1, num_steps).reshape(-1)])
        mask = np.zeros((len(pos), len(pos)), dtype=bool)
        mask[:length, :length] = self.causal_mask()
        own = self.own_mask(1, num_steps)
        for s in range(num_steps):
            rows = slice(length + s * count, length + (s + 1) * count)
            mask[rows, :length] = self.base_mask()
            for t in range(num_steps):
                if own[s, t]:
                    mask[rows, length + t * count : length + (t + 1) * count] = np.eye(count, dtype=bool)
        return pos, mask


def extend_mask(past: int, new: int, key_mask: np.ndarray | None) -> np.ndarray | None:
    """(B|1, n, T) bool for n tokens appended after `past` cached ones: causal, minus the keys key_mask (B, T) hides.
    None for a fresh sequence without padding (plain causal attention). A hidden (pad) query still sees itself,
    so no softmax row is empty and no NaN reaches the cache."""
    if past == 0 and key_mask is None:
        return None
    query, key = np.arange(past, past + new)[:, None], np.arange(past + new)[None, :]
    visible = (key <= query)[None] & (True if key_mask is None else key_mask[:, None, :])
    return visible | (key == query)[None]
