"""The MLX backend reproduces the authors' golden numbers (tiny-mistral-a, float64, recorded thoughts forced).

MLX cannot follow transformers' float32 steps bit for bit (its float32 reductions and cos/sin round
differently from PyTorch's), so this is held to the README's "pure float64" tolerances."""

from __future__ import annotations

import json

import numpy as np
from helpers import shared_file
from safetensors.numpy import load_file

import qstar


def test_reference_fixture():
    checkpoint = shared_file("fixtures/reference/tiny-mistral-a/checkpoint")
    inputs = load_file(shared_file("fixtures/reference/tiny-mistral-a/inputs.safetensors"))
    expected = load_file(shared_file("fixtures/reference/tiny-mistral-a/expected.safetensors"))
    scalars = json.loads(shared_file("fixtures/reference/tiny-mistral-a/expected.json").read_text())
    m = qstar.load(
        str(checkpoint),
        backend="mlx",
        dtype="float64",
        recipe="paper",
        thought_tokens=3,
        lookahead=2,
        thoughts_per_position=2,
    )
    args = (inputs["input_ids"], inputs["attention_mask"], inputs["thought_tokens"])
    out = m.loss(*args)

    for got, key in [(out.total, "loss"), (out.lm, "lm_loss"), (out.policy, "policy_loss")]:
        assert abs(got - scalars[key]) / abs(scalars[key]) < 1e-6, key
    per_position = {"nll_base": out.nll_base, "advantage": out.advantage}
    for j in range(2):
        per_position[f"nll_talk_{j + 1}"] = out.nll_talk[j]
        per_position[f"mixing_weight_{j + 1}"] = out.mixing_weight[j]
    for key, got in per_position.items():
        assert got.shape == expected[key].shape, key
        assert np.abs(got - expected[key]).max() < 1e-5, key

    grads = m.gradients(*args)
    assert sorted(grads) == sorted(k[len("grad.") :] for k in expected if k.startswith("grad."))
    for name, g in grads.items():
        want = expected["grad." + name]
        assert g.shape == want.shape, name
        assert np.linalg.norm(g - want) <= 1e-4 * np.linalg.norm(want), name
