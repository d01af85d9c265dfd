"""The "paper" recipe reproduces the authors' own Quiet-STaR code on tiny-mistral-a (float64)."""

from __future__ import annotations

import json

import numpy as np
from helpers import shared_file
from safetensors.numpy import load_file

import qstar


def check_against_fixture(backend: str) -> None:
    root = shared_file("fixtures/reference/tiny-mistral-a")
    inputs = load_file(shared_file("fixtures/reference/tiny-mistral-a/inputs.safetensors"))
    expected = load_file(shared_file("fixtures/reference/tiny-mistral-a/expected.safetensors"))
    summary = json.loads(shared_file("fixtures/reference/tiny-mistral-a/expected.json").read_text())
    s = summary["settings"]
    m = qstar.load(
        str(root / "checkpoint"),
        backend=backend,
        dtype="float64",
        recipe="paper",
        thought_tokens=s["n_ahead"] - 3,
        lookahead=s["n_ahead_talk"],
        thoughts_per_position=s["n_passes"],
    )
    ids, thoughts = inputs["input_ids"], inputs["thought_tokens"]
    out = m.loss(ids, attention_mask=inputs["attention_mask"], thoughts=thoughts)

    for got, key in [(out.total, "loss"), (out.lm, "lm_loss"), (out.policy, "policy_loss")]:
        assert abs(got / summary[key] - 1) < 1e-6, key
    per_position = {"nll_base": out.nll_base, "advantage": out.advantage, "reward": out.reward}
    for j in range(1, s["n_ahead_talk"] + 1):
        per_position[f"nll_talk_{j}"] = out.nll_talk[j - 1]
        per_position[f"mixing_weight_{j}"] = out.mixing_weight[j - 1]
    for key, got in per_position.items():
        assert got.shape == expected[key].shape, key
        assert np.abs(got - expected[key]).max() < 1e-5, key
    assert int((out.advantage > 0).sum()) == summary["num_positive_advantages"]
    assert np.abs(m.logits(ids) - expected["logits_base"][:: s["n_passes"]]).max() < 1e-5

    grads = m.gradients(ids, attention_mask=inputs["attention_mask"], thoughts=thoughts)
    names = {k[len("grad.") :] for k in expected if k.startswith("grad.")}
    assert set(grads) == names
    for name in names:
        want = expected["grad." + name]
        assert grads[name].shape == want.shape, name
        assert np.linalg.norm(grads[name] - want) <= 1e-4 * np.linalg.norm(want), name


def test_paper_recipe_reproduces_reference_torch():
    check_against_fixture("torch")
