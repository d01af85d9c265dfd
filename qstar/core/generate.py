"""Generation with thoughts and a KV cache, written once for every backend.

Per emitted token: the real token is pushed once on top of the cached prefix; the thought (<start>, k sampled
tokens, <end>) is pushed on top of that cache into a separate, throwaway cache; the mixing head then blends the
prediction after <end> with the plain one. <start>/<end> are never emitted, and the prompt is processed once.

`Decoding` is a running batch that rows join and leave between tokens: `generate` decodes one batch to its end with
it, the server (qstar/core/serving/batcher.py) batches requests continuously with it.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from qstar.core.decoder import Cache
from qstar.core.fields import check_fields
from qstar.core.layout import StepGeometry, ThoughtLayout
from qstar.core.ops import Array
from qstar.core.sampling import KeyedNoise, Noise, Where, allowed, nucleus, sample_tokens
from qstar.core.thinker import Thinker


@dataclass
class Sampling:
    """How emitted tokens are drawn (thought tokens follow the recipe's sample_temperature)."""

    max_tokens: int = 64
    """Tokens to emit at most."""
    temperature: float = 0.0
    """Sampling temperature of the emitted tokens (0 = greedy)."""
    top_k: int | None = None
    """Sample among the k most likely tokens."""
    top_p: float | None = None
    """Sample among the smallest set of tokens of probability >= p."""
    thoughts: bool = True
    """Think before every token."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the row has emitted (OpenAI's presence_penalty)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the row has emitted it (OpenAI's frequency_penalty)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> a number added to its logit before the draw (OpenAI's logit_bias)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must lie in (0, 1]")
        if not all(type(t) is int and math.isfinite(b) for t, b in self.logit_bias.items()):
            raise ValueError("logit_bias maps token ids (integers) to finite numbers")

    @property
    def rule(self) -> tuple[float, int | None, float | None]:
        """What decides how an emitted token is drawn: rows of the same rule are drawn together."""
        return self.temperature, self.top_k, self.top_p

    @property
    def adjusts(self) -> bool:
        """Whether the row's logits change before its draw (penalties, logit_bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def check_vocabulary(self, vocab_size: int) -> None:
        """logit_bias names only ids of the vocabulary."""
        outside = sorted(t for t in self.logit_bias if not 0 <= t < vocab_size)
        if outside:
            raise ValueError(f"logit_bias names token ids outside the vocabulary [0, {vocab_size}): {outside[:5]}")


STOP_REASONS = ("eos", "stop", "max_tokens", "context")
"""Why a row's generation ended: its EOS token, a stop string, max_tokens, or the model's context."""


MAX_PENDING_TOKENS = 8
"""Tokens a row's newest text may wait for the rest of a character's bytes; past them it is taken as it decodes."""


class Continuation:
    """One row's emitted tokens, the thoughts and mixing weights before them, why it ended, and its text: cut before
    a stop string; `delta` hands out the text safe to show so far (never the start of a stop string, never half a
    character), so that the pieces streamed add up to the final text.

    The text is decoded as it grows, each new token after the ones settled just before it (a tokenizer may join
    pieces differently at a text's start; vLLM decodes so too), and stop strings are looked for only where one can
    have completed: a token costs work bounded by the longest stop string and its own text, however long the row."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        eos: Collection[int],
        stop: Sequence[str],
        budget: int,
        at_context: bool,
    ) -> None:
        self.decode, self.eos, self.budget, self.at_context = decode, frozenset(eos), budget, at_context
        self.stops = tuple(s for s in stop if s)  # an empty stop string stops nothing
        self.reach = max(map(len, self.stops), default=1) - 1
        """Characters of settled text a stop string completed by new text can start in."""
        self.tokens: list[int] = []
        self.thoughts: list[list[int]] = []
        self.weights: list[float] = []
        self.stop = ""
        self.settled: list[str] = []
        """The text of tokens[:read], piece by piece; it never changes."""
        self.chars = 0
        """Its length."""
        self.pending = ""
        """The text of tokens[read:]: a character whose bytes are still coming."""
        self.read = 0
        self.context: list[int] = []
        """Decoded before the newest tokens, to context_chars characters: the last settled ones that showed text,
        then the last few settled since that showed none (a tokenizer may join text across them)."""
        self.context_chars = self.visible = 0
        self.recent = ""
        """The settled text's last `reach` characters."""
        self.cut: int | None = None
        """Where the first stop string starts."""
        self.unsent: list[str] = []
        """Settled text from `sent` on, not handed out yet."""
        self.sent = 0

    def add(self, token: int, thought: list[int], weight: float | None) -> bool:
        """Record one emitted token; True when the row has ended (self.stop says why)."""
        self.tokens.append(token)
        self.thoughts.append(thought)
        if weight is not None:
            self.weights.append(weight)
        fresh = self.detokenize()
        if self.stops:
            self.find_stop(fresh)
        if token in self.eos:
            self.stop = "eos"
        elif self.cut is not None:
            self.stop = "stop"
        elif len(self.tokens) == self.budget:
            self.stop = "context" if self.at_context else "max_tokens"
        return bool(self.stop)

    def detokenize(self) -> str:
        """Decode the newest token after the context; the text it settles ("" while a character's bytes are still
        coming)."""
        new = self.decode(self.context + self.tokens[self.read :])[self.context_chars :]
        if new.endswith("\ufffd") and len(self.tokens) - self.read < MAX_PENDING_TOKENS:
            self.pending = new
            return ""
        self.pending = ""
        self.settled.append(new)
        self.unsent.append(new)
        self.chars += len(new)
        if new:
            self.context, self.visible = self.tokens[self.read :], len(self.tokens) - self.read
        else:  # special tokens, say: the next text may join the visible one's across them (the last few kept)
            quiet = (self.context[self.visible :] + self.tokens[self.read :])[-MAX_PENDING_TOKENS:]
            self.context = self.context[: self.visible] + quiet
        self.context_chars = len(self.decode(self.context))
        self.read = len(self.tokens)
        return new

    def find_stop(self, fresh: str) -> None:
        """Set `cut` at the first stop string, looked for in the text that can hold one that was not there before:
        the newly settled and pending text and the `reach` settled characters before them."""
        window = self.recent + fresh + self.pending
        found = [i for i in (window.find(s) for s in self.stops) if i >= 0]
        if found:
            self.cut = self.chars - len(fresh) - len(self.recent) + min(found)
        recent = self.recent + fresh
        self.recent = recent[max(0, len(recent) - self.reach) :]

    @property
    def text(self) -> str:
        """The emitted text, cut before the first stop string in it."""
        text = "".join(self.settled) + self.pending
        return text if self.cut is None else text[: self.cut]

    def delta(self) -> str:
        """The text not handed out yet that no later token can change (all of it once the row has ended)."""
        if self.stop:
            end = self.chars + len(self.pending) if self.cut is None else self.cut
            new = ("".join(self.unsent) + self.pending[max(0, self.sent - self.chars) :])[: end - self.sent]
            self.unsent, self.sent = [], self.sent + len(new)
            return new
        text = "".join(self.unsent)
        new = text[: len(text) - max((held_back(text, s) for s in self.stops), default=0)]
        self.unsent, self.sent = [text[len(new) :]], self.sent + len(new)
        return new


def held_back(text: str, stop: str) -> int:
    """The length of the longest end of `text` that a stop string starts with but is not (it may yet become one)."""
    tail = text[max(0, len(text) - len(stop) + 1) :]
    i = tail.find(stop[0])
    while i >= 0 and not stop.startswith(tail[i:]):
        i = tail.find(stop[0], i + 1)
    return 0 if i < 0 else len(tail) - i


@dataclass
class Emitted:
    """One step of a Decoding, per row."""

    tokens: np.ndarray
    """(B,) the drawn tokens."""
    thoughts: list[list[int]]
    """(B, k) the thought before each (empty lists without thoughts)."""
    weights: list[float] | None
    """(B,) the mixing weight of the thought side (None without thoughts)."""
    logits: Array
    """(B, V) the prediction the tokens were drawn from, before penalties, logit_bias, temperature and top-k/top-p;
    banned ids at -inf."""


class Decoding:
    """A batch decoded token by token, with or without thoughts: the KV cache (B, h, T, d) and key mask (B, T) of every
    row's prompt and tokens, each row's position, last hidden state and count of each token it has drawn. Rows join
    (`admit`: their prompts are processed, left-padded to the batch's length) and leave (`keep`) between steps."""

    def __init__(self, thinker: Thinker, thoughts: bool, noise: Noise | None) -> None:
        self.thinker, self.thoughts, self.noise = thinker, thoughts, noise
        self.clear()

    def clear(self) -> None:
        """No rows."""
        self.cache: Cache = []
        self.key_mask = np.ones((0, 0), bool)
        self.position = np.zeros(0, np.int64)
        self.hidden: Array | None = None
        self.counts: list[Counter[int]] = []

    @property
    def rows(self) -> int:
        return len(self.position)

    def admit(self, prompts: list[list[int]], seeds: Sequence[int | Sequence[int]] = ()) -> None:
        """Process `prompts` in one pass and add them as rows at the end of the batch (`seeds`: their rows' keys, with
        KeyedNoise)."""
        model, ops = self.thinker.model, self.thinker.ops
        ids, key_mask, positions = left_pad(prompts, self.thinker.pad_id)
        with ops.no_grad():
            h, cache = model.extend(ops.asarray(ids), positions, key_mask, None)
        key_mask = np.ones(ids.shape, bool) if key_mask is None else key_mask
        if isinstance(self.noise, KeyedNoise):
            self.noise.add(seeds)
        if self.hidden is None:
            self.cache, self.key_mask, self.hidden = cache, key_mask, h[:, -1]
        else:
            length = max(self.key_mask.shape[1], key_mask.shape[1])
            both = zip(self.cache, cache, strict=True)
            self.cache = [(self.stacked(k0, k1, length), self.stacked(v0, v1, length)) for (k0, v0), (k1, v1) in both]
            masks = [np.pad(m, ((0, 0), (length - m.shape[1], 0))) for m in (self.key_mask, key_mask)]
            self.key_mask, self.hidden = np.concatenate(masks), ops.concat([self.hidden, h[:, -1]], axis=0)
        self.position = np.concatenate([self.position, positions[:, -1]])
        self.counts += [Counter() for _ in prompts]

    def stacked(self, old: Array, new: Array, length: int) -> Array:
        """Keys or values (B, h, T, d) of the batch and of the rows joining it, each left-padded with zeros to
        T = length (the key mask hides them), one batch."""
        ops = self.thinker.ops
        padded = [ops.concat([ops.zeros((*x.shape[:2], length - x.shape[2], x.shape[3]), x), x], 2) for x in (old, new)]
        return ops.concat(padded, axis=0)

    def step(self, samplings: Sequence[Sampling]) -> Emitted:
        """Draw every row's next token (rows of one sampling rule together), thinking first when thoughts are on."""
        thinker, ops = self.thinker, self.thinker.ops
        model, hb = thinker.model, self.hidden
        assert hb is not None, "step() on a Decoding with no rows"
        with ops.no_grad():
            thoughts: list[list[int]] = [[] for _ in range(self.rows)]
            weights = None
            if self.thoughts:
                ht, thought = thought_after(thinker, self.cache, self.key_mask, self.position, self.noise)
                w, h = thinker.talk(hb, ht)
                logits, thoughts, weights = model.logits(h), ops.to_numpy(thought).tolist(), ops.to_numpy(w).tolist()
            else:
                logits = model.logits(hb)
            z = allowed(ops, logits, thinker.banned)
            adjusted = adjustments(samplings, self.counts, z.shape[-1])
            drawn_from = z if adjusted is None else z + ops.asarray(adjusted, like=z)
            groups: dict[tuple[float, int | None, float | None], list[int]] = {}
            for row, sampling in enumerate(samplings):
                groups.setdefault(sampling.rule, []).append(row)
            tokens = np.zeros(self.rows, np.int64)
            for (temperature, top_k, top_p), rows in groups.items():
                whole = len(rows) == self.rows  # one rule for the batch: no copies
                zg = drawn_from if whole else ops.take(drawn_from, ops.asarray(np.array(rows)), axis=0)
                noise = self.noise if whole or not isinstance(self.noise, KeyedNoise) else self.noise.rows(rows)
                where = Where(self.position[rows], 0)
                drawn = sample_tokens(ops, nucleus(ops, zg, top_k, top_p), None, temperature, noise, where)
                tokens[rows] = ops.to_numpy(drawn)
        for seen, token in zip(self.counts, tokens.tolist(), strict=True):
            seen[token] += 1
        return Emitted(tokens, thoughts, weights, z)

    def advance(self, tokens: np.ndarray, moving: np.ndarray) -> None:
        """Push each row's token (B,) on top of its cache; rows not `moving` (ended, kept for the batch's shape)
        stay at their position."""
        model, ops = self.thinker.model, self.thinker.ops
        self.key_mask = np.concatenate([self.key_mask, np.ones((self.rows, 1), bool)], axis=1)
        self.position = self.position + moving
        with ops.no_grad():
            new = ops.asarray(tokens[:, None])
            h, self.cache = model.extend(new, self.position[:, None], self.key_mask, self.cache)
        self.hidden = h[:, 0]

    def keep(self, rows: Sequence[int]) -> None:
        """Only these rows stay; key columns no row sees any more are dropped."""
        ops = self.thinker.ops
        if isinstance(self.noise, KeyedNoise):
            self.noise.keep(list(rows))
        if len(rows) == 0:
            return self.clear()
        index = np.asarray(rows)
        first = int(self.key_mask[index].any(axis=0).argmax())
        picked = ops.asarray(index)
        self.cache = [tuple(ops.take(x, picked, 0)[:, :, first:] for x in kv) for kv in self.cache]
        self.key_mask, self.position = self.key_mask[index, first:], self.position[index]
        self.counts = [self.counts[i] for i in rows]
        self.hidden = ops.take(self.hidden, picked, axis=0)


def adjustments(samplings: Sequence[Sampling], counts: Sequence[Counter[int]], vocab: int) -> np.ndarray | None:
    """(B, V) what each row's logit_bias and OpenAI's penalties add to its logits before the draw: logit_bias[t] -
    presence_penalty * (count[t] > 0) - frequency_penalty * count[t], count over the tokens the row has drawn; zero
    for rows without them, None when no row has any (nothing to add)."""
    if not any(s.adjusts for s in samplings):
        return None
    out = np.zeros((len(samplings), vocab), np.float32)
    for row, (sampling, seen) in enumerate(zip(samplings, counts, strict=True)):
        if sampling.logit_bias:
            out[row, list(sampling.logit_bias)] = list(sampling.logit_bias.values())
        if seen and (sampling.presence_penalty or sampling.frequency_penalty):
            ids, times = list(seen), np.fromiter(seen.values(), np.float32, len(seen))
            out[row, ids] -= sampling.presence_penalty + sampling.frequency_penalty * times
    return out


@dataclass
class Generation:
    rows: list[Continuation] = field(default_factory=list)
    prompt_seconds: float = 0.0
    """Time to process the prompts (one pass over them)."""
    generation_seconds: float = 0.0
    """Time of the token-by-token part, thoughts included."""


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(B, T) ids left-padded, the key mask (None without padding) and the position ids (pads at 0)."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = prompt
    pads = longest - np.array([len(p) for p in prompts])
    mask = np.arange(longest)[None, :] >= pads[:, None]
    return ids, None if mask.all() else mask, np.maximum(np.arange(longest)[None, :] - pads[:, None], 0)


def thought_after(
    thinker: Thinker, cache: Cache, key_mask: np.ndarray, position: np.ndarray, noise: Noise | None
) -> tuple[Array, Array]:
    """One thought per row after its last real token (at `position`): the hidden state after <end> (B, D) and the
    thought tokens (B, k). The thought's keys/values live in a cache of their own and are dropped."""
    model, recipe = thinker.model, thinker.recipe
    ops, k, rows = model.ops, recipe.thought_tokens, len(position)
    start, end = model.thought_vectors()

    def geometry(first: int, n: int) -> StepGeometry:
        positions = position[:, None, None] + np.arange(first, first + n)[None, :, None]
        return StepGeometry(positions, key_mask[:, None, :], ThoughtLayout.own_mask(first, n))

    x, own, tokens = ops.broadcast_to(start, (rows, 1, 1, start.shape[-1])), None, []
    for step in range(1, k + 1):
        h, own = model.think(x, geometry(step, 1), cache, own)
        where = Where(position, step)
        token = sample_tokens(ops, model.logits(h[:, 0, 0]), thinker.banned, recipe.sample_temperature, noise, where)
        tokens.append(token)
        x = model.embed(token)[:, None, None]
    x = ops.concat([x, ops.broadcast_to(end, (rows, 1, 1, end.shape[-1]))], axis=1)  # t_k, then <end>
    h, _ = model.think(x, geometry(k + 1, 2), cache, own)
    return h[:, 1, 0], ops.stack(tokens, axis=-1)


def generate(
    thinker: Thinker,
    prompts: list[list[int]],
    sampling: Sampling,
    noise: Noise | None,
    rows: list[Continuation],
) -> Generation:
    """Decode every prompt (a batch, left-padded with the thinker's pad id) until each of its `rows` has ended."""
    tic = time.perf_counter()
    decoding = Decoding(thinker, sampling.thoughts, noise)
    decoding.admit(prompts)
    assert decoding.hidden is not None
    thinker.ops.to_numpy(decoding.hidden[:1, :1])  # waits for the device, so that the two times split where they should
    out = Generation(rows, time.perf_counter() - tic)
    tic = time.perf_counter()
    done = np.zeros(len(prompts), bool)
    while True:
        step = decoding.step([sampling] * len(prompts))
        for row in np.flatnonzero(~done):
            weight = None if step.weights is None else step.weights[row]
            done[row] = rows[row].add(int(step.tokens[row]), step.thoughts[row], weight)
        if done.all():
            break
        decoding.advance(step.tokens, ~done)  # an ended row (at the context, say) no longer moves on
    out.generation_seconds = time.perf_counter() - tic
    return out
