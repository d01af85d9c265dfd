"""qstar as a model of EleutherAI's lm-evaluation-harness (`pip install 'qstar-lm[eval]'`): any task the harness
knows, with or without thoughts, on either backend. The harness keeps what it does best (task definitions, prompts,
filters, metrics, few-shot, standard errors); this module answers its three kinds of request.

- `loglikelihood`: each continuation token scored by the mixed prediction after a thought at its position (the
  paper's teacher-forced metric, what `qstar eval --teacher-forced` computes), or by the plain LM with
  thoughts=false; rows of a batch right-padded (a position sees only what precedes it), thoughts drawn per request
  from numpy seeded by (seed, the request's tokens), so a request's numbers depend on neither its batch nor order.
- `loglikelihood_rolling` (perplexity tasks): the harness's own rolling windows of the model's context, scored so.
- `generate_until`: qstar's batched, cached generation with a thought before every token, cut at `until`; each
  request's noise seeded by (seed, its document's index, 0, 0), as `qstar eval` seeds a question's first sample.

Registered as `qstar` on import: `python -m qstar.lm_eval run --model qstar --model_args pretrained=CKPT ...` (the
harness's own command line) or `lm_eval.simple_evaluate(model="qstar", model_args=...)`.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

import numpy as np

from qstar.core.extras import require_extra
from qstar.core.model import QStarModel

require_extra("lm_eval.models.utils", "eval", "evaluating with lm-evaluation-harness")
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402
from tqdm import tqdm  # noqa: E402

DEFAULT_MAX_GEN_TOKS = 256
"""What the harness's HFLM generates at most when a task does not say (max_gen_toks)."""


def flag(value: Any) -> bool:
    """model_args arrive as text ("true", "False", "1")."""
    return value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes", "on")


HARNESS_ARGS = ("max_batch_size",)
"""What the harness passes every model besides batch_size and device; qstar has no use for it."""


def recipe_values(given: dict[str, Any]) -> dict[str, Any]:
    """model_args' recipe fields (text) as the recipe's types; one clear error for any other key."""
    from qstar.core.recipe import Recipe

    kinds = {f.name: str(f.type) for f in fields(Recipe)}
    unknown = sorted(k for k in given if k not in kinds and k not in HARNESS_ARGS)
    if unknown:
        ours = list(inspect.signature(QStarLM.__init__).parameters)[1:-1]
        raise ValueError(f"qstar model_args: unknown key {unknown[0]!r}; choose among {', '.join([*ours, *kinds])}")
    convert: dict[str, Callable[[Any], Any]] = {"int": int, "float": float, "bool": flag, "str": str}
    return {k: convert[kinds[k]](v) for k, v in given.items() if k in kinds}


@register_model("qstar")
class QStarLM(TemplateLM):
    """model_args: pretrained (a checkpoint qstar.load takes), backend, thoughts, adapter_path, dtype, threads, seed,
    any recipe field (thought_tokens=4, ...), and the harness's batch_size and device. `device` None or "auto" is
    the backend's default device (CUDA where PyTorch sees one, else the CPU); one that is not there is an error."""

    def __init__(
        self,
        pretrained: str | QStarModel,
        backend: str = "auto",
        thoughts: bool | str = True,
        adapter_path: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 8,
        device: str | None = None,
        threads: int | str | None = None,
        seed: int | str = 0,
        max_length: int | str | None = None,
        **recipe: Any,
    ) -> None:
        super().__init__()
        from qstar.core.backend import get
        from qstar.core.loading import load

        overrides = recipe_values(recipe)
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
        self.batch_size = 8 if str(batch_size) == "auto" else int(str(batch_size).split(":")[0])
        self.max_length = int(max_length or self.model.config.context or 2048)
        self.tokenizer = self.model.tokenizer

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.model.config.fallback_pad_id)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and a rolling window's first prediction) is conditioned on: BOS, as HFLM does."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

    def tok_decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens))

    def batches(self, items: list[Any], what: str) -> Iterator[list[Any]]:
        """`items` in batches of batch_size, in order, with a progress bar on long runs."""
        with tqdm(total=len(items), desc=f"qstar {what}", disable=len(items) < 2 * self.batch_size) as bar:
            for start in range(0, len(items), self.batch_size):
                yield items[start : start + self.batch_size]
                bar.update(min(self.batch_size, len(items) - start))

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Per (context, continuation) token ids: the continuation's log-probability and whether greedy decoding (of
        the same predictions) would have produced it. A context longer than the model's is cut from the left."""
        out: list[tuple[float, bool]] = []
        for batch in self.batches(requests, "loglikelihood"):
            rows, spans = [], []
            for _, context, continuation in batch:
                if len(continuation) > self.max_length:
                    raise ValueError(
                        f"a continuation of {len(continuation)} tokens does not fit the model's context of "
                        f"{self.max_length}: choose a task whose answers are shorter"
                    )
                row = (context + continuation)[-(self.max_length + 1) :][:-1]
                rows.append(row)
                spans.append((len(row) - len(continuation), continuation))
            seeds = [[self.seed, zlib.crc32(np.array(c + t, np.int64).tobytes())] for _, c, t in batch]
            logprobs = self.log_softmax(rows, seeds)
            for (first, continuation), lp in zip(spans, logprobs, strict=True):
                picked = lp[first : first + len(continuation)]
                score = float(picked[np.arange(len(continuation)), continuation].sum())
                out.append((score, bool((picked.argmax(-1) == np.array(continuation)).all())))
        return out

    def log_softmax(self, rows: list[list[int]], seeds: list[list[int]]) -> list[np.ndarray]:
        """Each row's next-token log-probabilities (n, V) after a thought (or plain), rows right-padded together."""
        longest = max(map(len, rows))
        ids = np.full((len(rows), longest), self.eot_token_id, np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        if self.thoughts:
            logits = self.model.next_token_logits(ids, seed=seeds).mixed
        else:
            logits = self.model.logits(ids)
        z = logits.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        z = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return [z[i, : len(row)] for i, row in enumerate(rows)]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, in the harness's rolling windows of the model's context."""
        windows, owners = [], []
        for n, (text,) in enumerate(r.args for r in requests):
            tokens = self.tok_encode(text)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += score
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context continued (thinking before every token unless thoughts=false) until one of `until`, EOS,
        max_gen_toks or the model's context; a context longer than the model's loses its start."""
        out: list[str] = []
        eos = self.tokenizer.decode([self.eot_token_id])
        items = [(*r.args, i if r.doc_id is None else r.doc_id) for i, r in enumerate(requests)]
        for batch in self.batches(items, "generate_until"):
            groups: dict[str, list[int]] = {}  # requests of the same settings generate together
            for offset, (_, gen_kwargs, _) in enumerate(batch):
                groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(offset)
            texts: dict[int, str] = {}
            for offsets in groups.values():
                kwargs = normalize_gen_kwargs(dict(batch[offsets[0]][1]), DEFAULT_MAX_GEN_TOKS)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                completions = self.model.generate(
                    [batch[o][0] for o in offsets],
                    max_tokens=int(kwargs["max_gen_toks"]),
                    thoughts=self.thoughts,
                    temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                    seed=[[self.seed, batch[o][2], 0, 0] for o in offsets],
                    stop=[u for u in until if u],
                    truncate=True,
                )
                texts |= {o: c.text for o, c in zip(offsets, completions, strict=True)}
            out += [texts[o] for o in range(len(batch))]
        return out
