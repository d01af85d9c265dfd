"""qstar as a model of EleutherAI's lm-evaluation-harness (`pip install 'qstar-lm[eval]'`): any task the harness knows,
with or without thoughts, on either backend. The harness keeps what it does best (task definitions, prompts, filters,
metrics, few-shot, standard errors); this module answers its three kinds of request as the harness's own `hf` model
(HFLM, with its default arguments) does: the same tokens (BOS as the tokenizer adds it, add_bos_token and
prefix_token_id as HFLM reads them), the same windows, the same truncation, the same order of work (longest first); with
thoughts=false the same numbers.

- `loglikelihood`: each continuation token scored by the mixed prediction after a thought at its position (the
  paper's teacher-forced metric, what `qstar eval --teacher-forced` computes), or by the plain LM with
  thoughts=false. A batch's rows are right-padded (a position sees only what precedes it) and think only at the
  positions scored (the union over the batch: thinking elsewhere changes nothing there, the noise being keyed by
  position); thoughts are seeded by (seed, the request's tokens), so a request's numbers depend on neither its batch
  nor the order. Log-softmax, gather and argmax run on the device (QStarModel.next_token_scores).
- `loglikelihood_rolling` (perplexity tasks): HFLM's rolling windows of max_length tokens, scored so.
- `generate_until`: qstar's batched, cached generation with a thought before every token, cut at `until`; the context
  left-truncated to max_length - max_gen_toks; each request seeded by (seed, its document, its repeat, 0), as
  `qstar eval` seeds a question's samples, so a task's `repeats` copies of a document draw different samples.

Registered as `qstar` on import: `python -m qstar.lm_eval run --model qstar --model_args pretrained=CKPT ...` (the
harness's own command line) or `lm_eval.simple_evaluate(model="qstar", model_args=...)`.
"""

from __future__ import annotations

import inspect
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any

import numpy as np

from qstar.core.extras import require_extra
from qstar.core.model import QStarModel

require_extra("lm_eval.models.utils", "eval", "evaluating with lm-evaluation-harness")
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.utils import (  # noqa: E402
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    resolve_max_length,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402
from tqdm import tqdm  # noqa: E402

DEFAULT_MAX_GEN_TOKS = 256
"""What the harness's HFLM generates at most when a task does not say (max_gen_toks)."""

AUTO_TOKENS = 8192
"""batch_size=auto: a batch holds as many requests as this many tokens of work, counted at its longest request (the
sequence, plus with thoughts k + 2 thought steps per scored position; a generation's prompt plus max_gen_toks), at
most max_batch_size. A budget and not the harness's out-of-memory probe: on a CPU running out of memory kills the
process instead of raising."""

Request = tuple[tuple[str, str] | None, list[int], list[int]]
"""What `_loglikelihood_tokens` takes: the strings (None for a rolling window), context ids, continuation ids."""


def flag(value: Any) -> bool:
    """model_args arrive as text ("true", "False", "1")."""
    return value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes", "on")


def batch_size_of(value: int | str) -> int | None:
    """The harness's batch_size: a positive integer, or None for "auto" and "auto:N" (qstar sizes every batch from
    its longest request, which is what auto:N's N re-detections approximate, so N changes nothing)."""
    text = str(value).strip().lower()
    if text == "auto" or (text.startswith("auto:") and text[5:].replace(".", "", 1).isdigit()):
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"batch_size={value!r}: give a positive integer, auto or auto:N")
    return int(text)


def recipe_values(given: dict[str, Any]) -> dict[str, Any]:
    """model_args' recipe fields (text) as the recipe's types; one clear error for any other key."""
    from qstar.core.recipe import Recipe

    kinds = {f.name: str(f.type) for f in fields(Recipe)}
    unknown = sorted(k for k in given if k not in kinds)
    if unknown:
        ours = list(inspect.signature(QStarLM.__init__).parameters)[1:-1]
        raise ValueError(f"qstar model_args: unknown key {unknown[0]!r}; choose among {', '.join([*ours, *kinds])}")
    convert: dict[str, Callable[[Any], Any]] = {"int": int, "float": float, "bool": flag, "str": str}
    return {k: convert[kinds[k]](v) for k, v in given.items()}


@dataclass
class Prompt:
    """A generate_until request made ready: its prompt ids, left-truncated to leave room for max_gen_toks, what
    HFLM sorts it by, and how it generates."""

    ids: list[int]
    order: tuple[int, str]
    """(-tokens before truncation, context): longest first, as HFLM."""
    settings: str
    """The request's generation kwargs: requests of the same settings generate together."""
    max_tokens: int
    temperature: float
    until: list[str]
    seed: list[int]


@register_model("qstar")
class QStarLM(TemplateLM):
    """model_args: pretrained (a checkpoint qstar.load takes), backend, thoughts, adapter_path, dtype, threads, seed,
    max_length (default HFLM's: the model's max_position_embeddings, else the tokenizer's model_max_length, else
    2048, at most a sliding window), add_bos_token and prefix_token_id (as HFLM's), any recipe field
    (thought_tokens=4, ...), and the harness's batch_size (an integer, auto, auto:N), max_batch_size and
    device: None or "auto" is the backend's default device (CUDA where PyTorch sees one, else the CPU); one that is
    not there is an error."""

    def __init__(
        self,
        pretrained: str | QStarModel,
        backend: str = "auto",
        thoughts: bool | str = True,
        adapter_path: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 8,
        max_batch_size: int | str = 64,
        device: str | None = None,
        threads: int | str | None = None,
        seed: int | str = 0,
        max_length: int | str | None = None,
        add_bos_token: bool | str | None = None,
        prefix_token_id: int | str | None = None,
        **recipe: Any,
    ) -> None:
        super().__init__()
        from qstar.core.backend import get
        from qstar.core.loading import load

        overrides = recipe_values(recipe)
        self.batch_size, self.max_batch_size = batch_size_of(batch_size), int(max_batch_size)
        if isinstance(pretrained, QStarModel):
            self.model = pretrained
        else:
            chosen = get(backend)
            where = None if device in (None, "auto") else device
            self.model = load(pretrained, chosen, dtype, device=where, adapter_path=adapter_path, **overrides)
            chosen.set_threads(None if threads is None else int(threads), self.model.parameter_count)
        if self.model.tokenizer is None:
            raise ValueError(f"{pretrained}: qstar model_args pretrained= needs a checkpoint with tokenizer files")
        self.thoughts, self.seed = flag(thoughts), int(seed)
        self.tokenizer = self.model.tokenizer
        self.add_bos_token = None if add_bos_token is None else flag(add_bos_token)
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.max_length = self.length_limit(max_length)

    def length_limit(self, given: int | str | None) -> int:
        """max_length: as given, or HFLM's default (resolve_max_length), at most what the model can hold."""
        config = self.model.config
        if given is None:
            found = resolve_max_length(
                SimpleNamespace(max_position_embeddings=config.max_position_embeddings), self.tokenizer
            )
            return found if config.context is None else min(found, config.context)
        if not str(given).isdigit() or int(given) < 2:
            raise ValueError(f"max_length={given!r}: give an integer of at least 2")
        if config.context is not None and int(given) > config.context:
            raise ValueError(f"max_length={given} is more than the model's context of {config.context}")
        return int(given)

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.model.config.fallback_pad_id)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and a rolling window's first prediction) is conditioned on: as HFLM, the
        prefix_token_id given, else BOS, else EOS."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """HFLM's tok_encode: the tokenizer's own special tokens (BOS where it adds one) unless add_special_tokens
        or add_bos_token says otherwise, none before a string that starts with the prefix token's text;
        add_bos_token=true puts BOS first where the tokenizer would not (HFLM loads the tokenizer so)."""
        special = add_special_tokens
        if special is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = False
        special = self.add_bos_token if special is None else special
        ids = list(self.tokenizer(string, **({} if special is None else {"add_special_tokens": special}))["input_ids"])
        bos = self.tokenizer.bos_token_id
        if special and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def tok_decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens))

    def batches(self, order: list[int], costs: list[int], what: str, quiet: bool) -> Iterator[list[int]]:
        """The request indices `order` (longest first) in batches of batch_size, or with batch_size=auto of as many
        as AUTO_TOKENS tokens of work hold at the batch's first (longest) request's cost (`costs` by request); a
        progress bar on long runs."""
        with tqdm(total=len(order), desc=f"qstar {what}", disable=quiet or len(order) < 16) as bar:
            start = 0
            while start < len(order):
                size = self.batch_size or max(1, min(self.max_batch_size, AUTO_TOKENS // costs[order[start]]))
                yield order[start : start + size]
                bar.update(min(size, len(order) - start))
                start += size

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Per (context, continuation) token ids: the continuation's log-probability and whether greedy decoding (of
        the same predictions) would have produced it. A context longer than max_length loses its start, as HFLM's.
        Scored longest first (HFLM's order), answered in the requests' order."""
        rows = [self.scored_row(context, continuation) for _, context, continuation in requests]
        seeds = [[self.seed, zlib.crc32(np.array(c + t, np.int64).tobytes())] for _, c, t in requests]
        order = sorted(range(len(requests)), key=lambda i: (-len(rows[i][0]) - rows[i][1], tuple(rows[i][0])))
        steps = self.model.recipe.thought_tokens + 2 if self.thoughts else 0
        costs = [len(tokens) + steps * scored for tokens, scored in rows]
        out: dict[int, tuple[float, bool]] = {}
        for batch in self.batches(order, costs, "loglikelihood", disable_tqdm):
            out |= dict(zip(batch, self.score([rows[i] for i in batch], [seeds[i] for i in batch]), strict=True))
        return [out[i] for i in range(len(requests))]

    def scored_row(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """The tokens a request is scored on (its last max_length + 1: the predictions of the last max_length) and
        how many of them, at the end, are scored."""
        if len(continuation) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens does not fit the model's context of "
                f"{self.max_length}: choose a task whose answers are shorter"
            )
        return (context + continuation)[-(self.max_length + 1) :], len(continuation)

    def score(self, rows: list[tuple[list[int], int]], seeds: list[list[int]]) -> list[tuple[float, bool]]:
        """Rows right-padded together, predicted (after a thought, or plain) only at the union of their scored
        positions: each row's log-probability of its scored tokens and whether each is the argmax."""
        longest = max(len(tokens) for tokens, _ in rows)
        padded = np.full((len(rows), longest), self.eot_token_id, np.int64)
        for i, (tokens, _) in enumerate(rows):
            padded[i, : len(tokens)] = tokens
        spans = [np.arange(len(tokens) - 1 - n, len(tokens) - 1) for tokens, n in rows]
        positions = np.unique(np.concatenate(spans))
        if not len(positions):  # continuations merged into their contexts' last tokens: nothing to score
            return [(0.0, True)] * len(rows)
        scores = self.model.next_token_scores(
            padded[:, :-1], padded[:, positions + 1], positions, seed=seeds, thoughts=self.thoughts
        )
        at = [np.searchsorted(positions, span) for span in spans]
        return [
            (float(scores.logprob[i, a].astype(np.float64).sum()), bool(scores.greedy[i, a].all()))
            for i, a in enumerate(at)
        ]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, in HFLM's rolling windows of max_length tokens."""
        windows: list[Request] = []
        owners = []
        for n, (text,) in enumerate(r.args for r in requests):
            for window in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += score
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context continued (thinking before every token unless thoughts=false) until one of `until`, EOS,
        or max_gen_toks; requests of the same settings generate together, longest first (HFLM's order)."""
        prompts = self.prompts(requests)
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt.settings, []).append(i)
        costs = [len(p.ids) + p.max_tokens for p in prompts]
        out: dict[int, str] = {}
        for members in groups.values():
            members.sort(key=lambda i: prompts[i].order)
            for batch in self.batches(members, costs, "generate_until", disable_tqdm):
                first = prompts[batch[0]]
                completions = self.model.generate(
                    [prompts[i].ids for i in batch],
                    max_tokens=first.max_tokens,
                    thoughts=self.thoughts,
                    temperature=first.temperature,
                    seed=[prompts[i].seed for i in batch],
                    stop=[u for u in first.until if u],
                )
                out |= {i: c.text for i, c in zip(batch, completions, strict=True)}
        return [out[i] for i in range(len(requests))]

    def prompts(self, requests: list[Any]) -> list[Prompt]:
        """The generate_until requests made ready. The harness repeats a request `repeats` times as the same object
        (no field tells the copies apart), so a copy's repeat index is how many of the same (task, document, index,
        context) came before it."""
        eos = self.tokenizer.decode([self.eot_token_id])
        seen: Counter[tuple[Any, ...]] = Counter()
        out = []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args[:2]
            document = i if request.doc_id is None else request.doc_id
            key = (request.task_name, document, request.idx, context)
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
            room = self.max_length - int(kwargs["max_gen_toks"])
            if room < 1:
                raise ValueError(
                    f"max_gen_toks={kwargs['max_gen_toks']} leaves no room for a prompt in max_length="
                    f"{self.max_length}: generate fewer tokens or raise max_length"
                )
            ids = self.tok_encode(context)
            out.append(
                Prompt(
                    ids=ids[-room:],
                    order=(-len(ids), context),
                    settings=repr(sorted(gen_kwargs.items())),
                    max_tokens=int(kwargs["max_gen_toks"]),
                    temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                    until=handle_stop_sequences(kwargs.pop("until", None), eos=eos),
                    seed=[self.seed, document, seen[key], 0],
                )
            )
            seen[key] += 1
        return out
