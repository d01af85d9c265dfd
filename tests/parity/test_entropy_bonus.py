"""The entropy bonus (recipe `entropy_bonus`): the policy's entropy of a thought token, written once in
qstar/core/losses.py, is the definition over the allowed ids; the loss subtracts the bonus times its mean over the
rewarded thoughts; one-pass and two-pass steps compute the same loss and gradients, as do both backends."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_ids, rel

import qstar
from qstar.core import losses
from qstar.core.backend import get

RECIPE = dict(thought_tokens=3, lookahead=2, thoughts_per_position=2, policy_weight=1.0)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_entropy_is_the_definition_over_the_allowed_ids(backend):
    ops = get(backend).make_ops()
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 3, 11))
    banned = np.zeros(11, bool)
    banned[[0, 7]] = True
    z = logits / 3.0
    z[..., banned] = -np.inf
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = -np.sum(np.where(banned, 0.0, p * np.log(np.where(banned, 1.0, p))), axis=-1)
    got = ops.to_numpy(losses.entropy(ops, ops.asarray(logits), ops.asarray(banned), 3.0))
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_the_bonus_is_subtracted_and_both_step_modes_agree(mixing_checkpoint, backend):
    """float64: total = lm + policy - bonus x policy_entropy, the same in one-pass and two-pass steps (loss to
    1e-12, gradients to 1e-10, as without the bonus), finite gradients although ids are banned, and gradients that
    differ from the run without the bonus."""
    ids = random_ids(2, 9, seed=6)
    models = {
        mode: qstar.load(
            str(mixing_checkpoint), backend=backend, dtype="float64", step_mode=mode, entropy_bonus=0.5, **RECIPE
        )
        for mode in ("one-pass", "two-pass")
    }
    terms = {mode: m.terms(ids, None, None, 8) for mode, m in models.items()}
    n = models["one-pass"].ops.to_numpy
    a, b = terms["one-pass"], terms["two-pass"]
    entropy = float(n(a.metrics["policy_entropy"]))
    assert 0 < entropy and float(n(a.total)) == pytest.approx(float(n(a.lm + a.policy)) - 0.5 * entropy, rel=1e-12)
    for key in ("total", "lm", "policy"):
        assert float(n(getattr(b, key))) == pytest.approx(float(n(getattr(a, key))), rel=1e-12), key
    assert float(n(b.metrics["policy_entropy"])) == pytest.approx(entropy, rel=1e-12)
    ga, gb = (m.gradients(ids, seed=8) for m in models.values())
    plain = qstar.load(str(mixing_checkpoint), backend=backend, dtype="float64", **RECIPE).gradients(ids, seed=8)
    for name, g in ga.items():
        assert np.isfinite(g).all() and rel(gb[name], g) < 1e-10, name
    assert rel(ga["thought.start"], plain["thought.start"]) > 1e-3


def test_the_bonus_agrees_across_backends(mixing_checkpoint):
    """The same given thoughts: the loss with the bonus and its entropy term agree to float32 rounding (the
    RMSNorm/RoPE steps, tests/parity/test_torch_vs_mlx.py)."""
    t, m = (
        qstar.load(str(mixing_checkpoint), backend=b, dtype="float64", entropy_bonus=0.5, **RECIPE)
        for b in ("torch", "mlx")
    )
    ids = random_ids(2, 9, seed=7)
    thoughts = t.sample_thoughts(ids, seed=11)
    want, got = t.terms(ids, None, thoughts, None), m.terms(ids, None, thoughts, None)
    for key in ("total", "lm", "policy"):
        assert float(m.ops.to_numpy(getattr(got, key))) == pytest.approx(
            float(t.ops.to_numpy(getattr(want, key))), rel=2e-6
        ), key
    assert float(m.ops.to_numpy(got.metrics["policy_entropy"])) == pytest.approx(
        float(t.ops.to_numpy(want.metrics["policy_entropy"])), rel=2e-6
    )
