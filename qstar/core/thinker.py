"""Quiet-STaR's forward pass (the paper's Algorithm 1), written once for every backend.

`Thinker.loss` reads as the algorithm, one named step each:
1. `model.base`: the text goes through the network once (B rows, never copied per thought);
2. `think`: every position p (a "stream") thinks `<start> t_1..t_k <end>`, then reads the true tokens
   x_(p+1)..x_(p+A-1) (teacher forcing). The k sampling steps push one token per stream at a time on top of the
   base keys/values and the stream's own cache;
3. `talk`: the mixing head blends the base prediction with the post-thought one, for each lookahead token j;
4. `lookahead_nll`: the NLL of the true tokens x_(p+j) under the mixed predictions;
5. `reward_and_advantage`: reward = the NLL the thought saved over the A lookahead tokens; advantage = reward minus
   the mean over the P thoughts of the same sequence and position;
6. the losses: LM loss on base and mixed predictions, REINFORCE on the thought tokens, and the report metrics.

Thoughts are drawn one of two ways (STEP_MODES): `sample_with_gradient` keeps the k sampling steps in the graph
(their hidden states and log-probabilities are what the policy gradient needs, so no step is computed twice);
`sample_without_gradient` draws them in `sampling_loop`, which a backend may capture whole, and the thoughts are then
scored as given thoughts are: one pass over all k+A+1 steps.

Shapes: B rows, L tokens, P thoughts per position, R = B*P thought rows (ordered b0p0, b0p1, b1p0, ...), S streams,
k thought tokens, A lookahead tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qstar.core import losses
from qstar.core.decoder import Backbone, Cache, Placed, StreamCache
from qstar.core.layout import ThoughtLayout
from qstar.core.ops import Array, Ops
from qstar.core.recipe import Recipe
from qstar.core.sampling import DeviceNoise, Noise, Where, sample_tokens, scaled

STEP_MODES = ("one-pass", "two-pass")
"""How a training step scores the thoughts it samples: "one-pass" keeps the k sampling steps in the differentiable
graph (fewest FLOPs, many small operations); "two-pass" samples without gradient on the base pass's detached
keys/values, then scores all k+A+1 steps in one differentiable pass (more FLOPs, few large operations). Same thoughts
for the same noise, same loss and gradients to float rounding."""


NO_THOUGHTS = "none"
"""The step mode of a run without thoughts (--no-thoughts): the language model alone (Thinker.plain_loss)."""


def check_step_mode(mode: str) -> str:
    if mode not in STEP_MODES:
        raise ValueError(f"unknown step mode {mode!r}: choose {' or '.join(STEP_MODES)} (--step-mode)")
    return mode


@dataclass
class LossTerms:
    """Every quantity of one Quiet-STaR forward; rows ordered b0p0, b0p1, b1p0, ..."""

    total: Array
    lm: Array
    policy: Array
    """Before policy_weight."""
    nll_base: Array
    """(R, L-1): NLL of x_(i+1) without thought."""
    nll_talk: list[Array]
    """j = 1..A: (R, S_j), NLL of x_(p+j) after the thought of stream p, for the streams whose target lies inside
    the sequence."""
    reward: Array
    """(R, S_r): raw reward of the rewarded streams (p < L - 1 - A)."""
    advantage: Array
    """(R, S_r)."""
    mixing_weight: list[Array]
    """j = 1..A: (R, S), every stream."""
    thoughts: Array
    """(R, S, k) the thought tokens used."""
    metrics: dict[str, Array]
    """Scalars for reports: mean NLL of the lookahead tokens without (nll_base) and with (nll_talk) the thought,
    mean mixing weight, share of positive advantages."""


@dataclass
class Padding:
    """Which entries of a right-padded batch are real: (R, L) 1.0/0.0 per thought row, None without padding."""

    rows: Array | None

    def at(self, ops: Ops, index: np.ndarray) -> Array | None:
        """Validity (R, *index.shape) of the tokens at positions `index` (None: all valid)."""
        return None if self.rows is None else columns(ops, self.rows, index)


@dataclass
class Lookahead:
    """The scored lookahead predictions j = 1..A: the NLL (R, S_j) of x_(p+j) after each stream's thought, and which of
    them are real tokens (None: all)."""

    nll: list[Array]
    valid: list[Array | None]
    _means: list[Array] | None = None

    def means(self, ops: Ops) -> list[Array]:
        """The masked mean NLL of each j, computed once (the LM loss and the report share them)."""
        if self._means is None:
            self._means = [losses.masked_mean(ops, nll, v) for nll, v in zip(self.nll, self.valid, strict=True)]
        return self._means


def repeat_rows(ops: Ops, x: Array, times: int) -> Array:
    """(B, ...) -> (B*times, ...), each row repeated consecutively (the order of the thought rows)."""
    if times == 1:
        return x
    shape = tuple(x.shape)
    return ops.broadcast_to(x[:, None], (shape[0], times, *shape[1:])).reshape(shape[0] * times, *shape[1:])


def columns(ops: Ops, x: Array, index: np.ndarray) -> Array:
    """x[:, index] for a (B, L, ...) array and a numpy index array of any shape (the layout's: a device constant)."""
    return ops.take(x, ops.constant(index.reshape(-1)), axis=1).reshape(x.shape[0], *index.shape, *x.shape[2:])


def mean_over(terms: list[Array]) -> Array:
    """The mean of a list of scalars, summed in order."""
    return sum(terms[1:], terms[0]) / len(terms)


def sampling_loop(
    model: Backbone,
    recipe: Recipe,
    x: Array,
    base_kv: Cache,
    placed: list[Placed],
    banned: Array | None,
    noise: Noise | None,
    positions: np.ndarray | None,
) -> Array:
    """The k sampling steps on device arrays alone: one stream cache per layer, (R, k, S, h, d), made at the start and
    written in place (step s fills slot s), every step the same shapes, a token drawn with the noise, nothing on the
    host between the first step and the last: a backend can capture the loop whole (Backbone.call_loop) where the
    noise is the device's generator (`positions`, the streams' positions that keyed noise needs, None then). Returns
    the (R, S, k) ids of the rows of x (R, 1, S, D), the <start> inputs."""
    ops, k = model.ops, recipe.thought_tokens
    rows, streams = x.shape[0], x.shape[2]
    caches = [
        tuple(ops.zeros((rows, k, streams, t.shape[1], t.shape[3]), t) for t in layer)  # (h, d) of (B, h, T, d)
        for layer in base_kv
    ]
    tokens: list[Array] = []
    for step in range(k):
        if step:
            x = model.embed(tokens[-1])[:, None]
        h, _ = model.think(x, placed[step], base_kv, caches, slot=step)
        z = ops.stop_gradient(model.logits(h[:, 0]))  # a draw has no gradient (MLX has no no_grad to say so)
        where = None if positions is None else Where(positions[None], step + 1)
        tokens.append(sample_tokens(ops, z, banned, recipe.sample_temperature, noise, where))
    return ops.stack(tokens, axis=-1)


@dataclass(frozen=True)
class Thinker:
    """What every step of the algorithm shares: the network, the recipe, the ids a thought never draws (`banned`,
    (V,) bool on the device, None when nothing is banned) and the id fed as a true token past a sequence's end."""

    model: Backbone
    recipe: Recipe
    banned: Array | None
    pad_id: int

    @property
    def ops(self) -> Ops:
        return self.model.ops

    def start_inputs(self, rows: int, streams: int) -> Array:
        """(R, 1, S, D): <start> at every stream."""
        start, _ = self.model.thought_vectors()
        return self.ops.broadcast_to(start, (rows, 1, streams, start.shape[-1]))

    def policy_logprobs(self, h: Array, tokens: Array) -> tuple[Array, Array | None]:
        """The policy's log-probabilities of drawn tokens (...) from the hidden states (..., D) that drew them, and its
        entropy there (...) where the recipe's entropy bonus needs it (else None). The LM head is linear, so 1/T
        scales the hidden states rather than the logits: V/D times fewer entries, forward and backward."""
        z = self.model.logits(scaled(h, self.recipe.policy_temperature))
        return losses.token_logprob(self.ops, z, tokens, self.banned, 1.0), self.entropy(z, 1.0)

    def entropy(self, logits: Array, temperature: float) -> Array | None:
        """The policy's entropy (...) from thought-step logits (..., V), or None without an entropy bonus."""
        return losses.entropy(self.ops, logits, self.banned, temperature) if self.recipe.entropy_bonus else None

    def sample_with_gradient(
        self, base_kv: Cache, rows: int, layout: ThoughtLayout, noise: Noise | None
    ) -> tuple[Array, Array, Array | None, Array, StreamCache | None]:
        """Sample every stream's thought inside the differentiable graph (one-pass steps), k steps of one token each.
        Returns the hidden states (R, k, S, D) of steps 1..k, the policy's log-probabilities (R, k, S) of the drawn
        tokens (R, S, k) and its entropies (R, k, S) or None, and the cache. Each step's (R, S, V) logits live only
        until its log-probability is taken."""
        ops, model, recipe = self.ops, self.model, self.recipe
        hidden: list[Array] = []
        logprobs: list[Array] = []
        entropies: list[Array] = []
        tokens: list[Array] = []
        cache: StreamCache | None = None
        x = self.start_inputs(rows, layout.num_streams)
        for step in range(1, recipe.thought_tokens + 1):
            if step > 1:
                x = model.embed(tokens[-1])[:, None]
            h, cache = model.think(x, layout.steps(step, 1), base_kv, cache)
            z = model.logits(h[:, 0])
            where = Where(layout.streams[None], step)
            tokens.append(
                sample_tokens(ops, ops.stop_gradient(z), self.banned, recipe.sample_temperature, noise, where)
            )
            hidden.append(h)
            logprobs.append(losses.token_logprob(ops, z, tokens[-1], self.banned, recipe.policy_temperature))
            if (h_z := self.entropy(z, recipe.policy_temperature)) is not None:
                entropies.append(h_z)
        entropy = ops.stack(entropies, axis=1) if entropies else None
        return ops.concat(hidden, axis=1), ops.stack(logprobs, axis=1), entropy, ops.stack(tokens, axis=-1), cache

    def sample_without_gradient(self, base_kv: Cache, rows: int, layout: ThoughtLayout, noise: Noise | None) -> Array:
        """Draw every stream's thought without gradient (two-pass steps, inference), with the geometry placed on the
        device before the loop. Returns (R, S, k) ids."""
        model, k = self.model, self.recipe.thought_tokens
        streams = None if noise is None or isinstance(noise, DeviceNoise) else layout.streams
        with self.ops.no_grad():
            placed = [model.place(layout.steps(step, 1, keys=k)) for step in range(1, k + 1)]
            x = self.start_inputs(rows, layout.num_streams)
            args = (model, self.recipe, x, base_kv, placed, self.banned, noise, streams)
            return model.call_loop(sampling_loop, *args, capturable=streams is None)

    def future_ids(self, ids: Array, layout: ThoughtLayout, count: int) -> Array:
        """(B, count, S) true tokens x_(p+m), m = 1..count, of every stream p; pad past the end."""
        ops = self.ops
        pad = ops.constant(np.full((ids.shape[0], count), self.pad_id, np.int64))
        index = layout.streams[None, :] + np.arange(1, count + 1)[:, None]
        return columns(ops, ops.concat([ids, pad], axis=1), index)

    def inputs(self, ids: Array, thoughts: Array, layout: ThoughtLayout, first_step: int = 1) -> Array:
        """(R, n, S, D) inputs of thought steps first_step..k+A+1: <start>, t_1..t_k, <end>, x_(p+1)..x_(p+A-1), for
        first_step <= k+1. One embedding lookup for all thought tokens: each lookup's backward is a dense (V, D)
        array."""
        ops, model, P = self.ops, self.model, self.recipe.thoughts_per_position
        rows = ids.shape[0] * P
        _, end = model.thought_vectors()
        drawn = ops.transpose(thoughts[:, :, max(first_step - 2, 0) :], (0, 2, 1))  # step s >= 2 feeds t_(s-1)
        parts = [model.embed(drawn), ops.broadcast_to(end, (rows, 1, layout.num_streams, end.shape[-1]))]
        if first_step == 1:
            parts.insert(0, self.start_inputs(rows, layout.num_streams))
        if self.recipe.lookahead > 1:  # teacher-forced after <end> (a quantized embedding takes no empty lookup)
            parts.append(repeat_rows(ops, model.embed(self.future_ids(ids, layout, self.recipe.lookahead - 1)), P))
        return ops.concat(parts, axis=1)

    def think(
        self, ids: Array, base_kv: Cache, thoughts: Array | None, layout: ThoughtLayout, noise: Noise | None
    ) -> tuple[Array, Array, Array | None, Array]:
        """Thought steps 1..k+A+1 of every stream. Returns their hidden states (R, k+A+1, S, D), the policy's
        log-probabilities (R, k, S) of the thought tokens and its entropies (R, k, S) (None without an entropy
        bonus), and the thoughts (R, S, k), sampled with `noise` (None: greedy) in the graph unless given."""
        ops, model, k, A = self.ops, self.model, self.recipe.thought_tokens, self.recipe.lookahead
        if thoughts is None:
            rows = ids.shape[0] * self.recipe.thoughts_per_position
            h_sampled, logprobs, entropy, thoughts, cache = self.sample_with_gradient(base_kv, rows, layout, noise)
            x = self.inputs(ids, thoughts, layout, first_step=k + 1)
            h_rest, _ = model.think(x, layout.steps(k + 1, A + 1), base_kv, cache)
            return ops.concat([h_sampled, h_rest], axis=1), logprobs, entropy, thoughts
        x = self.inputs(ids, thoughts, layout)
        h_thought, _ = model.think(x, layout.steps(1, self.recipe.thought_steps), base_kv, None)
        logprobs, entropy = self.policy_logprobs(h_thought[:, :k], ops.transpose(thoughts, (0, 2, 1)))
        return h_thought, logprobs, entropy, thoughts

    def talk(self, h_base: Array, h_thought: Array) -> tuple[Array, Array]:
        """The mixing head: weight w (...) of the thought side and the mixed hidden state (..., D),
        (1 - w) h_base + w h_thought. The LM head is linear, so this mixes the two predictions' logits too."""
        w = losses.mix(self.ops, self.recipe, self.model.mixing(h_base, h_thought))
        return w, h_base + w[..., None] * (h_thought - h_base)

    def lookahead_nll(self, ids: Array, h_base: Array, h_thought: Array, layout: ThoughtLayout) -> tuple[Array, Array]:
        """All A lookahead predictions at once (one mixing-head call, one logits matmul): x_(p+j), j = 1..A, mixes the
        base hidden state at p+j-1 with the thought's after step k+j. Returns the mixing weights and the NLLs of
        x_(p+j), both (R, A, S); streams with p + j >= L get a pad target, to be sliced off."""
        ops, A, P, length = self.ops, self.recipe.lookahead, self.recipe.thoughts_per_position, layout.seq_len
        ahead = np.arange(1, A + 1)[:, None]
        h_base_ahead = repeat_rows(ops, columns(ops, h_base, (layout.streams[None, :] + ahead - 1) % length), P)
        w, h_talk = self.talk(h_base_ahead, h_thought[:, self.recipe.thought_tokens + 1 :])
        targets = repeat_rows(ops, self.future_ids(ids, layout, A), P)
        return w, losses.token_nll(ops, self.model.logits(h_talk), targets)

    def reward_and_advantage(
        self, nll_base: Array, nll_talk: list[Array], layout: ThoughtLayout
    ) -> tuple[Array, Array]:
        """The reward of a thought is the NLL it saved over the A lookahead tokens (no gradient); its advantage
        subtracts the mean reward of the P thoughts of the same sequence and position. Both (R, S_r), the rewarded
        streams p < L - 1 - A. nll_base (R, L-1) per thought row, nll_talk per j (R, S_j)."""
        ops, streams, A = self.ops, layout.streams, self.recipe.lookahead
        rewarded = int(np.sum(streams < layout.seq_len - 1 - A))
        gains = [
            columns(ops, nll_base, streams[:rewarded] + j - 1) - nll_talk[j - 1][:, :rewarded] for j in range(1, A + 1)
        ]
        reward = ops.stop_gradient(sum(gains[1:], gains[0]))
        r = self.recipe
        return reward, losses.group_advantage(ops, reward, r.thoughts_per_position, r.clamp_negative_advantage)

    def loss(
        self,
        ids: Array,
        valid: Array | None,
        layout: ThoughtLayout,
        thoughts: Array | None = None,
        noise: Noise | None = None,
        step_mode: str = "one-pass",
    ) -> LossTerms:
        """Loss terms for (B, L) ids, with thoughts (R, S, k) sampled with `noise` (None: greedy) or given. `valid`
        (B, L), 1.0 for real tokens of a right-padded batch (None: no padding), keeps padded targets out of every
        mean. `step_mode` (STEP_MODES) says how sampled thoughts are scored: the same numbers either way; NO_THOUGHTS
        thinks not at all (plain_loss). Only device arrays depend on the batch, so a backend can compile this once
        per shape."""
        if step_mode == NO_THOUGHTS:
            return self.plain_loss(ids, valid, layout)
        ops, model, A, P = self.ops, self.model, self.recipe.lookahead, self.recipe.thoughts_per_position
        streams, padding = layout.streams, Padding(None if valid is None else repeat_rows(ops, valid, P))
        # 1. The text, once.
        h_base, base_kv = model.base(ids)
        if thoughts is None and check_step_mode(step_mode) == "two-pass":  # sample first, then score them as given
            detached = [(ops.stop_gradient(k), ops.stop_gradient(v)) for k, v in base_kv]
            thoughts = self.sample_without_gradient(detached, ids.shape[0] * P, layout, noise)
        nll_base = losses.token_nll(ops, model.logits(h_base[:, :-1]), ids[:, 1:])  # (B, L-1)
        nll_base_rows = repeat_rows(ops, nll_base, P)  # (R, L-1)
        # 2. Think (and read the teacher-forced lookahead tokens after <end>).
        h_thought, logprobs, entropy, thoughts = self.think(ids, base_kv, thoughts, layout, noise)
        # 3-4. Talk: mix, and score the A true next tokens.
        w, nll_ahead = self.lookahead_nll(ids, h_base, h_thought, layout)
        scored = [int(np.sum(streams + j < layout.seq_len)) for j in range(1, A + 1)]  # streams whose x_(p+j) exists
        nll_talk = [nll_ahead[:, j - 1, : scored[j - 1]] for j in range(1, A + 1)]
        talk = Lookahead(nll_talk, [padding.at(ops, streams[: scored[j - 1]] + j) for j in range(1, A + 1)])
        # 5. Reward and advantage.
        reward, advantage = self.reward_and_advantage(nll_base_rows, nll_talk, layout)
        rewarded_valid = padding.at(ops, streams[: reward.shape[1]] + A)
        # 6. Losses and metrics.
        policy = losses.policy_loss(ops, advantage, logprobs[:, :, : reward.shape[1]], rewarded_valid)
        base_valid = None if valid is None else valid[:, 1:] * valid[:, :-1]
        lm = losses.lm_loss(self.recipe, losses.masked_mean(ops, nll_base, base_valid), talk.means(ops))
        total = lm + self.recipe.policy_weight * policy
        metrics = self.metrics(nll_base_rows, talk, w, advantage, rewarded_valid, streams)
        if entropy is not None:  # the bonus, over the thoughts the policy loss weighs
            bonus = losses.masked_mean(ops, ops.mean(entropy[:, :, : reward.shape[1]], axis=1), rewarded_valid)
            total = total - self.recipe.entropy_bonus * bonus
            metrics["policy_entropy"] = ops.stop_gradient(bonus)
        return LossTerms(
            total=total,
            lm=lm,
            policy=policy,
            nll_base=nll_base_rows,
            nll_talk=nll_talk,
            reward=reward,
            advantage=advantage,
            mixing_weight=[w[:, j] for j in range(A)],
            thoughts=thoughts,
            metrics=metrics,
        )

    def plain_loss(self, ids: Array, valid: Array | None, layout: ThoughtLayout) -> LossTerms:
        """The language model alone, nothing sampled: the next-token loss over the text, and every report field as a
        thinking run's would read if each thought were ignored (the prediction with the thought is the one without,
        mixing weight, reward and advantage 0). The no-thought twin of a run (--no-thoughts): the same data, steps
        and seed, what training does without thinking. One row per sequence (P = 1)."""
        ops, model, A, k = self.ops, self.model, self.recipe.lookahead, self.recipe.thought_tokens
        streams, rows = layout.streams, ids.shape[0]
        h_base, _ = model.base(ids)
        nll_base = losses.token_nll(ops, model.logits(h_base[:, :-1]), ids[:, 1:])  # (B, L-1)
        base_valid = None if valid is None else valid[:, 1:] * valid[:, :-1]
        lm = losses.masked_mean(ops, nll_base, base_valid)
        padding = Padding(valid)
        scored = [int(np.sum(streams + j < layout.seq_len)) for j in range(1, A + 1)]
        nll_talk = [ops.stop_gradient(columns(ops, nll_base, streams[:n] + j - 1)) for j, n in enumerate(scored, 1)]
        talk = Lookahead(nll_talk, [padding.at(ops, streams[:n] + j) for j, n in enumerate(scored, 1)])
        rewarded = int(np.sum(streams < layout.seq_len - 1 - A))
        zero = ops.zeros((rows, layout.num_streams), h_base[:, :, 0])
        w = ops.broadcast_to(zero[:, None], (rows, A, layout.num_streams))
        return LossTerms(
            total=lm,
            lm=lm,
            policy=ops.sum(zero),
            nll_base=nll_base,
            nll_talk=nll_talk,
            reward=zero[:, :rewarded],
            advantage=zero[:, :rewarded],
            mixing_weight=[zero] * A,
            thoughts=ops.zeros((rows, layout.num_streams, k), ids),
            metrics=self.metrics(
                nll_base, talk, w, zero[:, :rewarded], padding.at(ops, streams[:rewarded] + A), streams
            ),
        )

    def metrics(
        self,
        nll_base_rows: Array,
        talk: Lookahead,
        w: Array,
        advantage: Array,
        rewarded_valid: Array | None,
        streams: np.ndarray,
    ) -> dict[str, Array]:
        """The report's scalars (no gradient): the mean NLL of the lookahead tokens without (nll_base) and with
        (nll_talk) the thought, the mean mixing weight, the share of positive advantages."""
        ops = self.ops
        scored = [(j, nll.shape[1], v) for j, (nll, v) in enumerate(zip(talk.nll, talk.valid, strict=True), 1)]
        nll_base_means = [
            losses.masked_mean(ops, ops.stop_gradient(columns(ops, nll_base_rows, streams[:n] + j - 1)), v)
            for j, n, v in scored
        ]
        weight_means = [losses.masked_mean(ops, ops.stop_gradient(w[:, j - 1, :n]), v) for j, n, v in scored]
        return {
            "nll_base": mean_over(nll_base_means),
            "nll_talk": ops.stop_gradient(mean_over(talk.means(ops))),
            "mixing_weight": mean_over(weight_means),
            "positive_advantage": losses.masked_mean(ops, ops.where(advantage > 0, 1.0, 0.0), rewarded_valid),
        }

    def next_token_hidden(
        self, ids: Array, base: tuple[Array, Cache], thoughts: Array | None, layout: ThoughtLayout, noise: Noise | None
    ) -> tuple[Array, Array, Array]:
        """The hidden states (B, S, D) that predict x_(p+1) at every stream without and after its thought (B, S, k),
        and the mixing weight (B, S): what inference mixes (one thought per position), before the LM head, so that a
        caller takes only the logits it needs. Thoughts given are read in one pass over their k + 2 steps; None:
        drawn with `noise` a step at a time on a growing cache, then t_k and <end> pushed on top of it (the sampling
        steps are not computed twice). `base` is the base pass of ids (model.base)."""
        ops, model, (h_base, base_kv) = self.ops, self.model, base
        single = replace(self, recipe=replace(self.recipe, lookahead=1, thoughts_per_position=1, entropy_bonus=0.0))
        k = single.recipe.thought_tokens
        if thoughts is None:
            *_, thoughts, cache = single.sample_with_gradient(base_kv, ids.shape[0], layout, noise)
            x = single.inputs(ids, thoughts, layout, first_step=k + 1)  # t_k, <end>
            h_end = model.think(x, layout.steps(k + 1, 2), base_kv, cache)[0][:, -1]
        else:
            x = single.inputs(ids, thoughts, layout)
            h_end = model.think(x, layout.steps(1, single.recipe.thought_steps), base_kv, None)[0][:, -1]
        h_base_streams = columns(ops, h_base, layout.streams)
        w, h_talk = self.talk(h_base_streams, h_end)
        return h_base_streams, h_talk, w

    def next_token_logits(
        self, ids: Array, base: tuple[Array, Cache], thoughts: Array, layout: ThoughtLayout
    ) -> tuple[Array, Array, Array]:
        """Next-token logits (B, S, V) at every stream without and after its thought, and the mixing weight (B, S)
        (next_token_hidden)."""
        h_base_streams, h_talk, w = self.next_token_hidden(ids, base, thoughts, layout, None)
        return self.model.logits(h_base_streams), self.model.logits(h_talk), w
