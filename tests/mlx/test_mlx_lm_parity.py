"""The MLX backend computes what mlx-lm's own model computes for every supported model_type."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from helpers import random_ids
from mlx_lm.utils import load_model

import qstar


def test_logits_match_mlx_lm(family_checkpoint):
    """OpenELM too: mlx-lm reads its hub-format checkpoint (fused projections, its own names) directly."""
    model_type, path = family_checkpoint
    ids = random_ids(2, 11)
    reference, _ = load_model(path)  # mistral runs as mlx-lm's llama (its MODEL_REMAPPING)
    expected = np.array(reference(mx.array(ids)))
    got = qstar.load(str(path), backend="mlx", dtype="float32").logits(ids)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-5 * max(1.0, np.abs(expected).max()), model_type
