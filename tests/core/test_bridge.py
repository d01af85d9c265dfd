"""The bridge world: seeded, arithmetic right, worked and hidden forms agreeing on the answer, splits that never share
a problem, hard tokens on the answer word, and `--data bridge` through the data layer."""

from __future__ import annotations

import itertools
import re

import pytest

from qstar.core import bridge
from qstar.core.bridge import NUMBERS, STEPS, documents, generate_documents, split_of
from qstar.core.data import hard_mask, open_documents

WORD = {w: i for i, w in enumerate(NUMBERS)}
FORM = re.compile(r"Start at (\w+), (.*)\. The result is(?: — (.*) —)? (\w+)\.")


def solve(document: str) -> tuple[int, int, list[int] | None]:
    """(stated answer, recomputed answer, written values or None), parsed independently of the generator."""
    start, steps, written, answer = FORM.fullmatch(document).groups()
    value, trace = WORD[start], []
    for step in steps.split(", "):
        verb, amount = step.split(" ")
        if verb in ("add", "subtract"):
            value += WORD[amount] if verb == "add" else -WORD[amount]
        else:
            value = 2 * value if verb == "double" else value / 2
        assert value == int(value) and 0 <= value <= 9, document
        trace.append(int(value))
    assert len(trace) == STEPS
    return WORD[answer], trace[-1], None if written is None else [WORD[w] for w in written.split(", ")]


@pytest.mark.parametrize("split", bridge.SPLITS)
def test_answers_and_written_values_are_right(split):
    docs = generate_documents(2000, seed=0, split=split)
    worked = 0
    for document in docs:
        stated, computed, written = solve(document)
        assert stated == computed, document
        if written is not None:
            worked += 1
            assert written[-1] == stated and written[:-1] == [WORD[w] for w in bridge.intermediates(document)]
    assert 0.45 < worked / len(docs) < 0.55 if split == "pretrain" else worked == 0


def test_the_two_forms_of_a_problem_agree_on_everything_but_the_field():
    for document in generate_documents(300, seed=2, split="pretrain"):
        start, steps, worked = bridge.parse(document)
        hidden, written = bridge.render(start, steps, False), bridge.render(start, steps, True)
        assert document == (written if worked else hidden)
        assert bridge.answer(hidden) == bridge.answer(written) and split_of(hidden) == split_of(written)
        assert re.sub(r" — .* —", "", written) == hidden


def test_the_splits_never_share_a_problem():
    problems = {}
    for split in bridge.SPLITS:
        for document in generate_documents(1500, seed=5, split=split):
            start, steps, _ = bridge.parse(document)
            problems.setdefault((start, tuple(steps)), set()).add(split)
            assert split_of(document) == split
    assert all(len(splits) == 1 for splits in problems.values())
    assert {s for splits in problems.values() for s in splits} == set(bridge.SPLITS)


def test_a_seed_gives_the_same_documents():
    first = generate_documents(100, seed=3)
    assert first == list(itertools.islice(documents(3), 100)) and first != generate_documents(100, seed=4)


def test_the_hard_token_is_the_answer_word():
    text = "x\n" + "\n".join(generate_documents(3, seed=1, split="pretrain"))
    marked = "".join(c if flag else "_" for c, flag in zip(text, hard_mask(text), strict=True))
    answers = [bridge.answer(d) for d in text.split("\n")[1:]]
    assert [w for w in marked.split("_") if w] == answers


def test_data_specs():
    train = list(itertools.islice(open_documents("bridge", part="train"), 50))
    held = list(itertools.islice(open_documents("bridge", part="validation"), 50))
    pretrain = list(itertools.islice(open_documents("bridge:pretrain"), 200))
    assert {split_of(d) for d in train} == {"train"} and {split_of(d) for d in held} == {"validation"}
    assert {split_of(d) for d in pretrain} == {"pretrain"} and any(" — " in d for d in pretrain)
    assert not any(" — " in d for d in train + held)
    with pytest.raises(ValueError, match="bridge:pretrain"):
        next(open_documents("bridge:other"))
