"""Loading GSM8K / CommonsenseQA, the prompts, and the authors' teacher-forced answer metric."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from helpers import shared_file

from qstar.core.eval.tasks import (
    TASKS,
    DataError,
    Example,
    answer_token_ids,
    digit_token_ids,
    get_task,
    load_examples,
    teacher_forced_logprobs,
    teacher_forced_score,
)

CSQA_NESTED = {
    "answerKey": "B",
    "id": "q1",
    "question": {
        "question_concept": "ball",
        "choices": [{"label": label, "text": text} for label, text in zip("ABCDE", "abcde", strict=True)],
        "stem": "Where is the ball?",
    },
}
CSQA_FLAT = {
    "id": "q2",
    "question": "Where is the cat?",
    "question_concept": "cat",
    "choices": {"label": list("ABCDE"), "text": ["mat", "hat", "bat", "vat", "sat"]},
    "answerKey": "A",
}


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_gsm8k_test_set_loads():
    examples = load_examples("gsm8k", shared_file("data/gsm8k/test.jsonl"))
    assert len(examples) == 1319
    assert [e.index for e in examples[:3]] == [0, 1, 2]
    first = examples[0]
    assert first.gold == "18" and first.question.startswith("Janet") and first.reference.endswith("#### 18")
    assert all(e.gold and not e.choices for e in examples)
    assert len(load_examples("gsm8k", str(shared_file("data/gsm8k/test.jsonl")), limit=5)) == 5


def test_gsm8k_prompts():
    task = get_task("gsm8k")
    example = Example(0, "How many?", "18", "9 * 2 = 18\n#### 18")
    assert task.prompt(example) == "Q: How many?\nA: Let's think step by step."
    reasoning = " 9 * 2 = 18 eggs.  \n\n"
    assert task.answer_prompt(example, reasoning) == (
        "Q: How many?\nA: Let's think step by step. 9 * 2 = 18 eggs. Therefore, the answer (arabic numerals) is"
    )
    assert task.answer_prompt(example, reasoning, "\n").endswith("eggs.\nTherefore, the answer (arabic numerals) is")
    assert task.extract(" $18.") == "18"
    assert task.teacher_forced_prompt(example) == ("Q: How many?\nA:", " 18\n")


def test_csqa_both_layouts_and_prompts(tmp_path):
    examples = load_examples("csqa", write_jsonl(tmp_path / "csqa.jsonl", [CSQA_NESTED, "", CSQA_FLAT]))
    nested, flat = examples
    assert (nested.index, nested.gold, nested.question, nested.choices[1]) == (0, "B", "Where is the ball?", ("B", "b"))
    assert (flat.index, flat.gold, flat.choices[0]) == (1, "A", ("A", "mat"))
    task = TASKS["csqa"]
    assert task.prompt(flat) == (
        "Q: Where is the cat? Answer Choices: (A) mat (B) hat (C) bat (D) vat (E) sat\nA: Let's think step by step."
    )
    assert task.answer_prompt(flat, " Cats sit.").endswith("Cats sit. Therefore, among A through E, the answer is")
    assert task.extract(" (e).") == "E"
    context, answer = task.teacher_forced_prompt(flat)
    assert context == "Q: Where is the cat?\n(A) mat\n(B) hat\n(C) bat\n(D) vat\n(E) sat\nA:" and answer == " A\n"


@pytest.mark.parametrize(
    "lines,task,message",
    [
        (['{"question": "x", "answer": "#### 1"}', "{not json"], "gsm8k", r"data\.jsonl:2: not valid JSON"),
        (['{"question": "x"}'], "gsm8k", r"data\.jsonl:1: missing field 'answer'"),
        (['{"question": "x", "answer": "18"}'], "gsm8k", r"data\.jsonl:1: no '####'"),
        (['{"question": 3, "answer": "#### 1"}'], "gsm8k", r"data\.jsonl:1: 'question' and 'answer' must be strings"),
        (["[1, 2]"], "gsm8k", r"data\.jsonl:1: expected a JSON object, got list"),
        ([json.dumps({**CSQA_FLAT, "answerKey": ""})], "csqa", r"data\.jsonl:1: empty 'answerKey'.*validation"),
        ([json.dumps({**CSQA_FLAT, "answerKey": "F"})], "csqa", r"data\.jsonl:1: answerKey 'F' is not one of"),
        ([json.dumps(CSQA_FLAT)], "gsm8k", r"data\.jsonl:1: missing field 'answer' \(not gsm8k's format\)"),
        (["", "  "], "gsm8k", r"data\.jsonl: no questions"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, lines, task, message):
    with pytest.raises(DataError, match=message):
        load_examples(task, write_jsonl(tmp_path / "data.jsonl", lines))


def test_missing_file_directory_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        load_examples("gsm8k", str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_examples("gsm8k", "data/test.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        load_examples("gsm8k", tmp_path)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_examples("gsm8k", tmp_path, limit=0)
    with pytest.raises(ValueError, match="unknown task 'math'; known tasks: gsm8k, csqa"):
        get_task("math")


def test_hub_ids_go_through_datasets(monkeypatch, online):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "q", "answer": "#### 4"}, {"question": "r", "answer": "#### 5"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert [e.gold for e in load_examples("gsm8k")] == ["4", "5"]
    load_examples("gsm8k", "someone/gsm-copy@train", limit=1)
    load_examples("gsm8k", "openai/gsm8k:socratic")
    assert calls == [
        ("openai/gsm8k", "main", "test"),
        ("someone/gsm-copy", None, "train"),
        ("openai/gsm8k", "socratic", "test"),
    ]


def test_hub_errors_point_to_local_files(monkeypatch, online):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"needs datasets.*qstar-lm\[data\]'.*pass a local JSONL file with --data"):
        load_examples("csqa")

    def offline(name, config, split):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match=r"could not load 'tau/commonsense_qa'.*no network.*--data"):
        load_examples("csqa")
    bad = types.SimpleNamespace(load_dataset=lambda name, config, split: [{"question": "q"}])
    monkeypatch.setitem(sys.modules, "datasets", bad)
    with pytest.raises(DataError, match=r"openai/gsm8k\[test\] row 0: missing field 'answer'"):
        load_examples("gsm8k")


SENTENCEPIECE = [
    "<unk>",
    "<s>",
    "</s>",
    "<0x0A>",
    "\u2581",
    "1",
    "8",
    ",",
    "\u2581A",
    "\u2581B",
    "A",
    "\u2581the",
    "0",
    "\u258112",
    "Apple",
    "\u2581C",
    "\u2581D",
    "\u2581E",
    "\u2581F",
    "\u00b2",
]


class SentencePieceLike:
    """Encodes "\nA: B" as SentencePiece does: the space joins the letter ("▁B"), a newline is <0x0A>."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids, pending_space = [], False
        for char in text:
            if char == " ":
                pending_space = True
            elif char == "\n":
                ids.append(SENTENCEPIECE.index("<0x0A>"))
            else:
                piece = ("\u2581" if pending_space else "") + char
                ids.append(SENTENCEPIECE.index(piece) if piece in SENTENCEPIECE else 0)
                pending_space = False
        return {"input_ids": ids}


class FakeTokenizer:
    def __len__(self) -> int:
        return len(SENTENCEPIECE)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [SENTENCEPIECE[i] for i in ids]


def test_answer_tokens():
    assert digit_token_ids(SENTENCEPIECE) == [5, 6, 12, 13]
    assert answer_token_ids("gsm8k", FakeTokenizer()) == [5, 6, 12, 13, 3]
    # CSQA: the letters as the tokenizer writes them after "A: " and the newline after them (the authors' set)
    assert answer_token_ids("csqa", SentencePieceLike()) == [8, 9, 15, 16, 17, 3]
    assert digit_token_ids(["\u0120", "\u0120123", "12a", "\u0120\u0120"]) == [1]
    assert answer_token_ids("gsm8k", ["\u010a", "\n", "7"]) == [2, 0, 1]


def test_teacher_forced_restricts_the_softmax_and_skips_other_tokens():
    allowed = [1, 2, 3]
    logits = np.array(
        [
            [9.0, 0.0, 0.0, 0.0],  # gold 0 is not an answer token (the space before a number): skipped
            [5.0, np.log(1.0), np.log(2.0), np.log(1.0)],  # gold 2: 2 / (1 + 2 + 1)
            [0.0, np.log(3.0), np.log(1.0), 0.0],
        ]
    )  # gold 1: 3 / (3 + 1 + 1)
    logprobs = teacher_forced_logprobs(logits, [0, 2, 1], allowed)
    np.testing.assert_allclose(np.exp(logprobs), [0.5, 0.6])
    assert teacher_forced_score(logprobs) == pytest.approx(0.3)
    assert teacher_forced_score([]) == 1.0
    with pytest.raises(ValueError, match="no gold answer token"):
        teacher_forced_logprobs(logits[:1], [0], allowed)
    with pytest.raises(ValueError, match=r"logits must be \(2, vocab\)"):
        teacher_forced_logprobs(logits, [1, 2], allowed)
