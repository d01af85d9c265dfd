"""Both noises draw a thought token by inverting the cumulative softmax at one uniform a draw (sampling.invert_cdf):
the draws must follow softmax(z / T) over the allowed ids on every backend, and never give a banned id (probability 0)
whatever the uniform, at either end of (0, 1)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from qstar.core import backend as backends
from qstar.core.sampling import DeviceNoise, KeyedNoise, Where, invert_cdf, sample_tokens

LOGITS = np.array([0.3, 2.0, -1.0, 1.2, 0.0, -0.5], np.float32)
BANNED = np.array([True, False, False, True, False, False])  # the first id and one inside
DRAWS = 40_000


def law(temperature: float) -> np.ndarray:
    z = np.where(BANNED, -np.inf, LOGITS / temperature)
    p = np.exp(z - z.max())
    return p / p.sum()


def seed_generator(backend: str) -> None:
    if backend == "torch":
        importlib.import_module("torch").manual_seed(0)
    else:
        importlib.import_module("mlx.core").random.seed(0)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("noise", ["device", "keyed"])
def test_draws_follow_the_softmax_over_the_allowed_ids(backend, noise):
    """40,000 draws at T = 2: every frequency within 5 standard errors of its probability, banned ids never."""
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    ops = backends.get(backend).make_ops(None)
    seed_generator(backend)
    z = ops.asarray(np.broadcast_to(LOGITS, (DRAWS, LOGITS.size)).copy())
    chosen = KeyedNoise(seed=7) if noise == "keyed" else DeviceNoise()
    where = Where(np.zeros((1,), np.int64), 1) if noise == "keyed" else None
    ids = ops.to_numpy(sample_tokens(ops, z, ops.asarray(BANNED), 2.0, chosen, where))
    frequency = np.bincount(ids, minlength=LOGITS.size) / DRAWS
    p = law(2.0)
    assert (frequency[BANNED] == 0).all()
    assert np.all(np.abs(frequency - p) <= 5 * np.sqrt(p * (1 - p) / DRAWS))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_the_uniforms_ends_never_give_a_banned_id(backend):
    """u at the smallest positive float32 picks the first allowed id, u just below 1 the last one."""
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    ops = backends.get(backend).make_ops(None)
    z = ops.asarray(np.where(BANNED | (np.arange(LOGITS.size) == LOGITS.size - 1), -np.inf, LOGITS)[None].repeat(2, 0))
    u = ops.asarray(np.array([np.finfo(np.float32).tiny, 1 - 2.0**-24], np.float32))
    assert ops.to_numpy(invert_cdf(ops, z, u)).tolist() == [1, 4]
