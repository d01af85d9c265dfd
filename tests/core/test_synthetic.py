"""The synthetic arithmetic corpus: seeded, disjoint splits, correct arithmetic, a lossless character tokenizer."""

from __future__ import annotations

import json
import random
import re
from itertools import islice

import pytest

from qstar.core import synthetic
from qstar.core.synthetic import ALPHABET, VOCAB, char_tokenizer_files, documents, generate_documents, held_out

STEP = re.compile(r"([a-z])=([a-z])([-+*])([a-z]|\d+)")


def solve(document: str) -> tuple[int, int, int]:
    """(operations, stated answer, re-evaluated answer), parsing the text independently of the generator."""
    assert document.endswith(".")
    first, *steps, last = document[:-1].split(";")
    name, value = re.fullmatch(r"([a-z])=(\d+)", first).groups()
    values = {name: int(value)}
    previous = name
    for step in steps:
        target, source, op, operand = STEP.fullmatch(step).groups()
        assert target not in values and source == previous, document
        right = values[operand] if operand.isalpha() else int(operand)
        assert op != "*" or 2 <= right <= 9, document
        values[target] = {"+": values[source] + right, "-": values[source] - right, "*": values[source] * right}[op]
        values[target] %= 100
        previous = target
    asked, answer = re.fullmatch(r"([a-z])=(\d+)", last).groups()
    assert asked == previous and all(0 <= int(n) < 100 for n in re.findall(r"\d+", document)), document
    return len(steps), int(answer), values[asked]


def test_a_seed_gives_the_same_documents():
    first = generate_documents(200, seed=3)
    assert first == generate_documents(200, seed=3) == list(islice(documents(3), 200))
    assert first != generate_documents(200, seed=4)
    assert generate_documents(50, 3, split="validation") == generate_documents(50, 3, split="validation")


def test_the_arithmetic_is_right():
    for document in generate_documents(3000, seed=0):
        _, stated, computed = solve(document)
        assert stated == computed, document


@pytest.mark.parametrize("difficulty, low, high", [(1, 1, 1), (5, 5, 5), ((2, 4), 2, 4)])
def test_difficulty_is_the_number_of_operations(difficulty, low, high):
    counts = {solve(d)[0] for d in generate_documents(500, seed=1, difficulty=difficulty)}
    assert counts == set(range(low, high + 1))


def test_bad_arguments_are_rejected():
    for difficulty in (0, (3, 2), synthetic.MAX_STEPS + 1):
        with pytest.raises(ValueError, match="number of operations"):
            documents(0, difficulty)
    with pytest.raises(ValueError, match="unknown split"):
        documents(0, split="test")
    assert solve(generate_documents(1, 0, difficulty=synthetic.MAX_STEPS)[0])[0] == synthetic.MAX_STEPS


def test_the_alphabet_is_exactly_what_appears():
    seen = set("".join(generate_documents(3000, seed=2)))
    assert seen == set(ALPHABET) and len(ALPHABET) == len(set(ALPHABET))


def test_train_and_validation_are_disjoint_even_under_renaming():
    def form(document: str) -> str:
        names = "".join(dict.fromkeys(c for c in document if c.isalpha()))
        return document.translate(str.maketrans(names, "abcdefghijklmnopqrstuvwxyz"[: len(names)]))

    train = generate_documents(5000, seed=0, difficulty=1)
    validation = generate_documents(500, seed=0, difficulty=1, split="validation")
    assert not any(map(held_out, train)) and all(map(held_out, validation))
    assert not {form(d) for d in train} & {form(d) for d in validation}
    assert held_out("a=1;b=a+2;b=3.") == held_out("q=1;z=q+2;z=3.")
    rng = random.Random(0)
    share = sum(held_out(synthetic.problem(rng, 3)) for _ in range(4000)) / 4000
    assert 0.07 < share < 0.13  # about 1 / VALIDATION_BUCKETS of all problems


def test_the_tokenizer_gives_back_the_text(tmp_path):
    from transformers import AutoTokenizer

    char_tokenizer_files(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    specials = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert specials == (0, 1, 2, 3)
    assert len(tokenizer) == len(VOCAB) and tokenizer.convert_ids_to_tokens(list(range(len(VOCAB)))) == list(VOCAB)
    for document in generate_documents(50, seed=5) + [ALPHABET]:
        ids = tokenizer(document)["input_ids"]
        assert ids[0] == 1 and len(ids) == len(document) + 1 and min(ids[1:]) >= len(synthetic.SPECIAL_TOKENS)
        assert tokenizer.decode(ids, skip_special_tokens=True) == document
        assert tokenizer(document, add_special_tokens=False)["input_ids"] == [VOCAB.index(c) for c in document]
