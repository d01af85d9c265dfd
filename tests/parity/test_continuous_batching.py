"""Continuous batching (core.generate.Decoding, as the server drives it): rows that join a running batch mid-way,
with other sampling rules, penalties or none, and leave it when they end decode exactly what each decodes alone; the
penalties and logit_bias change the emitted tokens' logits as OpenAI defines them, never the thoughts'."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import backend_params

import qstar
from qstar.core.generate import Decoding, Sampling
from qstar.core.sampling import KeyedNoise

PROMPTS = [[5, 9, 2, 7, 1], [3, 3, 8, 4, 6, 2, 9, 1, 5], [7, 2, 4], [4, 4, 6, 8], [9, 1]]
SEEDS = [11, 12, 13, 14, 15]
SAMPLINGS = [
    Sampling(6, 0.8),
    Sampling(4, 0.0),
    Sampling(5, 1.2, top_k=5),
    Sampling(7, 0.9, presence_penalty=0.7, frequency_penalty=0.4, logit_bias={9: 1.5, 11: -3.0}),
    Sampling(6, 0.0, frequency_penalty=1.5),
]
JOINS = [0, 2, 2, 1, 2]
"""The step at which each row joins."""


@pytest.mark.parametrize("backend", backend_params("torch", "mlx"))
@pytest.mark.parametrize("thoughts", [True, False])
def test_rows_joining_and_leaving_decode_as_alone(backend, thoughts, mixing_checkpoint):
    m = qstar.load(str(mixing_checkpoint), backend=backend, dtype="float64")
    alone = []
    for prompt, seed, s in zip(PROMPTS, SEEDS, SAMPLINGS, strict=True):
        c = m.generate(
            [prompt],
            s.max_tokens,
            thoughts,
            s.temperature,
            s.top_k,
            seed=[seed],
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logit_bias=s.logit_bias,
        )[0]
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


@pytest.mark.parametrize("backend", backend_params("torch", "mlx"))
def test_penalties_and_logit_bias_change_the_emitted_draw_as_openai_defines_them(backend, mixing_checkpoint):
    """Greedy rows: each token is the argmax of the prediction plus logit_bias minus presence_penalty * (count > 0)
    minus frequency_penalty * count, counted over the row's tokens so far. A bias of +100 makes every emitted token
    that one, and no thought token: the thoughts draw as they would without it."""
    m = qstar.load(str(mixing_checkpoint), backend=backend, dtype="float64")
    rules = [Sampling(12, 0.0, presence_penalty=0.6, frequency_penalty=0.9, logit_bias={7: 0.8, 8: -1.0}), Sampling(4)]
    forced = Sampling(4, 0.0, logit_bias={20: 100.0})
    decoding = Decoding(m.thinker(), True, KeyedNoise())
    decoding.admit([PROMPTS[0], PROMPTS[1], PROMPTS[1]], [SEEDS[0], SEEDS[1], SEEDS[1]])
    counts: dict[int, int] = {}
    thoughts: list[list[list[int]]] = [[], []]
    for _ in range(4):
        emitted = decoding.step([rules[0], rules[1], forced])
        logits = m.ops.to_numpy(emitted.logits)[0]
        bias = np.zeros_like(logits)
        bias[[7, 8]] = [0.8, -1.0]
        for token, times in counts.items():
            bias[token] -= 0.6 + 0.9 * times
        assert int(emitted.tokens[0]) == int(np.argmax(logits + bias))
        counts[int(emitted.tokens[0])] = counts.get(int(emitted.tokens[0]), 0) + 1
        assert int(emitted.tokens[2]) == 20
        thoughts[0].append(emitted.thoughts[1])
        thoughts[1].append(emitted.thoughts[2])
        decoding.advance(emitted.tokens, np.ones(3, bool))
    assert thoughts[0][0] == thoughts[1][0] and not all(t == 20 for ts in thoughts[1] for t in ts)
