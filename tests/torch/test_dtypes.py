"""Half precision runs the same computation with float32 softmax and loss accumulation."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_ids

import qstar


@pytest.mark.parametrize("dtype,tolerance", [("bfloat16", 3e-2), ("float16", 5e-3), ("float64", 1e-5)])
def test_loss_in_other_dtypes_tracks_float32(llama_checkpoint, dtype, tolerance):
    ids = random_ids(2, 10, seed=7)
    kwargs = dict(backend="torch", thought_tokens=2, lookahead=2, policy_weight=1.0)
    ref = qstar.load(str(llama_checkpoint), dtype="float32", **kwargs)
    thoughts = ref.sample_thoughts(ids, seed=0)
    want = ref.loss(ids, thoughts=thoughts)
    m = qstar.load(str(llama_checkpoint), dtype=dtype, **kwargs)
    got = m.loss(ids, thoughts=thoughts)
    assert abs(got.lm - want.lm) < tolerance * abs(want.lm)
    grads = m.gradients(ids, thoughts=thoughts)
    assert all(np.isfinite(g).all() for g in grads.values())
    assert m.parameters()["model.norm.weight"].dtype.is_floating_point


def test_unknown_dtype_is_rejected(llama_checkpoint):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        qstar.load(str(llama_checkpoint), backend="torch", dtype="int8")


def test_sequences_too_short_are_rejected(llama_checkpoint):
    m = qstar.load(str(llama_checkpoint), backend="torch", lookahead=4)
    with pytest.raises(ValueError, match="too short for lookahead=4"):
        m.loss(random_ids(1, 5))
