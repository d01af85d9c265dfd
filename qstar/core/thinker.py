"""Quiet-STaR's forward pass (the paper's Algorithm 1), written once for every backend.

1. The base tokens go through the network once (B rows, never copied per thought).
2. Thought steps push one token per stream at a time, attending to the base keys/values and the stream's own
   cached thought keys. During training the k sampling steps stay in the graph: their hidden states and the
   log-probabilities of the drawn tokens are what the policy gradient needs, so no thought step is computed twice.
3. The <end> token and the teacher-forced lookahead (A+1 steps) go through in one pass on top of that cache.
Given thoughts (tests, fixtures) take a single pass over all k+A+1 steps instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from qstar.core import losses
from qstar.core.layout import StepGeometry, ThoughtLayout
from qstar.core.ops import Array, Ops
from qstar.core.recipe import Recipe
from qstar.core.sampling import NoiseFn, sample_tokens

Cache = Any
"""Per-layer keys/values, opaque to the core."""


class Backbone(Protocol):
    """What a backend model offers the algorithm. Shapes: B rows, L tokens, R = B*P thought rows,
    S streams, n steps, D hidden, V vocabulary."""

    ops: Ops

    def embed(self, ids: Array) -> Array:
        """Token embeddings (..., D)."""

    def thought_vectors(self) -> tuple[Array, Array]:
        """Input vectors (D,) of <start> and <end>, embedding_scale already applied."""

    def base(self, ids: Array) -> tuple[Array, Cache]:
        """Causal pass over (B, L) ids: final-norm hidden (B, L, D) and every layer's keys/values (= extend from
        nothing)."""

    def think(self, x: Array, geometry: StepGeometry, base_kv: Cache, cache: Cache | None) -> tuple[Array, Cache]:
        """Thought steps for inputs x (R, n, S, D) placed by `geometry`: final-norm hidden (R, n, S, D) and the
        stream cache extended by these steps."""

    def extend(
        self, ids: Array, positions: np.ndarray | None, key_mask: np.ndarray | None, cache: Cache | None
    ) -> tuple[Array, Cache]:
        """Causal pass of (B, n) new tokens on top of `cache` (None: a fresh sequence): final-norm hidden (B, n, D)
        and the cache extended by them. positions (B|1, n) default to continuing the cache; key_mask (B, T_total)
        hides left padding."""

    def logits(self, h: Array) -> Array:
        """Logits (..., V)."""

    def mixing(self, base: Array, thought: Array) -> Array:
        """Raw mixing-head output (...) from concat[base, thought] hidden states (..., 2D)."""


@dataclass
class LossTerms:
    """Every quantity of one Quiet-STaR forward; rows ordered b0p0, b0p1, b1p0, ..."""

    total: Array
    lm: Array
    policy: Array
    """Before policy_weight."""
    nll_base: Array
    """(R, L-1)."""
    nll_talk: list[Array]
    """j = 1..A: (R, S_j), streams whose target p + j lies inside the sequence."""
    reward: Array
    """(R, S_r): raw reward of the rewarded streams (p < L - 1 - A)."""
    advantage: Array
    """(R, S_r)."""
    mixing_weight: list[Array]
    """j = 1..A: (R, S), every stream."""
    thoughts: Array
    """(R, S, k) the thought tokens used."""
    metrics: dict[str, Array]
    """Scalars for reports: NLL of the lookahead tokens without/with thought, mean mixing weight,
    share of positive advantages."""


def repeat_rows(ops: Ops, x: Array, times: int) -> Array:
    """(B, ...) -> (B*times, ...), each row repeated consecutively (the order of the thought rows)."""
    if times == 1:
        return x
    shape = tuple(x.shape)
    return ops.broadcast_to(x[:, None], (shape[0], times, *shape[1:])).reshape(shape[0] * times, *shape[1:])


def start_inputs(model: Backbone, rows: int, streams: int) -> Array:
    start, _ = model.thought_vectors()
    return model.ops.broadcast_to(start, (rows, 1, streams, start.shape[-1]))


def thought_steps(
    model: Backbone,
    recipe: Recipe,
    base_kv: Cache,
    rows: int,
    layout: ThoughtLayout,
    banned: Array | None,
    noise: NoiseFn | None,
    score: bool = True,
) -> tuple[Array, Array | None, Array, Cache]:
    """Sample every stream's thought, k steps of one token each (differentiable unless under no_grad). Returns the
    hidden states (R, k, S, D) of steps 1..k, the policy's log-probabilities (R, k, S) of the drawn tokens (R, S, k)
    (None unless `score`: sampling alone needs no pass over the logits for them), and the cache. Each step's
    (R, S, V) logits live only until its log-probability is taken."""
    ops, hidden, logprobs, tokens = model.ops, [], [], []
    x, cache = start_inputs(model, rows, layout.num_streams), None
    for step in range(1, recipe.thought_tokens + 1):
        if step > 1:
            x = model.embed(tokens[-1])[:, None]
        h, cache = model.think(x, layout.steps(step, 1), base_kv, cache)
        z = model.logits(h[:, 0])
        tokens.append(sample_tokens(ops, ops.stop_gradient(z), banned, recipe.sample_temperature, noise))
        hidden.append(h)
        if score:
            logprobs.append(losses.token_logprob(ops, z, tokens[-1], banned, recipe.policy_temperature))
    scored = ops.stack(logprobs, axis=1) if score else None
    return ops.concat(hidden, axis=1), scored, ops.stack(tokens, axis=-1), cache


def sample_thoughts(
    model: Backbone, recipe: Recipe, ids: Array, layout: ThoughtLayout, banned: Array | None, noise: NoiseFn | None
) -> Array:
    """Draw every stream's thought without gradient. Returns (R, S, k) ids."""
    with model.ops.no_grad():
        _, base_kv = model.base(ids)
        rows = ids.shape[0] * recipe.thoughts_per_position
        return thought_steps(model, recipe, base_kv, rows, layout, banned, noise, score=False)[2]


def columns(ops: Ops, x: Array, index: np.ndarray) -> Array:
    """x[:, index] for a (B, L, ...) array and a numpy index array of any shape."""
    return ops.take(x, ops.asarray(index.reshape(-1)), axis=1).reshape(x.shape[0], *index.shape, *x.shape[2:])


def future_ids(ops: Ops, ids: Array, layout: ThoughtLayout, count: int, pad_id: int) -> Array:
    """(B, count, S) true tokens x_(p+m), m = 1..count, of every stream p; pad past the end."""
    pad = ops.asarray(np.full((ids.shape[0], count), pad_id, np.int64), like=ids)
    index = layout.streams[None, :] + np.arange(1, count + 1)[:, None]
    return columns(ops, ops.concat([ids, pad], axis=1), index)


def thought_inputs(
    model: Backbone,
    recipe: Recipe,
    ids: Array,
    thoughts: Array,
    layout: ThoughtLayout,
    pad_id: int,
    first_step: int = 1,
) -> Array:
    """(R, n, S, D) inputs of thought steps first_step..k+A+1: <start>, t_1..t_k, <end>, x_(p+1)..x_(p+A-1), for
    first_step <= k+1. One embedding lookup for all thought tokens: each lookup's backward is a dense (V, D) array."""
    ops, P = model.ops, recipe.thoughts_per_position
    rows = ids.shape[0] * P
    _, end = model.thought_vectors()
    future = future_ids(ops, ids, layout, recipe.lookahead - 1, pad_id)  # teacher-forced after <end>
    drawn = ops.transpose(thoughts[:, :, max(first_step - 2, 0) :], (0, 2, 1))  # step s >= 2 feeds t_(s-1)
    return ops.concat(
        ([start_inputs(model, rows, layout.num_streams)] if first_step == 1 else [])
        + [
            model.embed(drawn),
            ops.broadcast_to(end, (rows, 1, layout.num_streams, end.shape[-1])),
            repeat_rows(ops, model.embed(future), P),
        ],
        axis=1,
    )


def quietstar_loss(
    model: Backbone,
    recipe: Recipe,
    ids: Array,
    valid: Array | None,
    thoughts: Array | None,
    layout: ThoughtLayout,
    banned: Array | None,
    pad_id: int,
    noise: NoiseFn | None = None,
) -> LossTerms:
    """Loss terms for (B, L) ids, with thoughts (R, S, k) sampled with `noise` (None: greedy) or given. `valid`
    (B, L), 1.0 for real tokens of a right-padded batch (None: no padding), keeps padded targets out of every mean.
    Only device arrays depend on the batch, so a backend can compile this once per shape."""
    ops, k, A, P = model.ops, recipe.thought_tokens, recipe.lookahead, recipe.thoughts_per_position
    length, streams = layout.seq_len, layout.streams

    h0, base_kv = model.base(ids)
    nll_base = losses.token_nll(ops, model.logits(h0[:, :-1]), ids[:, 1:])
    valid_rows = None if valid is None else repeat_rows(ops, valid, P)

    def weight(index: np.ndarray) -> Array | None:
        return None if valid_rows is None else columns(ops, valid_rows, index)

    if thoughts is None:
        h_think, logprobs, thoughts, cache = thought_steps(
            model, recipe, base_kv, ids.shape[0] * P, layout, banned, noise
        )
        x = thought_inputs(model, recipe, ids, thoughts, layout, pad_id, first_step=k + 1)
        h_rest, _ = model.think(x, layout.steps(k + 1, A + 1), base_kv, cache)
        ht = ops.concat([h_think, h_rest], axis=1)
    else:
        x = thought_inputs(model, recipe, ids, thoughts, layout, pad_id)
        ht, _ = model.think(x, layout.steps(1, recipe.thought_steps), base_kv, None)
        drawn = ops.transpose(thoughts, (0, 2, 1))
        logprobs = losses.token_logprob(ops, model.logits(ht[:, :k]), drawn, banned, recipe.policy_temperature)

    rewarded = int(np.sum(streams < length - 1 - A))
    nll_base_rows = repeat_rows(ops, nll_base, P)
    # All A lookahead predictions in one pass (one mixing-head call, one logits matmul): x_(p+j), j = 1..A, mixes the
    # base hidden state at p+j-1 with the thought's after step k+j. Streams with p + j >= L get a pad target and are
    # sliced off below, so they take no part in any loss.
    ahead = np.arange(1, A + 1)[:, None]
    hb = repeat_rows(ops, columns(ops, h0, (streams[None, :] + ahead - 1) % length), P)  # (R, A, S, D)
    hf = ht[:, k + 1 :]  # (R, A, S, D)
    w = losses.mix(ops, recipe, model.mixing(hb, hf))  # (R, A, S)
    mixed = hb + w[..., None] * (hf - hb)
    nll_ahead = losses.token_nll(ops, model.logits(mixed), repeat_rows(ops, future_ids(ops, ids, layout, A, pad_id), P))
    nll_talk, mixing_weight, talk_means, base_means, weight_means = [], [], [], [], []
    for j in range(1, A + 1):
        mixing_weight.append(w[:, j - 1])
        scored = int(np.sum(streams + j < length))
        nll = nll_ahead[:, j - 1, :scored]
        nll_talk.append(nll)
        talk_weight = weight(streams[:scored] + j)
        talk_means.append(losses.masked_mean(ops, nll, talk_weight))
        base_j = columns(ops, nll_base_rows, streams[:scored] + j - 1)
        base_means.append(losses.masked_mean(ops, ops.stop_gradient(base_j), talk_weight))
        weight_means.append(losses.masked_mean(ops, ops.stop_gradient(w[:, j - 1, :scored]), talk_weight))
    gains = [
        columns(ops, nll_base_rows, streams[:rewarded] + j - 1) - nll_talk[j - 1][:, :rewarded] for j in range(1, A + 1)
    ]
    reward = ops.stop_gradient(sum(gains[1:], gains[0]))
    advantage = losses.group_advantage(ops, reward, P, recipe.clamp_negative_advantage)
    reward_weight = weight(streams[:rewarded] + A)
    policy = losses.policy_loss(ops, advantage, logprobs[:, :, :rewarded], reward_weight)
    base_weight = None if valid is None else valid[:, 1:] * valid[:, :-1]
    lm = losses.lm_loss(recipe, losses.masked_mean(ops, nll_base, base_weight), talk_means)
    metrics = {
        "nll_base_lookahead": sum(base_means[1:], base_means[0]) / A,
        "nll_thought_lookahead": ops.stop_gradient(sum(talk_means[1:], talk_means[0]) / A),
        "mixing_weight": sum(weight_means[1:], weight_means[0]) / A,
        "positive_advantage": losses.masked_mean(ops, ops.where(advantage > 0, 1.0, 0.0), reward_weight),
    }
    return LossTerms(
        total=lm + recipe.policy_weight * policy,
        lm=lm,
        policy=policy,
        nll_base=nll_base_rows,
        nll_talk=nll_talk,
        reward=reward,
        advantage=advantage,
        mixing_weight=mixing_weight,
        thoughts=thoughts,
        metrics=metrics,
    )


def thoughtful_logits(
    model: Backbone, recipe: Recipe, ids: Array, thoughts: Array, layout: ThoughtLayout, pad_id: int
) -> tuple[Array, Array]:
    """Next-token logits (B, S, V) at every stream without and after its thought (B, S, k): the predictions of
    x_(p+1) that inference mixes (one thought per position)."""
    ops, single = model.ops, replace(recipe, lookahead=1, thoughts_per_position=1)
    h0, base_kv = model.base(ids)
    x = thought_inputs(model, single, ids, thoughts, layout, pad_id)
    ht = model.think(x, layout.steps(1, single.thought_steps), base_kv, None)[0][:, -1]
    hb = columns(ops, h0, layout.streams)
    w = losses.mix(ops, recipe, model.mixing(hb, ht))[..., None]
    return model.logits(hb), model.logits(hb + w * (ht - hb))
