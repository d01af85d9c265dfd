"""Training samples thoughts inside the differentiable pass; that must compute exactly what scoring the same thoughts,
given, in one pass computes: same loss terms, same gradients, same draws as `sample_thoughts`; and with gradient
checkpointing (every layer call recomputed in backward, sampling steps included) the same gradients again."""

from __future__ import annotations

import pytest
from helpers import random_ids, rel

import qstar

RECIPE = dict(thought_tokens=3, lookahead=2, thoughts_per_position=2, policy_weight=1.0)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_sampled_path_equals_given_thoughts(mixing_checkpoint, backend):
    """float64; measured: identical loss terms, gradients within 2.2e-16 relative (the k single-token steps and the
    one-pass scoring sum the float64 matmuls in a different order). Checked at 1e-12."""
    m = qstar.load(str(mixing_checkpoint), backend=backend, dtype="float64", **RECIPE)
    ids = random_ids(2, 9, seed=2)
    sampled = m.loss(ids, seed=3)
    assert (sampled.thoughts == m.sample_thoughts(ids, seed=3)).all()
    given = m.loss(ids, thoughts=sampled.thoughts)
    assert given.policy != 0
    for key in ("total", "lm", "policy"):
        assert abs(getattr(sampled, key) - getattr(given, key)) <= 1e-12 * abs(getattr(given, key)), key
    for key in ("nll_talk", "mixing_weight"):
        for a, b in zip(getattr(sampled, key), getattr(given, key), strict=True):
            assert rel(a, b) < 1e-12, key
    assert rel(sampled.reward, given.reward) < 1e-12
    grads_sampled, grads_given = m.gradients(ids, seed=3), m.gradients(ids, thoughts=sampled.thoughts)
    for name, g in grads_given.items():
        assert rel(grads_sampled[name], g) < 1e-12, name


@pytest.mark.parametrize("step_mode", ["one-pass", "two-pass"])
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_grad_checkpoint_same_gradients(mixing_checkpoint, backend, step_mode):
    """Recomputing each layer in backward (thought sampling steps included) changes nothing: float64, checked at
    1e-12."""
    m = qstar.load(str(mixing_checkpoint), backend=backend, dtype="float64", step_mode=step_mode, **RECIPE)
    ids = random_ids(2, 9, seed=4)
    plain = m.gradients(ids, seed=5)
    m.backbone.grad_checkpoint = True
    recomputed = m.gradients(ids, seed=5)
    for name, g in plain.items():
        assert rel(recomputed[name], g) < 1e-12, name


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_sampling_steps_keep_each_steps_keys_once(mixing_checkpoint, backend):
    """The differentiable sampling steps extend a layer's stream cache by their own keys/values, one chunk a step,
    and concatenate inside the attention: what a recomputed layer keeps for backward is then k chunks of one step,
    not the k growing concatenations (O(k^2) memory)."""
    m = qstar.load(str(mixing_checkpoint), backend=backend, dtype="float64", step_mode="one-pass", **RECIPE)
    ids = random_ids(2, 9, seed=4)
    ops, k = m.ops, m.recipe.thought_tokens
    h_base, base_kv = m.backbone.base(ops.asarray(ids))
    layout = m.layout(ids.shape[1])
    rows = ids.shape[0] * m.recipe.thoughts_per_position
    *_, cache = m.thinker().sample_with_gradient(base_kv, rows, layout, None)
    assert len(cache) == m.config.num_layers
    for keys, values in cache:
        assert len(keys) == len(values) == k
        assert all(tuple(t.shape[:3]) == (rows, 1, len(layout.streams)) for t in (*keys, *values))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_two_pass_steps_compute_what_one_pass_steps_compute(mixing_checkpoint, backend):
    """Sampling without gradient on the detached base keys/values, then one differentiable pass over the given
    thoughts: the same thoughts for the same noise, and the same loss terms and gradients (float64; checked at 1e-12
    for the loss, 1e-10 for gradients)."""
    one = qstar.load(str(mixing_checkpoint), backend=backend, dtype="float64", step_mode="one-pass", **RECIPE)
    two = qstar.load(str(mixing_checkpoint), backend=backend, dtype="float64", step_mode="two-pass", **RECIPE)
    ids = random_ids(2, 9, seed=6)
    a, b = one.loss(ids, seed=8), two.loss(ids, seed=8)
    assert (a.thoughts == b.thoughts).all() and a.policy != 0
    for key in ("total", "lm", "policy"):
        assert abs(getattr(a, key) - getattr(b, key)) <= 1e-12 * abs(getattr(a, key)), key
    assert rel(b.advantage, a.advantage) < 1e-12
    ga, gb = one.gradients(ids, seed=8), two.gradients(ids, seed=8)
    given = two.gradients(ids, thoughts=a.thoughts)
    for name, g in ga.items():
        assert rel(gb[name], g) < 1e-10 and rel(given[name], gb[name]) < 1e-12, name


def test_the_step_mode_is_checked():
    with pytest.raises(ValueError, match="unknown step mode 'three-pass'"):
        from qstar.core.thinker import check_step_mode

        check_step_mode("three-pass")
