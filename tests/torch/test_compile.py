"""The opt-in compiled thought steps (TrainConfig.compile) trace without graph breaks and compute what eager does.

Traced with the aot_eager backend (dynamo and AOTAutograd, no code generation), which checks the capture without
inductor's minutes of compiling; inductor's generated kernels are torch's to test."""

from __future__ import annotations

import numpy as np
import torch
from helpers import random_ids

import qstar


def loss_and_gradients(m: qstar.QStarModel, ids: np.ndarray) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
    terms = m.terms(ids, seed=2)
    terms.total.backward()
    grads = {name: p.grad.numpy().copy() for name, p in m.parameters().items()}
    m.backbone.zero_grad(set_to_none=True)
    return float(terms.total.detach()), terms.thoughts.numpy(), grads


def test_compiled_thought_steps_match_eager(mixing_checkpoint):
    from torch._dynamo.utils import counters

    ids = random_ids(2, 12, seed=4)
    m = qstar.load(str(mixing_checkpoint), backend="torch", thought_tokens=2, lookahead=2, policy_weight=1.0)
    want_total, want_thoughts, want_grads = loss_and_gradients(m, ids)
    torch._dynamo.reset()
    counters.clear()
    m.backbone.compile_thought_steps(backend="aot_eager")
    total, thoughts, grads = loss_and_gradients(m, ids)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    np.testing.assert_array_equal(thoughts, want_thoughts)
    assert abs(total - want_total) <= 1e-6 * abs(want_total)
    for name, g in want_grads.items():
        assert np.linalg.norm(grads[name] - g) <= 1e-5 * max(np.linalg.norm(g), 1e-8), name
