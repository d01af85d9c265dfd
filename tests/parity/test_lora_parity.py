"""One adapter format for both backends: a torch adapter loads in MLX and back, and a LoRA/DoRA step computes the
same loss and adapter gradients on both (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_ids, rel
from safetensors.numpy import load_file

import qstar
from qstar.core.lora import WEIGHTS_FILE, LoraConfig


@pytest.fixture(scope="module", params=["lora", "dora"])
def adapter(request, mixing_checkpoint, tmp_path_factory):
    """A torch adapter on the last layer with random lora_b (so that it matters), saved in float64."""
    m = qstar.load(str(mixing_checkpoint), backend="torch", dtype="float64")
    m.add_adapters(LoraConfig(request.param, num_layers=1, rank=2, scale=2.0))
    rng = np.random.default_rng(9)
    with torch.no_grad():
        for name, p in m.parameters().items():
            if name.endswith(".lora_b"):
                p.copy_(torch.from_numpy(rng.normal(0, 0.1, tuple(p.shape))))
    return m.save_adapter(tmp_path_factory.mktemp(request.param) / "adapter")


def test_a_lora_step_agrees_across_backends(adapter):
    t = qstar.load(str(adapter), backend="torch", dtype="float64")
    m = qstar.load(str(adapter), backend="mlx", dtype="float64")
    ids = random_ids(2, 9, seed=7)
    thoughts = t.sample_thoughts(ids, seed=11)
    assert rel(m.logits(ids), t.logits(ids)) < 2e-6  # the float32 RMSNorm/RoPE steps (test_torch_vs_mlx.py)
    a, b = m.loss(ids, thoughts=thoughts), t.loss(ids, thoughts=thoughts)
    for name in ("total", "lm", "policy"):
        assert abs(getattr(a, name) - getattr(b, name)) <= 2e-6 * abs(getattr(b, name)), name
    ga, gb = m.gradients(ids, thoughts=thoughts), t.gradients(ids, thoughts=thoughts)
    assert sorted(ga) == sorted(gb) and any(k.endswith("lora_a") for k in gb)
    for name in gb:
        assert np.linalg.norm(gb[name]) > 0 and rel(ga[name], gb[name]) < 1e-5, (name, rel(ga[name], gb[name]))


def test_an_mlx_adapter_loads_back_in_torch(adapter, tmp_path):
    back = qstar.load(str(adapter), backend="mlx", dtype="float64").save_adapter(tmp_path / "back")
    first, second = load_file(str(adapter / WEIGHTS_FILE)), load_file(str(back / WEIGHTS_FILE))
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    ids = random_ids(2, 9, seed=3)
    t = qstar.load(str(back), backend="torch", dtype="float64")
    np.testing.assert_allclose(t.logits(ids), qstar.load(str(adapter), backend="torch", dtype="float64").logits(ids))


def test_mlx_fuses_to_what_torch_fuses(adapter):
    ids = random_ids(2, 9, seed=5)
    t = qstar.load(str(adapter), backend="torch", dtype="float64")
    m = qstar.load(str(adapter), backend="mlx", dtype="float64")
    want = m.logits(ids)
    t.fuse()
    m.fuse()
    assert rel(m.logits(ids), want) < 1e-12  # mlx-lm's fuse
    assert rel(m.logits(ids), t.logits(ids)) < 2e-6
    fused_t, fused_m = t.parameters(), m.parameters()
    assert fused_t.keys() == fused_m.keys()
    for name in fused_t:
        assert rel(np.array(fused_m[name]), fused_t[name].detach().numpy()) < 1e-12, name
