"""Continuous batching (core.generate.Decoding, as the server drives it): rows that join a running batch mid-way,
with other sampling rules, and leave it when they end decode exactly what each decodes alone."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import backend_params

import qstar
from qstar.core.generate import Decoding, Sampling
from qstar.core.sampling import KeyedNoise

PROMPTS = [[5, 9, 2, 7, 1], [3, 3, 8, 4, 6, 2, 9, 1, 5], [7, 2, 4]]
SEEDS = [11, 12, 13]
SAMPLINGS = [Sampling(6, 0.8), Sampling(4, 0.0), Sampling(5, 1.2, top_k=5)]
JOINS = [0, 2, 2]
"""The step at which each row joins."""


@pytest.mark.parametrize("backend", backend_params("torch", "mlx"))
@pytest.mark.parametrize("thoughts", [True, False])
def test_rows_joining_and_leaving_decode_as_alone(backend, thoughts, mixing_checkpoint):
    m = qstar.load(str(mixing_checkpoint), backend=backend, dtype="float64")
    alone = []
    for prompt, seed, s in zip(PROMPTS, SEEDS, SAMPLINGS, strict=True):
        c = m.generate([prompt], s.max_tokens, thoughts, s.temperature, s.top_k, seed=[seed])[0]
        alone.append((c.tokens, c.thoughts, c.mixing_weights))

    decoding = Decoding(m.thinker(), thoughts, KeyedNoise())
    rows: list[int] = []  # which prompt each batch row decodes
    got: list[tuple[list[int], list[str], list[float]]] = [([], [], []) for _ in PROMPTS]
    for step in range(20):
        joining = [i for i, at in enumerate(JOINS) if at == step]
        if joining:
            decoding.admit([PROMPTS[i] for i in joining], [SEEDS[i] for i in joining])
            rows += joining
        if not rows:
            break
        emitted = decoding.step([SAMPLINGS[i] for i in rows])
        for r, i in enumerate(rows):
            got[i][0].append(int(emitted.tokens[r]))
            got[i][1].append(m.decode(emitted.thoughts[r]))
            if emitted.weights is not None:
                got[i][2].append(emitted.weights[r])
        staying = [r for r, i in enumerate(rows) if len(got[i][0]) < SAMPLINGS[i].max_tokens]
        decoding.keep(staying)
        rows = [rows[r] for r in staying]
        if rows:
            decoding.advance(emitted.tokens[staying], np.ones(len(rows), bool))
    for i in range(len(PROMPTS)):
        assert got[i][0] == alone[i][0], i
        assert got[i][1] == alone[i][1], i
        np.testing.assert_allclose(got[i][2], alone[i][2], rtol=1e-9, atol=1e-12)
    assert decoding.rows == 0 and decoding.cache == []
