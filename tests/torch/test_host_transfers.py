"""A training step talks to the host as little as a GPU needs (docs/PERFORMANCE.md, host transfers): per micro-batch,
the batch itself (its ids, and its padding mask where a row is padded) copied to the device; per step, one read (the
metrics with the gradient norm, which the non-finite guard needs before the update). Everything the layout derives
(indices, RoPE tables, masks, pads) is a device constant from the second step on. Counted on the CPU through the
backend's ops and every tensor read, for one-pass and two-pass steps."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_ids

import qstar
from qstar.core.data import Batch
from qstar.core.train_config import TrainConfig
from qstar.torch_backend.session import Session

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def counted(counts: Counter[str], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("step_mode", ["one-pass", "two-pass"])
def test_a_step_copies_its_batch_and_reads_once(llama_checkpoint, monkeypatch, step_mode, padded):
    recipe = dict(thought_tokens=2, lookahead=2)
    m = qstar.load(str(llama_checkpoint), backend="torch", step_mode=step_mode, **recipe)
    session = Session(m, TrainConfig(model=str(llama_checkpoint), recipe_overrides=recipe, grad_accumulation_steps=3))
    mask = np.ones((2, 10), bool)
    mask[1, 7:] = not padded
    batches = [Batch(random_ids(2, 10, seed=i), mask) for i in range(3)]
    session.step(batches, 1e-3)  # the first step places the layout's constants on the device
    counts: Counter[str] = Counter()
    with monkeypatch.context() as spying:
        for name in ("asarray", "to_numpy"):
            spying.setattr(m.ops, name, counted(counts, name, getattr(m.ops, name)))
        for name in READS:
            spying.setattr(torch.Tensor, name, counted(counts, name, getattr(torch.Tensor, name)))
        session.step(batches, 1e-3)
    assert dict(counts) == {"asarray": 3 * (2 if padded else 1), "tolist": 1}
