"""Generation with thoughts and a KV cache, written once for every backend.

Per emitted token: the real token is pushed once on top of the cached prefix; the thought (<start>, k sampled
tokens, <end>) is pushed on top of that cache into a separate, throwaway cache; the mixing head then blends the
prediction after <end> with the plain one. <start>/<end> are never emitted, and the prompt is processed once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from qstar.core.decoder import Cache
from qstar.core.fields import check_fields
from qstar.core.layout import StepGeometry, ThoughtLayout
from qstar.core.ops import Array
from qstar.core.sampling import NoiseFn, allowed, nucleus, sample_tokens
from qstar.core.thinker import Thinker


@dataclass
class Sampling:
    """How emitted tokens are drawn (thought tokens follow the recipe's sample_temperature)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    thoughts: bool = True

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


STOP_REASONS = ("eos", "stop", "max_tokens", "context")
"""Why a row's generation ended: its EOS token, a stop string, max_tokens, or the model's context."""


@dataclass
class Generation:
    tokens: list[list[int]] = field(default_factory=list)
    """Per prompt, the emitted ids."""
    thoughts: list[list[list[int]]] = field(default_factory=list)
    """Per prompt and emitted token, the thought that preceded it (empty lists without thoughts)."""
    stops: list[str] = field(default_factory=list)
    """Per prompt, one of STOP_REASONS."""
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
    thinker: Thinker, cache: Cache, key_mask: np.ndarray, position: np.ndarray, noise: NoiseFn | None
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
        token = sample_tokens(ops, model.logits(h[:, 0, 0]), thinker.banned, recipe.sample_temperature, noise)
        tokens.append(token)
        x = model.embed(token)[:, None, None]
    x = ops.concat([x, ops.broadcast_to(end, (rows, 1, 1, end.shape[-1]))], axis=1)  # t_k, then <end>
    h, _ = model.think(x, geometry(k + 1, 2), cache, own)
    return h[:, 1, 0], ops.stack(tokens, axis=-1)


def generate(
    thinker: Thinker,
    prompts: list[list[int]],
    sampling: Sampling,
    noise: NoiseFn | None,
    finished: Callable[[int, list[int]], str | None],
    context: int | None = None,
) -> Generation:
    """Decode every prompt (a batch, left-padded with the thinker's pad id) until `finished(row, tokens)` gives a
    reason to stop ("eos", "stop"), max_tokens, or the row's last position reaches `context` (prompts must leave room
    for one token)."""
    model, ops = thinker.model, thinker.ops
    ids, key_mask, positions = left_pad(prompts, thinker.pad_id)
    budgets = [sampling.max_tokens if context is None else min(sampling.max_tokens, context - len(p)) for p in prompts]
    with ops.no_grad():
        tic = time.perf_counter()
        h, cache = model.extend(ops.asarray(ids), positions, key_mask, None)
        hb, position = h[:, -1], positions[:, -1]
        ops.to_numpy(hb[:1, :1])  # waits for the device, so that the two times split where they should
        out = Generation([[] for _ in prompts], [[] for _ in prompts], [""] * len(prompts))
        out.prompt_seconds, tic = time.perf_counter() - tic, time.perf_counter()
        key_mask = np.ones(ids.shape, bool) if key_mask is None else key_mask
        done = [False] * len(prompts)
        for _ in range(max(budgets)):
            if sampling.thoughts:
                ht, thought = thought_after(thinker, cache, key_mask, position, noise)
                logits, thought_ids = model.logits(thinker.talk(hb, ht)[1]), ops.to_numpy(thought).tolist()
            else:
                logits, thought_ids = model.logits(hb), [[] for _ in prompts]
            z = nucleus(ops, allowed(ops, logits, thinker.banned), sampling.top_k, sampling.top_p)
            token = sample_tokens(ops, z, None, sampling.temperature, noise)  # z has the banned ids at -inf already
            for row, value in enumerate(ops.to_numpy(token).tolist()):
                if not done[row]:
                    out.tokens[row].append(int(value))
                    out.thoughts[row].append(thought_ids[row])
                    reason = finished(row, out.tokens[row])
                    if reason is None and len(out.tokens[row]) == budgets[row]:
                        reason = "max_tokens" if budgets[row] == sampling.max_tokens else "context"
                    done[row], out.stops[row] = reason is not None, reason or ""
            if all(done):
                break
            key_mask = np.concatenate([key_mask, np.ones((len(prompts), 1), bool)], axis=1)
            position = position + ~np.array(done)  # a finished row (at the context, say) no longer moves on
            h, cache = model.extend(token[:, None], position[:, None], key_mask, cache)
            hb = h[:, 0]
        out.generation_seconds = time.perf_counter() - tic
    return out
