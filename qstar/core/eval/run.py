"""The evaluation loop: zero-shot chain of thought under a protocol (protocols.py), with votes, resumable, plus the
teacher-forced metric.

Reproducible to the token: the questions go in fixed batches (by their place in the selected list), and every sample
draws its noise from a generator of its own, seeded by (seed, question index, vote) for the reasoning and the answer
step alike; so the same command gives the same questions.jsonl, interrupted and resumed or not. The first line of
questions.jsonl records what the answers were made with (task, protocol, settings, a fingerprint of model and
data): resuming into it with anything else is an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qstar.core.eval.answers import score_votes
from qstar.core.eval.protocols import Protocol, Sample, extractions, get_protocol
from qstar.core.eval.results import (
    EvalResult,
    QuestionRecord,
    RecordWriter,
    RunningAccuracy,
    SampleInfo,
    read_records,
    summarize,
    write_results,
)
from qstar.core.eval.tasks import Example, Task, answer_token_ids, teacher_forced_logprobs, teacher_forced_score
from qstar.core.fields import check_fields

QUESTIONS_FILE = "questions.jsonl"
RESULTS_FILE = "results.json"


@dataclass
class EvalSettings:
    protocol: str = "qstar"
    """qstar or paper (the authors' zero-shotcot-eval.py; qstar/core/eval/protocols.py): it sets the defaults of the
    settings below. lm-evaluation-harness's tasks: python -m qstar.lm_eval."""
    votes: int | None = None
    """Samples per question; > 1 reports cot-maj@K [default: qstar 1, paper 8]."""
    temperature: float | None = None
    """Sampling temperature of the reasoning (0 = greedy) [default: qstar 0, paper 0.9]."""
    max_tokens: int | None = None
    """Reasoning tokens at most [default: qstar 256, paper 385]."""
    answer_tokens: int | None = None
    """Tokens after the answer trigger at most [default: qstar 16, paper 13]."""
    limit: int | None = None
    """Only the first N questions (after the protocol's shuffle) [default: qstar all, paper 128]."""
    thoughts: bool = True
    """Think before every token."""
    batch_size: int = 8
    """Samples generated together."""
    seed: int = 0
    """Seed of the sampling noise (every question draws its own from it)."""
    teacher_forced: bool = False
    """Also the paper's teacher-forced answer probability (a different metric)."""

    def __post_init__(self) -> None:
        check_fields(self)
        p = get_protocol(self.protocol)
        self.votes = p.votes if self.votes is None else self.votes
        self.temperature = p.temperature if self.temperature is None else self.temperature
        self.max_tokens = p.max_tokens if self.max_tokens is None else self.max_tokens
        self.answer_tokens = p.answer_tokens if self.answer_tokens is None else self.answer_tokens
        self.limit = p.limit if self.limit is None else self.limit
        if self.votes < 1:
            raise ValueError("--votes must be >= 1")
        if self.votes > 1 and self.temperature == 0:
            raise ValueError("--votes > 1 needs --temperature > 0: greedy samples would all be the same")
        if min(self.batch_size, self.max_tokens, self.answer_tokens, self.limit or 1) < 1:
            raise ValueError("--batch-size, --max-tokens, --answer-tokens and --limit must be >= 1")

    @property
    def spec(self) -> Protocol:
        return get_protocol(self.protocol)


def select(examples: list[Example], s: EvalSettings) -> list[Example]:
    """The questions of the evaluation, in order: shuffled as the protocol says (Hugging Face datasets' shuffle:
    numpy's default_rng(seed).permutation), then the first `limit`."""
    seed = s.spec.shuffle_seed
    order = examples if seed is None else [examples[i] for i in np.random.default_rng(seed).permutation(len(examples))]
    return order if s.limit is None else order[: s.limit]


def answer_batch(model: Any, task: Task, examples: list[Example], s: EvalSettings) -> list[QuestionRecord]:
    """Reason, append the answer trigger, read the answer: `votes` samples of every question of the batch."""
    p = s.spec
    samples = [(e, vote) for e in examples for vote in range(s.votes or 1)]
    prompts = [task.prompt(e) for e, _ in samples]
    common = dict(thoughts=s.thoughts, truncate=True)
    reasoning = model.generate(
        prompts,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        seed=[[s.seed, e.index, vote, 0] for e, vote in samples],
        stop=list(p.stops),
        **common,
    )
    texts = [p.end_reasoning(r.text) for r in reasoning]
    follow = [task.answer_prompt(e, text, p.trigger_separator) for (e, _), text in zip(samples, texts, strict=True)]
    answers = model.generate(
        follow,
        max_tokens=s.answer_tokens,
        temperature=s.temperature if p.sampled_answer else 0.0,
        seed=[[s.seed, e.index, vote, 1] for e, vote in samples],
        stop=list(p.answer_stops),
        **common,
    )
    done = [Sample(t, f, a.text) for t, f, a in zip(texts, follow, answers, strict=True)]
    infos = [
        SampleInfo(
            "stop" if t != r.text else r.stop, r.prompt_tokens, len(r.tokens), len(a.tokens), r.truncated + a.truncated
        )
        for t, r, a in zip(texts, reasoning, answers, strict=True)
    ]
    records = []
    for i, example in enumerate(examples):
        rows = range(i * (s.votes or 1), (i + 1) * (s.votes or 1))
        generations = [follow[r][len(prompts[r]) :] + done[r].continuation for r in rows]
        scores = {
            x.name: score_votes([x.extract(done[r]) for r in rows], x.gold(example), x.match, x.votes_without_answer)
            for x in extractions(p, task)
        }
        records.append(QuestionRecord(example.index, prompts[rows[0]], generations, [infos[r] for r in rows], scores))
    return records


def teacher_forced(model: Any, task: Task, examples: list[Example], s: EvalSettings) -> float:
    """Mean over questions of the probability of the gold answer tokens after "\\nA:", the softmax restricted to the
    task's answer tokens (digits for GSM8K), predicted with thoughts (or without, when thoughts are off): the
    authors' training-time metric."""
    allowed = answer_token_ids(task, model.tokenizer)
    scores = []
    for example in examples:
        context, answer = task.teacher_forced_prompt(example)
        start = len(model.tokenizer(context)["input_ids"])
        ids = model.tokenizer(context + answer)["input_ids"]
        out = model.next_token_logits(np.array([ids]), seed=[[s.seed, example.index, 2]])
        plain, mixed = out.plain, out.mixed
        logits = mixed if s.thoughts else plain
        gold = ids[start:]
        scores.append(teacher_forced_score(teacher_forced_logprobs(logits[0, start - 1 : len(ids) - 1], gold, allowed)))
    return float(np.mean(scores))


def model_fingerprint(path: Path) -> str:
    """A short hash of a checkpoint that changes when its weights do, without reading gigabytes: config.json and
    qstar.safetensors whole, each weight file's size and first and last MiB."""
    digest = hashlib.sha256()
    for name in ("config.json", "qstar.safetensors"):
        if (path / name).is_file():
            digest.update(name.encode() + (path / name).read_bytes())
    for file in sorted(path.glob("model*.safetensors")):
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(1 << 20)
            handle.seek(max(size - (1 << 20), 0))
            digest.update(f"{file.name}:{size}".encode() + head + handle.read())
    return digest.hexdigest()[:16]


def data_fingerprint(source: str | None) -> str:
    """A short hash of a local data file's content, or the dataset id of a hub one."""
    if source is not None and Path(source).is_file():
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]
    return str(source)


def header(model: Any, task: Task, s: EvalSettings, model_name: str, data: str | None) -> dict[str, Any]:
    """Everything the answers depend on, recorded as the first line of questions.jsonl."""
    return {
        "task": task.name,
        # scored afterwards, and a larger --limit extends the evaluation: no answer depends on either
        "settings": asdict(s) | {"teacher_forced": None, "limit": None},
        "model": model_name,
        "model_fingerprint": model_fingerprint(Path(model.info.path)),
        "recipe": model.recipe.to_dict(),
        "backend": type(model).__module__.split(".")[1],
        "dtype": model.dtype,
        "data": data,
        "data_fingerprint": data_fingerprint(data),
    }


def check_same(out: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    if saved == current:
        return
    flat_saved, flat_now = {**saved, **saved.get("settings", {})}, {**current, **current["settings"]}
    differ = [k for k in flat_now if k != "settings" and flat_saved.get(k) != flat_now[k]]
    what = "; ".join(f"{k}: {flat_saved.get(k)!r} there, {flat_now[k]!r} now" for k in differ[:3])
    raise ValueError(
        f"{out / QUESTIONS_FILE} holds the answers of another evaluation ({what}): pass --overwrite to start over, "
        "or choose another --out"
    )


def evaluate_task(
    model: Any,
    task: Task,
    examples: list[Example],
    out: Path,
    s: EvalSettings,
    model_name: str,
    data: str | None = None,
    overwrite: bool = False,
    on_record: Callable[[QuestionRecord, RunningAccuracy], None] | None = None,
) -> EvalResult:
    """Score every selected example not already in out/questions.jsonl (an interrupted eval resumes), then write the
    results. `data` names the source of the examples (for the fingerprint)."""
    if model.tokenizer is None:
        raise ValueError(f"{model_name} has no tokenizer files: evaluation needs text in and out")
    chosen, run = select(examples, s), header(model, task, s, model_name, data)
    if overwrite:
        for name in (QUESTIONS_FILE, RESULTS_FILE):
            (out / name).unlink(missing_ok=True)
    saved, done = read_records(out / QUESTIONS_FILE)
    if saved is not None:
        check_same(out, saved, run)
    elif done:
        raise ValueError(f"{out / QUESTIONS_FILE} has no header line: pass --overwrite to start over")
    accuracy = RunningAccuracy.of(done[e.index] for e in chosen if e.index in done)
    with RecordWriter(out / QUESTIONS_FILE, run) as writer:
        for start in range(0, len(chosen), s.batch_size):
            batch = chosen[start : start + s.batch_size]  # fixed by position: a resumed run batches the same way
            if all(e.index in done for e in batch):
                continue
            for record in answer_batch(model, task, batch, s):
                if record.index in done:
                    continue
                writer.write(record)
                done[record.index] = record
                accuracy.add(record.correct)
                if on_record is not None:
                    on_record(record, accuracy)
    settings = {k: v for k, v in asdict(s).items() if k != "thoughts"} | {"data": data}
    result = summarize([done[e.index] for e in chosen], task.name, model_name, s.thoughts, settings)
    if s.teacher_forced:
        result.metrics["teacher_forced_answer_probability"] = teacher_forced(model, task, chosen, s)
    write_results(out / RESULTS_FILE, result)
    return result
