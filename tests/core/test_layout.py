"""The split layout (causal base part + own-stream part) equals a brute-force statement of the attention rule."""

from __future__ import annotations

import numpy as np
import pytest

from qstar.core.layout import ThoughtLayout


def brute_force(length: int, streams: list[int], steps: int) -> tuple[np.ndarray, np.ndarray]:
    slots = [(0, j) for j in range(length)] + [(s, p) for s in range(1, steps + 1) for p in streams]
    pos = np.array([p + s for s, p in slots])
    mask = np.zeros((len(slots), len(slots)), bool)
    for a, (s, p) in enumerate(slots):
        for b, (t, q) in enumerate(slots):
            if t == 0:
                mask[a, b] = q <= p  # real tokens x_0..x_p (causal for base queries too)
            else:
                mask[a, b] = s >= 1 and q == p and t <= s  # own stream, steps 1..s
    return pos, mask


@pytest.mark.parametrize("length,stride,steps", [(1, 1, 1), (5, 1, 4), (9, 2, 6), (12, 5, 3)])
def test_unrolled_matches_brute_force(length, stride, steps):
    layout = ThoughtLayout.every(length, stride)
    pos, mask = layout.unrolled(steps)
    want_pos, want_mask = brute_force(length, list(range(0, length, stride)), steps)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(mask, want_mask)


def test_incremental_own_mask_is_a_slice_of_the_full_one():
    """Sampling step by step with a cache sees exactly the rows of the one-pass mask."""
    full = ThoughtLayout.own_mask(1, 7)
    for first in range(1, 8):
        for n in range(1, 8 - first + 1):
            np.testing.assert_array_equal(
                ThoughtLayout.own_mask(first, n), full[first - 1 : first - 1 + n, : first - 1 + n]
            )


def test_positions_of_thought_steps():
    layout = ThoughtLayout.every(4)
    np.testing.assert_array_equal(layout.step_positions(2, 2), [[2, 3, 4, 5], [3, 4, 5, 6]])
