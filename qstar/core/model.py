"""The model object a user calls, written once: numpy in, numpy out, any backend underneath.

A backend subclasses `QStarModel` with its network (`backbone`, qstar/core/decoder.py) and supplies the hooks of
`StoredModel` (qstar/core/persistence.py, what reaches files) and `gradients_of`."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from qstar.core import checkpoint, losses
from qstar.core.checkpoint import CheckpointInfo
from qstar.core.decoder import Backbone, Cache
from qstar.core.generate import Continuation, Sampling, generate
from qstar.core.layout import ThoughtLayout
from qstar.core.model_config import ModelConfig
from qstar.core.ops import Array, Ops
from qstar.core.persistence import StoredModel
from qstar.core.recipe import Recipe
from qstar.core.sampling import DeviceNoise, KeyedNoise, Noise, banned_mask
from qstar.core.thinker import LossTerms, Thinker, columns

DEFAULT_CPU_STEP_MODE = "one-pass"
"""The faster on a CPU at every length measured (32 to 256 tokens), side by side with two-pass: benchmarks/step_modes.py
(docs/PERFORMANCE.md)."""


@dataclass
class LossOutput:
    total: float
    lm: float
    policy: float
    """Before policy_weight."""
    nll_base: np.ndarray
    nll_talk: list[np.ndarray]
    reward: np.ndarray
    advantage: np.ndarray
    mixing_weight: list[np.ndarray]
    thoughts: np.ndarray


@dataclass
class NextToken:
    """What inference predicts at the positions of (B, L) ids asked for (QStarModel.next_token_logits)."""

    plain: np.ndarray
    """(B, S, V) logits without a thought at each of the S positions asked for (every position: S = L)."""
    mixed: np.ndarray
    """(B, S, V) logits after the thought, mixed with the plain ones by the mixing head."""
    thoughts: np.ndarray
    """(B, S, k) the thought at each position."""
    weight: np.ndarray
    """(B, S) the mixing head's weight of the thought side."""


@dataclass
class TokenScores:
    """How the predictions at some positions of (B, L) ids score given next tokens (QStarModel.next_token_scores)."""

    logprob: np.ndarray
    """(B, S) float32: each target's log-probability."""
    greedy: np.ndarray
    """(B, S) bool: whether each target is the prediction's argmax (what greedy decoding would emit)."""


SCORED_LOGITS = 2**25
"""The most (row, position, vocabulary) logits next_token_scores holds at once (128 MB in float32): more positions
are scored in chunks of positions, to the same numbers (the noise is keyed by position)."""


@dataclass
class Completion:
    text: str
    """The emitted text, cut before a stop string."""
    tokens: list[int]
    thoughts: list[str]
    """Per emitted token, the decoded thought that preceded it (empty strings without thoughts)."""
    stop: str
    """Why it ended: "eos", "stop" (a stop string), "max_tokens" or "context" (the model's context is full)."""
    prompt_tokens: int
    """Tokens of the prompt the model saw."""
    truncated: int = 0
    """Tokens cut from the start of a prompt longer than the context (generate(..., truncate=True))."""
    prompt_tps: float = 0.0
    """Prompt tokens per second of the batch it was generated in."""
    generation_tps: float = 0.0
    """Emitted tokens per second of that batch (thoughts are extra work, not extra tokens)."""
    peak_memory_gb: float = 0.0
    mixing_weights: list[float] = field(default_factory=list)
    """Per emitted token, the mixing head's weight of the thought side (empty without thoughts)."""


def default_step_mode(ops: Ops) -> str:
    """The step mode a device gets unless asked for another: two-pass on an accelerator (a tenth of the kernels),
    DEFAULT_CPU_STEP_MODE on a CPU (docs/PERFORMANCE.md)."""
    return "two-pass" if ops.on_accelerator() else DEFAULT_CPU_STEP_MODE


class QStarModel(StoredModel):
    """A loaded Quiet-STaR model. Backends supply the network, its gradients and the hooks of StoredModel."""

    def __init__(self, backbone: Backbone, recipe: Recipe, info: CheckpointInfo, dtype: str) -> None:
        self.backbone, self.recipe, self.info, self.dtype = backbone, recipe, info, dtype
        self.ops = backbone.ops
        self.step_mode = default_step_mode(self.ops)
        """How training steps score sampled thoughts (thinker.STEP_MODES); qstar.load's step_mode sets it."""
        self.adapter = None
        self.source = str(info.path)
        self.banned = banned_mask(info.config.vocab_size, [info.start_id, info.end_id])
        """(V,) bool: ids a thought never draws (the delimiters, where the vocabulary holds them)."""
        self.device_banned = self.ops.asarray(self.banned) if self.banned.any() else None
        """The same on the device; None when nothing is banned, which spares a pass over every (..., V) logits."""

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(v.shape) for v in self.parameters().values())

    @property
    def config(self) -> ModelConfig:
        return self.info.config

    @property
    def tokenizer(self) -> Any:
        return self.info.tokenizer

    def check_ids(self, input_ids: Any, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Validated (B, L) int64 ids and a right-padded (B, L) bool mask."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"input_ids must be an integer array of shape (batch, length), got {ids.dtype} {ids.shape}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}); got {ids.min()}..{ids.max()}")
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        if (np.diff(mask.astype(np.int8), axis=1) > 0).any():
            raise ValueError(
                "attention_mask must be right-padded (ones, then zeros): left padding is not supported in training"
            )
        return ids.astype(np.int64), mask

    def layout(self, length: int) -> ThoughtLayout:
        if length < self.recipe.min_seq_len():
            raise ValueError(
                f"sequences of {length} tokens are too short for lookahead={self.recipe.lookahead}: "
                f"need at least {self.recipe.min_seq_len()} tokens"
            )
        return ThoughtLayout.every(length, self.recipe.think_every)

    def logits(self, input_ids: Any) -> np.ndarray:
        """Plain LM logits (B, L, V), no thoughts."""
        ids, _ = self.check_ids(input_ids)
        with self.ops.no_grad():
            h, _ = self.backbone.base(self.ops.asarray(ids))
            return self.ops.to_numpy(self.backbone.logits(h))

    def sample_thoughts(self, input_ids: Any, seed: int | None = None) -> np.ndarray:
        """(B*P, S, k) thought tokens; with a seed the noise is keyed (row, position, step): every backend draws the
        same."""
        ids, _ = self.check_ids(input_ids)
        layout, rows = self.layout(ids.shape[1]), ids.shape[0] * self.recipe.thoughts_per_position
        with self.ops.no_grad():
            _, base_kv = self.backbone.base(self.ops.asarray(ids))
            tokens = self.thinker().sample_without_gradient(base_kv, rows, layout, self.noise(seed))
        return self.ops.to_numpy(tokens).astype(np.int64)

    def thinker(self, recipe: Recipe | None = None) -> Thinker:
        """The algorithm's steps on this model (with another recipe where given)."""
        return Thinker(self.backbone, recipe or self.recipe, self.device_banned, self.config.fallback_pad_id)

    def check_thoughts(self, thoughts: Any, rows: int, streams: int) -> np.ndarray:
        t = np.asarray(thoughts)
        expected = (rows, streams, self.recipe.thought_tokens)
        if t.shape != expected:
            raise ValueError(f"thoughts must have shape (B*P, streams, thought_tokens) = {expected}, got {t.shape}")
        if (
            (t < 0).any()
            or (t >= self.config.vocab_size).any()
            or np.isin(t, [self.info.start_id, self.info.end_id]).any()
        ):
            raise ValueError("thoughts must be ordinary token ids (no <start>/<end>, inside the vocabulary)")
        return t.astype(np.int64)

    def terms(
        self, input_ids: Any, attention_mask: Any = None, thoughts: Any = None, seed: int | None = None
    ) -> LossTerms:
        """The backend arrays of one Quiet-STaR forward (differentiable unless under ops.no_grad())."""
        ids, mask = self.check_ids(input_ids, attention_mask)
        layout = self.layout(ids.shape[1])
        rows = ids.shape[0] * self.recipe.thoughts_per_position
        given = None if thoughts is None else self.ops.asarray(self.check_thoughts(thoughts, rows, layout.num_streams))
        # with several ranks every one takes the masked path: its denominators are collectives (losses.masked_mean)
        valid = None if mask.all() and self.ops.ranks == 1 else self.ops.asarray(mask.astype(np.float32))
        return self.thinker().loss(self.ops.asarray(ids), valid, layout, given, self.noise(seed), self.step_mode)

    def noise(self, seed: int | Sequence[int | Sequence[int]] | None) -> Noise:
        """The randomness of the draws: keyed by (row, position, step) with a seed (one for the batch, rows keyed by
        (seed, row); or one a row, whose draws then depend on nothing else in the batch), the same on every backend;
        else the backend's generator."""
        if seed is None:
            return DeviceNoise()
        return KeyedNoise(seed=seed) if isinstance(seed, int) else KeyedNoise(list(seed))

    def loss(
        self, input_ids: Any, attention_mask: Any = None, thoughts: Any = None, seed: int | None = None
    ) -> LossOutput:
        """Every Quiet-STaR loss term as numpy; thoughts are sampled unless given (B*P, S, k)."""
        with self.ops.no_grad():
            terms = self.terms(input_ids, attention_mask, thoughts, seed)
        return self.to_output(terms)

    def next_token_logits(
        self, input_ids: Any, seed: Any = None, thoughts: Any = None, positions: Any = None
    ) -> NextToken:
        """The next-token predictions at the `positions` (sorted; default every position) of (B, L) ids, without and
        after a thought: sampled there (one per position, the recipe's sample_temperature; `seed` as for generate,
        keyed by position, so a position draws the same whichever others think) unless `thoughts` (B, S, k) are given
        (a control: thoughts of other content, the same computation). Arrays over the S positions."""
        ids, _ = self.check_ids(input_ids)
        single = replace(self.recipe, thoughts_per_position=1, think_every=1)
        layout = ThoughtLayout.every(ids.shape[1]) if positions is None else self.stream_layout(ids.shape[1], positions)
        thinker = self.thinker(single)
        with self.ops.no_grad():
            x = self.ops.asarray(ids)
            base = self.backbone.base(x)
            if thoughts is None:
                drawn = thinker.sample_without_gradient(base[1], ids.shape[0], layout, self.noise(seed))
            else:
                drawn = self.ops.asarray(self.check_thoughts(thoughts, ids.shape[0], layout.num_streams))
            plain, mixed, w = thinker.next_token_logits(x, base, drawn, layout)
            n = self.ops.to_numpy
            return NextToken(n(plain), n(mixed), n(drawn).astype(np.int64), n(w))

    def next_token_scores(
        self, input_ids: Any, targets: Any, positions: Any, seed: Any = None, thoughts: bool = True
    ) -> TokenScores:
        """How the predictions at the sorted `positions` (S) of (B, L) ids score the `targets` (B, S), the tokens
        that follow there: after a thought at each (as next_token_logits draws it: the same numbers) or plain
        (thoughts=False). The log-softmax, the gather and the argmax run on the device and only (B, S) numbers reach
        the host, never (B, S, V) logits; positions go in chunks of at most SCORED_LOGITS logits."""
        ids, _ = self.check_ids(input_ids)
        layout = self.stream_layout(ids.shape[1], positions)
        wanted = np.asarray(targets)
        if wanted.shape != (ids.shape[0], layout.num_streams) or not np.issubdtype(wanted.dtype, np.integer):
            raise ValueError(
                f"targets must be integers of shape (batch, positions) = {(ids.shape[0], layout.num_streams)}"
            )
        self.check_ids(wanted)
        step = max(1, SCORED_LOGITS // (ids.shape[0] * self.config.vocab_size))
        thinker = self.thinker(replace(self.recipe, thoughts_per_position=1, think_every=1))
        noise, parts = (self.noise(seed) if thoughts else None), []
        with self.ops.no_grad():
            x = self.ops.asarray(ids)
            base = self.backbone.base(x)
            for i in range(0, layout.num_streams, step):
                chunk = ThoughtLayout(ids.shape[1], layout.streams[i : i + step])
                parts.append(self.scores_at(thinker, x, base, chunk, wanted[:, i : i + step], noise))
        return TokenScores(np.concatenate([p.logprob for p in parts], 1), np.concatenate([p.greedy for p in parts], 1))

    def scores_at(
        self,
        thinker: Thinker,
        x: Array,
        base: tuple[Array, Cache],
        layout: ThoughtLayout,
        targets: np.ndarray,
        noise: Noise | None,
    ) -> TokenScores:
        """next_token_scores at the streams of `layout`: the mixed prediction after a thought drawn with `noise`, or
        the plain one (noise None)."""
        ops = self.ops
        h = (
            columns(ops, base[0], layout.streams)
            if noise is None
            else thinker.next_token_hidden(x, base, None, layout, noise)[1]
        )
        z, t = ops.upcast(self.backbone.logits(h)), ops.asarray(targets.astype(np.int64))
        return TokenScores(ops.to_numpy(losses.picked(ops, z, t)), ops.to_numpy(ops.argmax(z, axis=-1) == t))

    @staticmethod
    def stream_layout(length: int, positions: Any) -> ThoughtLayout:
        """The layout of the thinking positions given (sorted, distinct, inside the sequence)."""
        streams = np.asarray(positions, np.int64).reshape(-1)
        if not len(streams) or (np.diff(streams) <= 0).any() or streams[0] < 0 or streams[-1] >= length:
            raise ValueError(f"positions must be sorted, distinct and lie in [0, {length}); got {streams.tolist()}")
        return ThoughtLayout(length, streams)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        max_tokens: int = 64,
        thoughts: bool = True,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int | Sequence[int]] | None = None,
        stop: list[str] | tuple[str, ...] = (),
        truncate: bool = False,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
    ) -> list[Completion]:
        """Continue each prompt (text, or token ids), thinking before every token unless thoughts=False. A batch is
        left-padded; a row ends at EOS (the tokenizer's or generation_config.json's), a stop string, max_tokens or the
        model's context. `seed`: one for the batch, or one per prompt. A prompt longer than the context is an error,
        or with `truncate` loses its first tokens (as lm-evaluation-harness does). The penalties and logit_bias change
        the emitted tokens' logits as OpenAI's do (core.generate.Sampling), never the thoughts'."""
        sampling = Sampling(
            max_tokens, temperature, top_k, top_p, thoughts, presence_penalty, frequency_penalty, logit_bias or {}
        )
        sampling.check_vocabulary(self.config.vocab_size)
        ids, truncated = self.prompt_ids(prompts, truncate)
        rows = [self.continuation(len(p), max_tokens, stop) for p in ids]
        seeds = [[seed, row] for row in range(len(ids))] if isinstance(seed, int) else seed  # a row keyed by its own
        out = generate(self.thinker(), ids, sampling, self.noise(seeds), rows)
        speed = (
            sum(map(len, ids)) / max(out.prompt_seconds, 1e-9),
            sum(len(r.tokens) for r in rows) / max(out.generation_seconds, 1e-9),
            self.ops.peak_memory_gb(),
        )
        return [
            Completion(r.text, r.tokens, [self.decode(t) for t in r.thoughts], r.stop, len(p), cut, *speed, r.weights)
            for r, p, cut in zip(rows, ids, truncated, strict=True)
        ]

    def continuation(self, prompt_tokens: int, max_tokens: int, stop: Sequence[str]) -> Continuation:
        """A row's bookkeeping: it ends at an EOS id, a stop string, max_tokens or the model's context."""
        room = max_tokens if self.config.context is None else self.config.context - prompt_tokens
        return Continuation(self.decode, self.info.eos_ids, stop, min(max_tokens, room), room < max_tokens)

    def decode(self, tokens: list[int], special: bool = False) -> str:
        """Text of token ids, special tokens left out unless `special` ("" without a tokenizer)."""
        return "" if self.tokenizer is None else self.tokenizer.decode(tokens, skip_special_tokens=not special)

    def prompt_ids(
        self, prompts: str | list[str] | list[list[int]], truncate: bool
    ) -> tuple[list[list[int]], list[int]]:
        """The ids of each prompt (text is tokenized) that fit the context with room for one token, and how many
        tokens each lost from its start (an error instead unless `truncate`)."""
        texts: list[str | list[int]] = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise ValueError("no prompt given")
        if any(isinstance(p, str) for p in texts) and self.tokenizer is None:
            raise ValueError(
                f"{self.info.path} has no tokenizer files, so it cannot read text: convert a checkpoint "
                "that has them (tokenizer.json, ...), or pass token ids through the Python API"
            )
        ids: list[list[int]] = [self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in texts]
        if any(not p or (isinstance(t, str) and not t.strip()) for p, t in zip(ids, texts, strict=True)):
            raise ValueError("empty prompt: give some text to continue")
        context, truncated = self.config.context, [0] * len(ids)
        for row, prompt in enumerate(ids):
            if context is not None and len(prompt) >= context:  # room for at least one new token
                if not truncate:
                    raise ValueError(
                        f"the prompt has {len(prompt)} tokens, more than the model's context of {context} leaves "
                        "room for: shorten it"
                    )
                truncated[row], ids[row] = len(prompt) - context + 1, prompt[len(prompt) - context + 1 :]
        return ids, truncated

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation as prompt ids: the tokenizer's chat template with the assistant's turn opened (the template
        brings its own special tokens), or, for a tokenizer without one, the plain template: the messages' contents,
        one a line, as text the model continues. A template that refuses the messages (many raise for roles that do
        not alternate) is a ValueError with its message."""
        if self.tokenizer is None:
            raise ValueError(f"{self.info.path} has no tokenizer files, so it cannot read messages")
        if not self.tokenizer.chat_template:
            return list(self.tokenizer("\n".join(m["content"] for m in messages))["input_ids"])
        from jinja2 import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as err:
            raise ValueError(f"the chat template refused the messages: {err}") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def to_output(self, terms: LossTerms) -> LossOutput:
        n = self.ops.to_numpy
        return LossOutput(
            total=float(n(terms.total)),
            lm=float(n(terms.lm)),
            policy=float(n(terms.policy)),
            nll_base=n(terms.nll_base),
            nll_talk=[n(x) for x in terms.nll_talk],
            reward=n(terms.reward),
            advantage=n(terms.advantage),
            mixing_weight=[n(x) for x in terms.mixing_weight],
            thoughts=n(terms.thoughts).astype(np.int64),
        )

    def finite(self) -> bool:
        """Whether every parameter is finite."""
        return self.ops.all_finite(list(self.parameters().values()))

    def gradients(
        self, input_ids: Any, attention_mask: Any = None, thoughts: Any = None, seed: int | None = None
    ) -> dict[str, np.ndarray]:
        """d total / d parameter for every parameter, under the names (and shapes) of the loaded checkpoint."""
        grads = self.gradients_of(lambda: self.terms(input_ids, attention_mask, thoughts, seed).total)
        return checkpoint.source_gradients(self.info.kind, grads, self.source_shapes())

    def source_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes the loaded checkpoint gives the parameters it stores otherwise (the authors' thought rows)."""
        if self.info.kind != "authors":
            return {}
        return {src: (2, self.config.hidden_size) for src in checkpoint.AUTHORS_EXTRAS}

    @abstractmethod
    def gradients_of(self, loss_fn: Callable[[], Any]) -> dict[str, np.ndarray]:
        """The gradient of loss_fn() with respect to every trained parameter (checkpoint names), as numpy."""
