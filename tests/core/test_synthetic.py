"""The synthetic letter-function corpus: seeded, correct, disjoint splits, hard tokens where the metric scores them,
a lossless character tokenizer."""

from __future__ import annotations

import itertools
import json
import re
from itertools import islice

import pytest

from qstar.core import synthetic
from qstar.core.synthetic import ALPHABET, VOCAB, char_tokenizer_files, documents, generate_documents, held_out

FORM = re.compile(r"(\d):([a-z]+)=(?:\|(\d+)(_*)\|)?(\d)\.")


def solve(document: str) -> tuple[int, int, int, str | None]:
    """(functions, stated answer, recomputed answer, written values or None), parsing independently of the
    generator."""
    start, chain, written, fill, answer = FORM.fullmatch(document).groups()
    value, trace = int(start), []
    for f in chain:
        value = synthetic.TABLES[f][value]
        trace.append(str(value))
    if written is not None:
        assert written == "".join(trace) and len(written) + len(fill) == synthetic.MAX_STEPS, document
    return len(chain), int(answer), value, written


def test_the_functions_are_fixed_permutations():
    assert set(synthetic.FUNCTIONS) <= set(synthetic.LETTERS)
    assert all(sorted(t) == list(range(10)) for t in synthetic.TABLES.values())
    assert synthetic.TABLES["a"] == [5, 1, 6, 9, 7, 3, 2, 0, 8, 4]  # the same world in every run and version


def test_a_seed_gives_the_same_documents():
    first = generate_documents(200, seed=3)
    assert first == generate_documents(200, seed=3) == list(islice(documents(3), 200))
    assert first != generate_documents(200, seed=4)
    assert generate_documents(50, 3, split="validation") == generate_documents(50, 3, split="validation")


@pytest.mark.parametrize("split", synthetic.SPLITS)
def test_answers_and_written_values_are_right(split):
    docs = generate_documents(3000, seed=0, split=split)
    worked = [d for d in docs if solve(d)[3] is not None]
    for document in docs:
        _, stated, computed, _ = solve(document)
        assert stated == computed, document
    share = len(worked) / len(docs)
    assert 0.45 < share < 0.55 if split == "pretrain" else share == 0


@pytest.mark.parametrize("difficulty, low, high", [(1, 1, 1), (4, 4, 4), ((2, 3), 2, 3)])
def test_difficulty_is_the_chain_length(difficulty, low, high):
    counts = {solve(d)[0] for d in generate_documents(500, seed=1, difficulty=difficulty)}
    assert counts == set(range(low, high + 1))


def test_bad_arguments_are_rejected():
    for difficulty in (0, (3, 2), synthetic.MAX_STEPS + 1):
        with pytest.raises(ValueError, match="number of functions"):
            documents(0, difficulty)
    with pytest.raises(ValueError, match="unknown split"):
        documents(0, split="test")
    with pytest.raises(ValueError, match="not a document"):
        synthetic.parse("a=1;b=a+2;b=3.")


def test_the_alphabet_covers_what_appears():
    seen = set("".join(generate_documents(3000, seed=2, split="pretrain")))
    assert seen <= set(ALPHABET) and len(ALPHABET) == len(set(ALPHABET))
    assert seen >= set("0123456789:=|_.") | set(synthetic.FUNCTIONS)


def test_the_three_splits_are_disjoint_problem_sets():
    problems = {}
    for split in synthetic.SPLITS:
        docs = generate_documents(4000, seed=0, split=split)
        assert all(synthetic.split_of(d) == split for d in docs)
        problems[split] = {synthetic.parse(d)[:2] for d in docs}
    for a, b in itertools.combinations(synthetic.SPLITS, 2):
        assert not problems[a] & problems[b], (a, b)
    # The split is a property of the problem, not of its form or the seed.
    assert synthetic.split_of("6:dhb=0.") == synthetic.split_of(synthetic.render(6, "dhb", worked=True))
    assert held_out("6:dhb=0.") == (synthetic.split_of("6:dhb=0.") == "validation")
    every = [synthetic.render(x, "".join(c), False) for x in range(10) for c in itertools.product("abcd", repeat=3)]
    share = {s: sum(synthetic.split_of(d) == s for d in every) / len(every) for s in synthetic.SPLITS}
    assert abs(share["validation"] - 0.1) < 0.03 and abs(share["train"] - 0.2) < 0.04


def test_hard_tokens_are_the_answers_the_metric_scores(tmp_path):
    """The token the answer-token metric scores (1 + answer_index, after <s>) is the answer digit, and the thought at
    the token before it (the `=`) is the one benchmarks/toy_effect.py checks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(char_tokenizer_files(tmp_path))
    for document in generate_documents(200, seed=6, split="validation"):
        ids = tokenizer(document)["input_ids"]
        mask = synthetic.hard_mask(document)
        hard = [i + 1 for i, m in enumerate(mask) if m]
        assert hard == [1 + synthetic.answer_index(document)]
        assert tokenizer.decode(ids[hard[0]]) == str(solve(document)[1])
        assert tokenizer.decode(ids[hard[0] - 1]) == "="
    assert synthetic.intermediates("6:dhb=0.") == "".join(map(str, synthetic.values(6, "dhb")[:-1]))
    assert synthetic.intermediates("6:d=1.") == ""


def test_held_out_batches_mark_exactly_the_answers_and_the_metric_scores_them(tmp_path):
    """Packed validation batches (trainer.make_streams) flag the answer digit of every document, nothing else; the
    hard-token NLL (session.token_sums) reads the prediction of each flagged token from the position before it."""
    import numpy as np
    from transformers import AutoTokenizer

    from qstar.core.session import evaluation_metrics, token_sums
    from qstar.core.train_config import TrainConfig
    from qstar.core.trainer import make_streams

    tokenizer = AutoTokenizer.from_pretrained(char_tokenizer_files(tmp_path))
    cfg = TrainConfig(out=str(tmp_path / "run"), batch_size=3, max_seq_length=32, val_batches=4)
    train, val = make_streams(cfg, tokenizer, 4)
    assert len(next(train)) == 2  # the training stream carries no marks
    ids = np.concatenate([b.ids for b in val])
    hard = np.concatenate([b.hard for b in val])
    text = "".join(" " if t in (1, 2) else synthetic.VOCAB[t] for t in ids.reshape(-1))
    flagged = np.flatnonzero(hard.reshape(-1))
    answers = [m.end() - 2 for m in synthetic.DOCUMENT.finditer(text)]
    assert len(flagged) > 20 and set(answers) <= set(flagged)
    complete = [i for i in flagged if text[i + 1 : i + 2] == "."]  # the rest end a row, their `.` in the next
    assert set(complete) == set(answers) and all(text[i].isdigit() and text[i - 1] in "=|" for i in flagged)

    rows, length = hard.shape
    nll_base = np.tile(np.arange(length - 1, dtype=float), (2 * rows, 1))  # 2 thoughts per row: rows repeat
    nll_talk = 100 + nll_base[:, : length - 2]  # stream p predicts token p + 1; the last stream scores nothing
    sums = token_sums("hard", nll_base, nll_talk, np.arange(length - 1), hard)
    scored = hard[:, 1 : length - 1]
    positions = np.nonzero(scored)[1]  # the stream (position before the token)
    assert sums["hard_tokens"] == 2 * scored.sum()
    assert sums["nll_base_hard_sum"] == 2 * positions.sum() and sums["nll_talk_hard_sum"] == 2 * (positions + 100).sum()
    means = evaluation_metrics([{**sums, "loss": 1.0}])
    assert means["nll_talk_hard"] - means["nll_base_hard"] == 100 and set(means) == {
        "loss",
        "nll_base_hard",
        "nll_talk_hard",
    }


def test_the_tokenizer_gives_back_the_text(tmp_path):
    from transformers import AutoTokenizer

    char_tokenizer_files(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    specials = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert specials == (0, 1, 2, 3)
    assert len(tokenizer) == len(VOCAB) and tokenizer.convert_ids_to_tokens(list(range(len(VOCAB)))) == list(VOCAB)
    for document in generate_documents(50, seed=5, split="pretrain") + [ALPHABET]:
        ids = tokenizer(document)["input_ids"]
        assert ids[0] == 1 and len(ids) == len(document) + 1 and min(ids[1:]) >= len(synthetic.SPECIAL_TOKENS)
        assert tokenizer.decode(ids, skip_special_tokens=True) == document
        assert tokenizer(document, add_special_tokens=False)["input_ids"] == [VOCAB.index(c) for c in document]
