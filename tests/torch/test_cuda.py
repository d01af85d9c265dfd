"""The CUDA subset: the torch backend on a GPU computes what it computes on the CPU and trains in bfloat16.

Skipped without a CUDA device (this CI machine has none); a lent GPU runs it through benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_ids
from transformers import AutoModelForCausalLM

import qstar
from qstar.core.train_config import TrainConfig
from qstar.core.trainer import Batch
from qstar.torch_backend.train import Session as TorchSession

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
RECIPE = dict(thought_tokens=3, lookahead=2, policy_weight=1.0)


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 matmuls would round float32 to 10 mantissa bits; the comparisons below are of float32 arithmetic."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_logits_match_transformers_on_gpu(llama_checkpoint):
    ids = random_ids(2, 12, seed=3)
    m = qstar.load(str(llama_checkpoint), backend="torch", device=DEVICE)
    ref = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).to(DEVICE)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).to(DEVICE)).logits.cpu().numpy()
    assert np.abs(m.logits(ids) - want).max() < 1e-4


def test_loss_and_gradients_match_cpu(llama_checkpoint):
    ids = random_ids(2, 12, seed=5)
    cpu = qstar.load(str(llama_checkpoint), backend="torch", device="cpu", **RECIPE)
    gpu = qstar.load(str(llama_checkpoint), backend="torch", device=DEVICE, **RECIPE)
    thoughts = cpu.sample_thoughts(ids, seed=1)
    want, got = cpu.loss(ids, thoughts=thoughts), gpu.loss(ids, thoughts=thoughts)
    assert abs(got.total - want.total) <= 1e-5 * abs(want.total)
    assert np.abs(got.nll_base - want.nll_base).max() < 1e-4
    grads_cpu, grads_gpu = cpu.gradients(ids, thoughts=thoughts), gpu.gradients(ids, thoughts=thoughts)
    for name, g in grads_cpu.items():
        assert np.linalg.norm(grads_gpu[name] - g) <= 1e-4 * max(np.linalg.norm(g), 1e-8), name


def test_sampled_training_step_in_bfloat16(llama_checkpoint):
    cfg = TrainConfig(
        model=str(llama_checkpoint), dtype="bfloat16", max_seq_length=12, batch_size=2, recipe_overrides=RECIPE
    )
    m = qstar.load(str(llama_checkpoint), backend="torch", dtype="bfloat16", device=DEVICE, recipe=cfg.make_recipe())
    session = TorchSession(m, cfg)
    ids = random_ids(2, 12, seed=9)
    before = {k: v.detach().float().cpu().clone() for k, v in m.parameters().items()}
    metrics = session.step([Batch(ids, np.ones(ids.shape, bool))], 1e-3)
    assert all(np.isfinite(v) for v in metrics.values())
    moved = [k for k, v in m.parameters().items() if not torch.equal(v.detach().float().cpu(), before[k])]
    assert "model.layers.0.mlp.down_proj.weight" in moved and "model.embed_tokens.weight" in moved
    assert session.peak_memory() > 0
