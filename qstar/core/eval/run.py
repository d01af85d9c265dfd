"""The evaluation loop: zero-shot chain of thought with optional votes, resumable, plus the teacher-forced metric."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qstar.core.eval.results import (
    EvalResult,
    QuestionRecord,
    RecordWriter,
    RunningAccuracy,
    read_records,
    summarize,
    write_results,
)
from qstar.core.eval.tasks import (
    STOP_TEXT,
    Example,
    Task,
    answer_token_ids,
    teacher_forced_logprobs,
    teacher_forced_score,
)
from qstar.core.fields import check_fields

QUESTIONS_FILE = "questions.jsonl"
RESULTS_FILE = "results.json"


@dataclass
class EvalSettings:
    votes: int = 1
    thoughts: bool = True
    batch_size: int = 8
    max_tokens: int = 256
    """Tokens of reasoning at most."""
    answer_tokens: int = 16
    """Tokens after the answer trigger at most."""
    temperature: float = 0.0
    """0 with one vote (greedy); votes > 1 need sampling."""
    seed: int = 0
    teacher_forced: bool = False
    """Also compute the paper's teacher-forced answer probability (a different metric)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.votes < 1:
            raise ValueError("--votes must be >= 1")
        if self.votes > 1 and self.temperature == 0:
            raise ValueError("--votes > 1 needs --temperature > 0: greedy samples would all be the same")
        if self.batch_size < 1 or self.max_tokens < 1 or self.answer_tokens < 1:
            raise ValueError("--batch-size, --max-tokens and --answer-tokens must be >= 1")


def answer_one_batch(
    model: Any, task: Task, examples: list[Example], s: EvalSettings, seed: int
) -> list[QuestionRecord]:
    """Reason, append the answer trigger, read the answer: `votes` samples of every question of the batch."""
    samples = [e for e in examples for _ in range(s.votes)]
    prompts = [task.prompt(e) for e in samples]
    reasoning = model.generate(
        prompts, max_tokens=s.max_tokens, thoughts=s.thoughts, temperature=s.temperature, seed=seed, stop=[STOP_TEXT]
    )
    follow = [task.answer_prompt(e, r.text) for e, r in zip(samples, reasoning, strict=True)]
    answers = model.generate(follow, max_tokens=s.answer_tokens, thoughts=s.thoughts, temperature=0.0, stop=["\n"])
    records = []
    for i, example in enumerate(examples):
        rows = range(i * s.votes, (i + 1) * s.votes)
        generations = [follow[r][len(prompts[r]) :] + answers[r].text for r in rows]
        extracted = [task.extract(answers[r].text) for r in rows]
        records.append(QuestionRecord.scored(example.index, prompts[i * s.votes], generations, extracted, example.gold))
    return records


def teacher_forced(model: Any, task: Task, examples: list[Example], seed: int) -> float:
    """Mean over questions of the probability of the gold answer tokens after "\\nA:", the softmax restricted to
    the task's answer tokens (digits for GSM8K), predicted with thoughts: the authors' training-time metric."""
    allowed = answer_token_ids(task, model.tokenizer)
    scores = []
    for example in examples:
        context, answer = task.teacher_forced_prompt(example)
        start = len(model.tokenizer(context)["input_ids"])
        ids = model.tokenizer(context + answer)["input_ids"]
        _, mixed, _ = model.next_token_logits(np.array([ids]), seed=seed)
        gold = ids[start:]
        scores.append(teacher_forced_score(teacher_forced_logprobs(mixed[0, start - 1 : len(ids) - 1], gold, allowed)))
    return float(np.mean(scores))


def evaluate(
    model: Any,
    task: Task,
    examples: list[Example],
    out: Path,
    s: EvalSettings,
    model_name: str,
    on_record: Callable[[QuestionRecord, RunningAccuracy], None] | None = None,
) -> EvalResult:
    """Score every example not already in out/questions.jsonl (an interrupted eval resumes), then write results."""
    if model.tokenizer is None:
        raise ValueError(f"{model_name} has no tokenizer files: evaluation needs text in and out")
    out.mkdir(parents=True, exist_ok=True)
    done = read_records(out / QUESTIONS_FILE)
    todo = [e for e in examples if e.index not in done]
    accuracy = RunningAccuracy.of(done.values())
    with RecordWriter(out / QUESTIONS_FILE) as writer:
        for start in range(0, len(todo), s.batch_size):
            batch = todo[start : start + s.batch_size]
            for record in answer_one_batch(model, task, batch, s, s.seed + start):
                writer.write(record)
                done[record.index] = record
                accuracy.add(record.correct)
                if on_record is not None:
                    on_record(record, accuracy)
    settings = {k: v for k, v in vars(s).items() if k != "thoughts"}
    result = summarize([done[e.index] for e in examples], task.name, model_name, s.thoughts, settings)
    if s.teacher_forced:
        result.metrics["teacher_forced_answer_probability"] = teacher_forced(model, task, examples, s.seed)
    write_results(out / RESULTS_FILE, result)
    return result
