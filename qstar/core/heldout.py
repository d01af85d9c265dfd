"""Held-out NLL with and without thoughts, token by token, on any text and any checkpoint, without training: what
`qstar inspect` shows and sums up, and the instrument of the real-model study (benchmarks/real_effect.py).

Each document is scored on its own on the inference path (`QStarModel.next_token_logits`): at every position t, the
NLL of token t+1 without a thought (`nll_base`) and after the thought sampled there, mixed by the mixing head
(`nll_talk`), the mixing weight, and that thought. Three views of the gain nll_base - nll_talk:
- every token;
- the hard tokens the text marks (data.hard_mask: the synthetic corpus's answers, GSM8K's final answer after `####`),
  the paper's teacher-forced answer metric;
- the hardest tokens: the top `hardest` share of the tokens by the NLL a reference model (the untrained one) gives
  them, the paper's "thinking helps the difficult tokens".
A content control keeps the thought's computation but not its content: the same positions think, through the same
steps, but the thought is a random (or fixed) token sequence; a gain that survives it comes from the extra
computation, not from what the thoughts say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qstar.core.data import hard_mask
from qstar.core.model import QStarModel

CONTROLS = ("none", "random", "fixed")


@dataclass
class Scored:
    """One document; arrays over its n - 1 predicted tokens (position t predicts token t + 1)."""

    ids: list[int]
    nll_base: np.ndarray
    nll_talk: np.ndarray
    weight: np.ndarray
    thoughts: np.ndarray
    """(n - 1, k) the thought at each position."""
    hard: np.ndarray
    """(n - 1,) bool: the predicted token is hard."""


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] in float64, (n, V) and (n,) -> (n,)."""
    z = logits.astype(np.float64)
    top = z.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))[:, 0]
    return lse - z[np.arange(len(targets)), targets]


def control_thoughts(model: QStarModel, length: int, control: str, seed: int) -> np.ndarray | None:
    """(1, length, k) thoughts of no content: random ordinary tokens, or the recipe's init token repeated."""
    if control == "none":
        return None
    k = model.recipe.thought_tokens
    if control == "fixed":
        ids = model.info.token_ids(model.recipe.init_token) or [0]
        return np.resize(np.array(ids, np.int64), (1, length, k))
    allowed = np.flatnonzero(~model.banned)
    return np.random.default_rng(seed).choice(allowed, size=(1, length, k))


def score(
    model: QStarModel, documents: list[str], seed: int = 0, control: str = "none", max_tokens: int | None = None
) -> list[Scored]:
    """Every document through the inference path, the thoughts of document n drawn with seed + n; a document longer
    than `max_tokens` (or the model's context) keeps its end, where GSM8K's answer is."""
    if control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}: choose one of {', '.join(CONTROLS)}")
    if model.tokenizer is None:
        raise ValueError(f"{model.info.path} has no tokenizer files: scoring text needs them")
    limits = [n for n in (max_tokens, model.config.context) if n is not None]
    limit = min(limits) if limits else None
    out = []
    for n, text in enumerate(documents):
        encoded = model.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        if limit is not None and len(ids) > limit:
            ids, offsets = ids[-limit:], offsets[-limit:]
        chars = hard_mask(text)
        hard = np.array([any(chars[a:b]) for a, b in offsets[1:]], bool)
        given = control_thoughts(model, len(ids), control, seed + n)
        out_n = model.next_token_logits(np.array([ids]), seed=seed + n, thoughts=given)
        targets = np.array(ids[1:])
        out.append(
            Scored(
                ids=ids,
                nll_base=token_nll(out_n.plain[0, :-1], targets),
                nll_talk=token_nll(out_n.mixed[0, :-1], targets),
                weight=out_n.weight[0, :-1].astype(np.float64),
                thoughts=out_n.thoughts[0, :-1],
                hard=hard,
            )
        )
    return out


def plain_nll(model: QStarModel, documents: list[str], max_tokens: int | None = None) -> list[np.ndarray]:
    """Each document's next-token NLL without thoughts alone (a reference's ranking of the hardest tokens): one plain
    pass a document, the tokens score() keeps."""
    out = []
    for text in documents:
        ids = model.tokenizer(text)["input_ids"]
        limits = [n for n in (max_tokens, model.config.context) if n is not None]
        ids = ids[-min(limits) :] if limits else ids
        out.append(token_nll(model.logits(np.array([ids]))[0, :-1], np.array(ids[1:])))
    return out


def summary(
    scores: list[Scored],
    reference: list[np.ndarray] | None = None,
    hardest: float = 0.1,
    more: dict[str, list[np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Mean NLL without and with thoughts over every token, the hard ones, the `hardest` share by the reference's
    NLL without thought (its own where there is no reference), and any `more` views (a name and a (n - 1,) bool
    mask a document); and the mean mixing weight."""
    base, talk = np.concatenate([s.nll_base for s in scores]), np.concatenate([s.nll_talk for s in scores])
    hard = np.concatenate([s.hard for s in scores])
    ranking = np.concatenate(reference or [s.nll_base for s in scores])
    if len(ranking) != len(base):
        raise ValueError("the reference scored other tokens: score the same documents with the same max_tokens")
    top = np.argsort(-ranking, kind="stable")[: max(1, int(round(hardest * len(ranking))))]
    views = {"all": np.ones(len(base), bool), "hard": hard, "hardest": np.isin(np.arange(len(base)), top)}
    views.update({name: np.concatenate(masks) for name, masks in (more or {}).items()})
    weight = float(np.concatenate([s.weight for s in scores]).mean())
    out: dict[str, Any] = {"documents": len(scores), "mixing_weight": weight}
    for name, chosen in views.items():
        if chosen.any():
            out[name] = {
                "tokens": int(chosen.sum()),
                "nll_base": float(base[chosen].mean()),
                "nll_talk": float(talk[chosen].mean()),
                "gain": float((base[chosen] - talk[chosen]).mean()),
            }
    return out
