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
steps (the thoughts are given to the same inference path), but the thought is
- `random`: random ordinary tokens;
- `fixed`: the recipe's init token repeated;
- `shuffled`: the model's own thought at the same position of the next document (real content, another problem's);
- `perturbed`: the model's own thought with its first number (a digit, or a number word) changed to the next value
  (the right form, one wrong value); `perturbed_last`: its last number changed so (in a chain whose last value is
  the answer, the one a model reading its thought needs).
A gain that survives them comes from the extra computation, not from what the thoughts say; a gain that is the
thoughts' content beats every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qstar.core.data import hard_mask
from qstar.core.model import QStarModel

CONTROLS = ("none", "random", "fixed", "shuffled", "perturbed", "perturbed_last")
OWN_THOUGHTS = ("shuffled", "perturbed", "perturbed_last")
"""The controls made from the model's own sampled thoughts."""
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


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


def control_thoughts(
    model: QStarModel,
    count: int,
    control: str,
    seed: int,
    own: np.ndarray | None = None,
    other: np.ndarray | None = None,
) -> np.ndarray | None:
    """(count, k) thoughts of a control for a document's `count` thinking positions: random ordinary tokens, the
    recipe's init token repeated, or made from the model's own thoughts: `other` (the next document's, at its own
    thinking positions, in order, cycled where it has fewer) or `own` (this document's) with its first (or last)
    number changed."""
    if control == "none":
        return None
    k = model.recipe.thought_tokens
    if control == "fixed":
        return np.resize(init_ids(model), (count, k))
    if control == "shuffled":
        assert other is not None
        return other[np.arange(count) % len(other)]
    if control in ("perturbed", "perturbed_last"):
        assert own is not None
        return perturbed(own, number_tokens(model), last=control == "perturbed_last")
    allowed = np.flatnonzero(~model.banned)
    return np.random.default_rng(seed).choice(allowed, size=(count, k))


def init_ids(model: QStarModel) -> np.ndarray:
    """The ids of the recipe's init token (what <start> and <end> start as)."""
    return np.array(model.info.token_ids(model.recipe.init_token) or [0], np.int64)


def number_tokens(model: QStarModel) -> dict[int, int]:
    """Token id -> the id of the same number one higher (nine -> zero), for the tokens that read as one number: a
    digit or a number word (lower case or capitalised), with or without one leading space; the counterpart keeps
    that form."""
    names = {**{str(n): (n, "digit") for n in range(10)}, **{w: (n, "word") for n, w in enumerate(NUMBER_WORDS)}}
    names |= {w.capitalize(): (n, "Word") for n, w in enumerate(NUMBER_WORDS)}
    found: dict[tuple[str, int], int] = {}  # (form: leading space and style, value) -> the first id of it
    for i in range(model.config.vocab_size):
        text = model.decode([i], special=True)
        body = text.removeprefix(" ")
        if body in names:
            value, style = names[body]
            found.setdefault((text[: len(text) - len(body)] + style, value), i)
    return {i: found[(form, (n + 1) % 10)] for (form, n), i in found.items() if (form, (n + 1) % 10) in found}


def perturbed(thoughts: np.ndarray, numbers: dict[int, int], last: bool = False) -> np.ndarray:
    """(n, k) thoughts with the first (or last) number token of each changed by `numbers` (number_tokens); a thought
    without one stays as it is."""
    out = thoughts.copy()
    for row in out:
        found = [j for j, t in enumerate(row) if int(t) in numbers]
        if found:
            j = found[-1] if last else found[0]
            row[j] = numbers[int(row[j])]
    return out


def score(
    model: QStarModel,
    documents: list[str],
    seed: int = 0,
    control: str = "none",
    max_tokens: int | None = None,
    hard_only: bool = False,
    batch_size: int = 16,
) -> list[Scored]:
    """Every document through the inference path, the thoughts of document n drawn with seed + n whatever the batch
    (documents of the same length go through together, up to `batch_size`) and whichever positions think (keyed
    noise); a document longer than `max_tokens` (or the model's context) keeps its end, where GSM8K's answer is.
    `hard_only`: only the positions that predict a hard token think (the others' prediction with thoughts is the
    one without, their weight 0 and thought -1), a measurement of the hard tokens alone at a fraction of the cost.
    The controls made from the model's own thoughts (OWN_THOUGHTS) draw them first, as control "none" does."""
    if control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}: choose one of {', '.join(CONTROLS)}")
    if model.tokenizer is None:
        raise ValueError(f"{model.info.path} has no tokenizer files: scoring text needs them")
    limits = [n for n in (max_tokens, model.config.context) if n is not None]
    limit = min(limits) if limits else None
    encoded = [encode(model, text, limit) for text in documents]
    thinking = [np.flatnonzero(hard) if hard_only else np.arange(len(ids) - 1) for ids, hard in encoded]
    own = [] if control not in OWN_THOUGHTS else thought_scores(model, encoded, thinking, seed, "none", [], batch_size)
    drawn = thought_scores(model, encoded, thinking, seed, control, [t for t, _, _, _ in own], batch_size)
    out = []
    for (ids, hard), at, (thoughts, base, talk, weight) in zip(encoded, thinking, drawn, strict=True):
        nll_talk, w, t = base.copy(), np.zeros(len(base)), np.full((len(base), model.recipe.thought_tokens), -1)
        nll_talk[at], w[at], t[at] = talk, weight, thoughts
        out.append(Scored(ids=ids, nll_base=base, nll_talk=nll_talk, weight=w, thoughts=t, hard=hard))
    return out


def thought_scores(
    model: QStarModel,
    encoded: list[tuple[list[int], np.ndarray]],
    thinking: list[np.ndarray],
    seed: int,
    control: str,
    own: list[np.ndarray],
    batch_size: int,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per document: the thoughts (S, k) at its S thinking positions, the NLL of every next token without a thought
    (n - 1,), and at the thinking positions the NLL after the thought (S,) and the mixing weight (S,). A batch
    thinks at the union of its documents' positions (keyed noise: the others draw the same)."""
    out: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for group in batches([len(ids) for ids, _ in encoded], batch_size):
        ids = np.array([encoded[n][0] for n in group])
        plain = model.logits(ids)
        union = np.unique(np.concatenate([thinking[n] for n in group]))
        predicted = None
        if len(union):
            given = [controlled(model, control, seed + n, union, thinking[n], own, n) for n in group]
            thoughts = None if control == "none" else np.stack([g for g in given if g is not None])
            predicted = model.next_token_logits(ids, [seed + n for n in group], thoughts, positions=union)
        for row, n in enumerate(group):
            targets, at = ids[row, 1:], np.searchsorted(union, thinking[n])
            base = token_nll(plain[row, :-1], targets)
            if predicted is None:
                out[n] = (np.zeros((0, model.recipe.thought_tokens), np.int64), base, np.zeros(0), np.zeros(0))
                continue
            talk = token_nll(predicted.mixed[row, at], targets[thinking[n]])
            out[n] = (predicted.thoughts[row, at], base, talk, predicted.weight[row, at].astype(np.float64))
    return [out[n] for n in range(len(encoded))]


def controlled(
    model: QStarModel, control: str, seed: int, union: np.ndarray, mine: np.ndarray, own: list[np.ndarray], n: int
) -> np.ndarray | None:
    """(len(union), k) given thoughts of a document in a batch that thinks at `union`: the control's at the
    document's own thinking positions `mine`, the init token at the others (whose predictions are not read); None
    without a control."""
    given = control_thoughts(model, len(mine), control, seed, *neighbours(own, n))
    if given is None:
        return None
    full = np.resize(init_ids(model), (len(union), given.shape[1]))
    full[np.searchsorted(union, mine)] = given
    return full


def batches(lengths: list[int], size: int) -> list[list[int]]:
    """The indices of documents of equal length, in order, in groups of at most `size`."""
    groups: dict[int, list[list[int]]] = {}
    for n, length in enumerate(lengths):
        chunks = groups.setdefault(length, [[]])
        if len(chunks[-1]) == size:
            chunks.append([])
        chunks[-1].append(n)
    return [chunk for chunks in groups.values() for chunk in chunks]


def neighbours(own: list[np.ndarray], n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Document n's own sampled thoughts and the next document's (none where no control needs them)."""
    return (own[n], own[(n + 1) % len(own)]) if own else (None, None)


def encode(model: QStarModel, text: str, limit: int | None) -> tuple[list[int], np.ndarray]:
    """A document's ids (its last `limit`) and, per predicted token, whether it is hard (data.hard_mask)."""
    encoded = model.tokenizer(text, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if limit is not None and len(ids) > limit:
        ids, offsets = ids[-limit:], offsets[-limit:]
    chars = hard_mask(text)
    return ids, np.array([any(chars[a:b]) for a, b in offsets[1:]], bool)


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
