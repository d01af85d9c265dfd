"""MLX backend specifics: half precision, saving and reloading, weight and device errors, Gumbel noise."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_ids
from mlx_lm.utils import load_model
from safetensors.numpy import load_file, save_file

import qstar
from qstar.mlx_backend.ops import MLXOps

RECIPE = dict(thought_tokens=2, lookahead=2, thoughts_per_position=2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(llama_checkpoint, dtype):
    ids = random_ids(2, 8)
    m = qstar.load(str(llama_checkpoint), backend="mlx", dtype=dtype, **RECIPE)
    full = qstar.load(str(llama_checkpoint), backend="mlx", dtype="float32", **RECIPE).logits(ids)
    logits = m.logits(ids)
    assert logits.dtype == np.float32
    assert np.linalg.norm(logits - full) < 2e-2 * np.linalg.norm(full)
    thoughts = m.sample_thoughts(ids)  # MLX's own Gumbel noise
    assert thoughts.shape == (4, 8, 2) and not np.isin(thoughts, [m.info.start_id, m.info.end_id]).any()
    assert np.isfinite(m.loss(ids, thoughts=thoughts).total)
    grads = m.gradients(ids, thoughts=thoughts)
    assert sorted(grads) == sorted(m.parameters())
    assert all(np.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_save_and_reload(llama_checkpoint, tmp_path, dtype):
    """float64 goes through numpy (mx.save_safetensors writes none); both backends and mlx-lm read the result."""
    ids = random_ids(1, 8)
    m = qstar.load(str(llama_checkpoint), backend="mlx", dtype=dtype, **RECIPE)
    saved = m.save(tmp_path / "out")
    again = qstar.load(str(saved), backend="mlx", dtype=dtype)
    assert again.recipe == m.recipe
    np.testing.assert_array_equal(again.logits(ids), m.logits(ids))
    t = qstar.load(str(saved), backend="torch", dtype=dtype, device="cpu")
    torch_params = t.parameters()
    for name, value in m.parameters().items():
        np.testing.assert_array_equal(t.ops.to_numpy(torch_params[name]), m.ops.to_numpy(value))
    if dtype == "bfloat16":  # mlx-lm reads no float64; the extras live outside its (strict) files
        reference, _ = load_model(saved)
        expected = np.array(reference(mx.array(ids)).astype(mx.float32))
        np.testing.assert_allclose(m.logits(ids), expected, atol=1e-2)


def test_weight_errors(llama_checkpoint, tmp_path):
    weights = load_file(llama_checkpoint / "model.safetensors")
    for case, change, message in [
        ("missing", lambda w: w.pop("model.norm.weight"), "missing \\['model.norm.weight'\\]"),
        ("unexpected", lambda w: w.update(extra=np.zeros(3, np.float32)), "unexpected \\['extra'\\]"),
        ("shape", lambda w: w.update({"model.norm.weight": np.ones(5, np.float32)}), "has shape \\(5,\\)"),
    ]:
        path = shutil.copytree(llama_checkpoint, tmp_path / case)
        broken = dict(weights)
        change(broken)
        save_file(broken, path / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            qstar.load(str(path), backend="mlx")


def test_device_errors(llama_checkpoint):
    with pytest.raises(ValueError, match="unknown MLX device"):
        qstar.load(str(llama_checkpoint), backend="mlx", device="cuda")
    with pytest.raises(ValueError, match="float64 only on the CPU|no GPU"):
        qstar.load(str(llama_checkpoint), backend="mlx", dtype="float64", device="gpu")


def test_uniform_noise():
    like = mx.zeros((1,), dtype=mx.float64)
    u = MLXOps().uniform((20000,), like)
    assert u.dtype == mx.float64
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
