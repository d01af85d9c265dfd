"""Generation with thoughts and a KV cache, written once for every backend.

Per emitted token: the real token is pushed once on top of the cached prefix; the thought (<start>, k sampled
tokens, <end>) is pushed on top of that cache into a separate, throwaway cache; the mixing head then blends the
prediction after <end> with the plain one. <start>/<end> are never emitted, and the prompt is processed once.

`Decoding` is a running batch that rows join and leave between tokens: `generate` decodes one batch to its end with
it, the server (qstar/core/serving/batcher.py) batches requests continuously with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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

    @property
    def rule(self) -> tuple[float, int | None, float | None]:
        """What decides how an emitted token is drawn: rows of the same rule are drawn together."""
        return self.temperature, self.top_k, self.top_p


STOP_REASONS = ("eos", "stop", "max_tokens", "context")
"""Why a row's generation ended: its EOS token, a stop string, max_tokens, or the model's context."""


class Continuation:
    """One row's emitted tokens, the thoughts and mixing weights before them, why it ended, and its text: cut before
    a stop string; `delta` hands out the text safe to show so far (never the start of a stop string, never half a
    character), so that the pieces streamed add up to the final text."""

    def __init__(
        self, decode: Callable[[list[int]], str], eos: int | None, stop: Sequence[str], budget: int, at_context: bool
    ) -> None:
        self.decode, self.eos, self.stops, self.budget, self.at_context = decode, eos, tuple(stop), budget, at_context
        self.tokens: list[int] = []
        self.thoughts: list[list[int]] = []
        self.weights: list[float] = []
        self.stop = ""
        self.sent = ""

    def add(self, token: int, thought: list[int], weight: float | None) -> bool:
        """Record one emitted token; True when the row has ended (self.stop says why)."""
        self.tokens.append(token)
        self.thoughts.append(thought)
        if weight is not None:
            self.weights.append(weight)
        if token == self.eos:
            self.stop = "eos"
        elif self.stops and any(s in self.decode(self.tokens) for s in self.stops):
            self.stop = "stop"
        elif len(self.tokens) == self.budget:
            self.stop = "context" if self.at_context else "max_tokens"
        return bool(self.stop)

    @property
    def text(self) -> str:
        """The emitted text, cut before the first stop string in it."""
        text = self.decode(self.tokens)
        cut = min((text.index(s) for s in self.stops if s in text), default=len(text))
        return text[:cut]

    def delta(self) -> str:
        """The text not handed out yet that no later token can change (all of it once the row has ended)."""
        text = self.text
        if not self.stop:
            text = text.rstrip("\ufffd")  # a character whose bytes are still coming
            held = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[: len(text) - held]
        if not text.startswith(self.sent):  # a later token changed earlier text (rare): hold until it settles
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


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
    """(B, V) the prediction the tokens were drawn from, before temperature and top-k/top-p; banned ids at -inf."""


class Decoding:
    """A batch decoded token by token, with or without thoughts: the KV cache (B, h, T, d) and key mask (B, T) of every
    row's prompt and tokens, each row's position and last hidden state. Rows join (`admit`: their prompts are
    processed, left-padded to the batch's length) and leave (`keep`) between steps."""

    def __init__(self, thinker: Thinker, thoughts: bool, noise: Noise | None) -> None:
        self.thinker, self.thoughts, self.noise = thinker, thoughts, noise
        self.clear()

    def clear(self) -> None:
        """No rows."""
        self.cache: Cache = []
        self.key_mask = np.ones((0, 0), bool)
        self.position = np.zeros(0, np.int64)
        self.hidden: Array | None = None

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
            groups: dict[tuple[float, int | None, float | None], list[int]] = {}
            for row, sampling in enumerate(samplings):
                groups.setdefault(sampling.rule, []).append(row)
            tokens = np.zeros(self.rows, np.int64)
            for (temperature, top_k, top_p), rows in groups.items():
                whole = len(rows) == self.rows  # one rule for the batch: no copies
                zg = z if whole else ops.take(z, ops.asarray(np.array(rows)), axis=0)
                noise = self.noise if whole or not isinstance(self.noise, KeyedNoise) else self.noise.rows(rows)
                where = Where(self.position[rows], 0)
                drawn = sample_tokens(ops, nucleus(ops, zg, top_k, top_p), None, temperature, noise, where)
                tokens[rows] = ops.to_numpy(drawn)
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
        self.hidden = ops.take(self.hidden, picked, axis=0)


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
