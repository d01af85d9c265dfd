"""The PyTorch backend computes exactly what transformers computes for every supported model_type."""

from __future__ import annotations

import numpy as np
import torch
from helpers import random_ids
from transformers import AutoModelForCausalLM

import qstar


def test_logits_match_transformers(hf_checkpoint):
    model_type, path = hf_checkpoint
    ids = random_ids(2, 11)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    got = qstar.load(str(path), backend="torch", dtype="float32").logits(ids)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-5, model_type


def test_float64_logits_match_transformers_float64(hf_checkpoint):
    """float64 follows transformers' float32 RMSNorm/RoPE internals, so the match is near machine precision."""
    _, path = hf_checkpoint
    ids = random_ids(2, 9, seed=1)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa")
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    got = qstar.load(str(path), backend="torch", dtype="float64").logits(ids)
    assert np.abs(got - expected).max() < 1e-12
