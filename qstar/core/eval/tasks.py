"""Evaluation tasks (GSM8K, CommonsenseQA): loading the questions, building the prompts, and the teacher-forced metric.

Two metrics exist, and they are different numbers:
- zero-shot CoT accuracy (what `qstar eval` reports): the model writes its reasoning after
  `Q: {question}\\nA: Let's think step by step.`, then `answer_prompt` appends the task's answer trigger, the model
  continues, and the first number / letter of that continuation is scored (see answers.py; protocols.py sets the
  details);
- the teacher-forced answer probability of the Quiet-STaR authors' training-time evaluation
  (ezelikman/quiet-star `eval_helpers.compute_metrics`): no generation; on `Q: {question}\\nA: {gold}\\n` the
  probability of each gold answer token, renormalised over the answer tokens (digits or choice letters, and the
  newline that ends the answer), multiplied over the answer; the dataset value is the mean over questions.
  `teacher_forced_prompt`, `answer_token_ids`, `teacher_forced_logprobs` and `teacher_forced_score` compute it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qstar.core.data import DataError, jsonl_records
from qstar.core.eval.answers import extract_choice, extract_number, gsm8k_gold
from qstar.core.extras import require_extra
from qstar.core.hub import require_hub

COT_TRIGGER = "Let's think step by step."
ANSWER_MARKER = "\nA:"
WORD_START = ("\u2581", "\u0120", " ")
"""How tokenizers mark a token that starts with a space: SentencePiece "▁", byte-level BPE "Ġ", or a plain space."""
NEWLINE_TOKENS = ("\n", "<0x0A>", "\u010a")


@dataclass(frozen=True)
class Example:
    index: int
    """Position in the data (0-based, blank lines not counted): the key of its record when resuming."""
    question: str
    gold: str
    """Canonical gold answer: a number (GSM8K) or a choice letter (CommonsenseQA)."""
    reference: str
    """The gold as the data writes it: GSM8K's worked solution ending "#### 18", CommonsenseQA's answerKey."""
    choices: tuple[tuple[str, str], ...] = ()
    """(label, text) of each answer choice; empty for GSM8K."""


@dataclass(frozen=True)
class Task:
    name: str
    answer_trigger: str
    """Appended after the reasoning; the model's continuation of it holds the answer."""
    hub_id: str
    hub_config: str | None
    hub_split: str
    parse: Callable[[dict[str, Any]], Example]
    """A data record (index 0) -> Example; KeyError, TypeError or ValueError when it is not the task's format."""
    extract: Callable[[str], str | None]
    """The continuation of the answer trigger -> canonical answer, None when it holds none."""
    answer_tokens: Callable[[Any], list[int]]
    """The tokenizer -> ids of the answer tokens of the teacher-forced metric."""

    def question_text(self, example: Example) -> str:
        """The question with its choices inline, as zero-shot CoT writes them: "... Answer Choices: (A) x (B) y"."""
        if not example.choices:
            return example.question
        return example.question + " Answer Choices: " + " ".join(f"({label}) {text}" for label, text in example.choices)

    def prompt(self, example: Example) -> str:
        """What the model continues with its reasoning."""
        return f"Q: {self.question_text(example)}\nA: {COT_TRIGGER}"

    def answer_prompt(self, example: Example, reasoning: str, separator: str = " ") -> str:
        """Prompt, the reasoning (its trailing whitespace removed), `separator` and the answer trigger: what the answer
        step continues."""
        return f"{self.prompt(example)}{reasoning.rstrip()}{separator}{self.answer_trigger}"

    def teacher_forced_prompt(self, example: Example) -> tuple[str, str]:
        """(context ending in ANSWER_MARKER, gold answer ending in a newline), in the authors' evaluation format.

        Tokenize `context + answer` as one text and score the tokens after the context's; GSM8K's answer is the
        text after "####" as the data writes it (commas included), CommonsenseQA's lists the choices one a line.
        """
        if not example.choices:
            return f"Q: {example.question}{ANSWER_MARKER}", f" {example.reference.rsplit('####', 1)[1].strip()}\n"
        choices = "\n".join(f"({label}) {text}" for label, text in example.choices)
        return f"Q: {example.question}\n{choices}{ANSWER_MARKER}", f" {example.reference}\n"


def parse_gsm8k(record: dict[str, Any]) -> Example:
    question, answer = record["question"], record["answer"]
    if not isinstance(question, str) or not isinstance(answer, str):
        raise TypeError("'question' and 'answer' must be strings")
    return Example(0, question, gsm8k_gold(answer), answer)


def parse_csqa(record: dict[str, Any]) -> Example:
    """CommonsenseQA's own layout ({"question": {"stem", "choices": [{"label", "text"}]}}) or the flat HF one."""
    question, key = record["question"], record["answerKey"]
    if isinstance(question, dict):
        stem = question["stem"]
        choices = tuple((c["label"], c["text"]) for c in question["choices"])
    else:
        stem = question
        flat = record["choices"]
        if len(flat["label"]) != len(flat["text"]):
            raise ValueError("'choices' has different numbers of labels and texts")
        choices = tuple(zip(flat["label"], flat["text"], strict=True))
    if not isinstance(stem, str) or not all(isinstance(x, str) for choice in choices for x in choice):
        raise TypeError("the question and the choices must be strings")
    labels = [label for label, _ in choices]
    if not key:
        raise ValueError("empty 'answerKey' (CommonsenseQA's test split is unlabeled: use the validation split)")
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")
    return Example(0, stem, key, key, choices)


def vocabulary(tokenizer: Any) -> list[str]:
    """Token strings by id, from a tokenizer (`convert_ids_to_tokens` and `len`) or an id-ordered list of them."""
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    return [str(t) for t in tokenizer]


def digit_token_ids(vocab: Sequence[str]) -> list[int]:
    """Tokens made only of ASCII digits, after an optional word-start mark ("7", "▁7", "Ġ123").

    On Mistral these are exactly the ten digit tokens the authors list.
    """
    return [i for i, t in enumerate(vocab) if _strip_word_start(t).isascii() and _strip_word_start(t).isdigit()]


def encoded(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def choice_token_ids(tokenizer: Any, letters: str = "ABCDE") -> list[int]:
    """The tokens the choice letters are written with after "A: " ("▁B" in SentencePiece, "ĠB" in byte-level BPE),
    and the newline that ends the answer: on Mistral exactly the authors' five letters and newline."""
    letter_ids = [encoded(tokenizer, f"{ANSWER_MARKER} {letter}")[-1] for letter in letters]
    return letter_ids + [encoded(tokenizer, f"{ANSWER_MARKER} {letters[0]}\n")[-1]]


def newline_token_ids(vocab: Sequence[str]) -> list[int]:
    """The newline token(s) that end an answer: "\\n", SentencePiece's byte "<0x0A>" or byte-level BPE's "Ċ"."""
    return [i for i, t in enumerate(vocab) if t in NEWLINE_TOKENS]


def answer_token_ids(task: Task | str, tokenizer: Any) -> list[int]:
    """Ids of the tokens the teacher-forced metric renormalises over (GSM8K also takes an id-ordered vocab list)."""
    return get_task(task).answer_tokens(tokenizer)


def teacher_forced_logprobs(logits: Any, gold_ids: Sequence[int], allowed_ids: Sequence[int]) -> list[float]:
    """Log-probability of each gold answer token with the softmax restricted to `allowed_ids` (answer_token_ids).

    `logits` row i (a (len(gold_ids), vocab) array) is the model's prediction of gold_ids[i]. Gold tokens outside
    `allowed_ids` (the space before a number, a thousands comma) are skipped, as the authors skip them.
    """
    rows = np.asarray(logits, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] != len(gold_ids):
        raise ValueError(f"logits must be ({len(gold_ids)}, vocab), one row per gold token; got {rows.shape}")
    allowed = np.array(sorted(set(allowed_ids)), dtype=np.int64)
    allowed_set = set(allowed.tolist())
    out = []
    for row, gold in zip(rows, gold_ids, strict=True):
        if gold in allowed_set:
            sub = row[allowed]
            top = sub.max()
            out.append(float(row[gold] - top - np.log(np.exp(sub - top).sum())))
    if not out:
        raise ValueError("no gold answer token is an allowed answer token: the score would be 1 for any model")
    return out


def teacher_forced_score(logprobs: Sequence[float]) -> float:
    """Probability of the whole answer, the product over its tokens (from teacher_forced_logprobs)."""
    return float(np.exp(np.sum(np.asarray(logprobs, dtype=np.float64))))


TASKS: dict[str, Task] = {
    "gsm8k": Task(
        name="gsm8k",
        answer_trigger="Therefore, the answer (arabic numerals) is",
        hub_id="openai/gsm8k",
        hub_config="main",
        hub_split="test",
        parse=parse_gsm8k,
        extract=extract_number,
        answer_tokens=lambda tok: digit_token_ids(vocabulary(tok)) + newline_token_ids(vocabulary(tok)),
    ),
    "csqa": Task(
        name="csqa",
        answer_trigger="Therefore, among A through E, the answer is",
        hub_id="tau/commonsense_qa",
        hub_config=None,
        hub_split="validation",
        parse=parse_csqa,
        extract=extract_choice,
        answer_tokens=choice_token_ids,
    ),
}


def get_task(task: Task | str) -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[task]


def load_examples(task: Task | str, source: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """The task's questions from a local JSONL file or a Hugging Face dataset (None: the task's default one).

    A dataset is written `ID[:CONFIG][@SPLIT]` (e.g. "openai/gsm8k:main@test"); the task's own id gets its config
    and split by default. `limit` keeps the first N questions.
    """
    task = get_task(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if source is None:
        records = _hub_records(task, task.hub_id)
    elif os.path.exists(source):
        records = ((where, record) for record, where in jsonl_records(Path(source)))
    elif isinstance(source, Path) or str(source).endswith((".jsonl", ".json")) or str(source).startswith((".", "/")):
        raise FileNotFoundError(f"{source}: no such file; pass a local JSONL file or a Hugging Face dataset id")
    else:
        records = _hub_records(task, str(source))
    examples = []
    for index, (where, record) in enumerate(records):
        if limit is not None and index >= limit:
            break
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        try:
            example = task.parse(record)
        except KeyError as error:
            raise DataError(f"{where}: missing field {error} (not {task.name}'s format)") from error
        except (TypeError, ValueError) as error:
            raise DataError(f"{where}: {error} (not {task.name}'s format)") from error
        examples.append(replace(example, index=index))
    if not examples:
        raise DataError(f"{source or task.hub_id}: no questions in it")
    return examples


def _strip_word_start(token: str) -> str:
    return token[1:] if token.startswith(WORD_START) else token


def _hub_records(task: Task, spec: str) -> Iterator[tuple[str, Any]]:
    name, _, split = spec.partition("@")
    name, _, given = name.partition(":")
    config = given or (task.hub_config if name == task.hub_id else None)
    split = split or task.hub_split
    instead = "pass a local JSONL file with --data"
    datasets = require_extra("datasets", "data", f"loading {spec!r} from the Hugging Face Hub", instead)
    require_hub(f"load {spec!r}", instead)
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # offline, unknown id, wrong config or split: all mean "use a local file"
        raise DataError(
            f"could not load {spec!r} (config {config}, split {split}) from the Hugging Face Hub: {error}; {instead}"
        ) from error
    for number, record in enumerate(rows):
        yield f"{name}[{split}] row {number}", record
