"""Parallel thoughts equal the naive definition: the plain causal model run on x[:i+1] <start> t1..tk <end> x[i+1..]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_ids
from transformers import AutoModelForCausalLM

import qstar


@pytest.mark.parametrize("think_every", [1, 3])
def test_parallel_equals_naive(hf_checkpoint, think_every):
    model_type, path = hf_checkpoint
    k, A, P, B, L = 3, 3, 2, 2, 10
    m = qstar.load(
        str(path),
        backend="torch",
        dtype="float32",
        thought_tokens=k,
        lookahead=A,
        thoughts_per_position=P,
        sample_temperature=0.0,
        think_every=think_every,
    )
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    ids = random_ids(B, L, seed=3)
    thoughts = m.sample_thoughts(ids)  # greedy
    layout = m.layout(L)
    assert thoughts.shape == (B * P, layout.num_streams, k)

    net, rows = m.backbone, B * P
    with torch.no_grad():
        _, base_kv = net.base(torch.from_numpy(ids))
        start, end = net.thought_vectors()
        x = m.thinker().inputs(torch.from_numpy(ids), torch.from_numpy(thoughts), layout)
        h, _ = net.think(x, layout.steps(1, k + A + 1), base_kv, None)
        parallel = net.logits(h).numpy()  # (R, k+A+1, S, V)

        banned = m.banned
        for r in range(rows):
            b = r // P
            for n, i in enumerate(layout.streams):
                steps = [start] + [net.embed(torch.tensor(int(t))) for t in thoughts[r, n]] + [end]
                steps += [net.embed(torch.tensor(int(ids[b, i + m]) if i + m < L else 2)) for m in range(1, A)]
                seq = torch.cat([net.embed(torch.from_numpy(ids[b, : i + 1])), torch.stack(steps)])[None]
                naive = reference(inputs_embeds=seq).logits[0, i + 1 :].numpy()
                assert np.abs(parallel[r, :, n] - naive).max() < 1e-5, (model_type, r, i)
                greedy = np.where(banned, -np.inf, naive[:k]).argmax(-1)
                assert (greedy == thoughts[r, n]).all(), (model_type, r, i)
