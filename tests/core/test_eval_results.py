"""Per-question records survive a kill; the results JSON is written in one rename."""

from __future__ import annotations

import json
import os

import pytest

from qstar.core.eval.answers import score_votes
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


def record(index: int, answers: list[str | None], gold: str = "3", stop: str = "eos") -> QuestionRecord:
    samples = [SampleInfo(stop, 12, 30, 2) for _ in answers]
    return QuestionRecord(
        index,
        f"Q: {index}?\nA: Let's think step by step.",
        [f"g{a}" for a in answers],
        samples,
        {"qstar": score_votes(answers, gold)},
    )


HEADER = {"task": "gsm8k", "settings": {"votes": 1}, "model_fingerprint": "abc"}


def test_record_round_trips_through_json():
    r = record(4, ["3", "4", "4"])
    score = r.headline
    assert (score.prediction, r.correct, score.votes, score.pass1) == (
        "4",
        False,
        {"4": 2, "3": 1},
        pytest.approx(1 / 3),
    )
    assert QuestionRecord.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_resume_after_a_kill_mid_write(tmp_path):
    path = tmp_path / "run" / "records.jsonl"
    assert read_records(path) == (None, {})
    with RecordWriter(path, HEADER) as writer:
        for i in range(3):
            writer.write(record(i, ["3"]))
        assert len(read_records(path)[1]) == 3  # flushed while the writer is still open
    with open(path, "a") as handle:  # a kill in the middle of the fourth line
        handle.write(json.dumps(record(3, ["3"]).to_dict())[:25])
    assert sorted(read_records(path)[1]) == [0, 1, 2]
    with RecordWriter(path, HEADER) as writer:  # the resumed run drops the partial line and redoes question 3
        writer.write(record(3, ["\u00e9"]))
    header, done = read_records(path)
    assert header == HEADER and sorted(done) == [0, 1, 2, 3] and done[3].headline.answers == ["\u00e9"]
    lines = path.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and sum("evaluation" in json.loads(line) for line in lines) == 1


def test_a_damaged_record_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "records.jsonl"
    good = json.dumps(record(0, ["3"]).to_dict())
    path.write_text(f"{good}\n{{oops\n{good}\n")
    with pytest.raises(ValueError, match=r"records\.jsonl:2: not a question record"):
        read_records(path)
    path.write_text('{"index": 0}\n')
    with pytest.raises(ValueError, match=r"records\.jsonl:1: not a question record \(a record needs exactly"):
        read_records(path)


def test_summarize_pass1_majority_and_what_happened():
    records = [record(0, ["3", "3", "4"]), record(1, ["4", "4", None], stop="context"), record(2, [None, "3", "5"])]
    result = summarize(records, "gsm8k", "ckpt", True, {"votes": 3})
    assert result.metric == "cot-maj@3" and result.n == 3
    assert result.value == pytest.approx(2 / 3)  # majorities 3, 4, 3 (tie: first seen)
    assert result.metrics == {"pass@1": pytest.approx((2 / 3 + 0 + 1 / 3) / 3), "cot-maj@3": pytest.approx(2 / 3)}
    assert result.counts == {"stops": {"context": 3, "eos": 6}, "truncated_prompts": 0}
    single = summarize([record(0, ["3"]), record(1, ["2"])], "gsm8k", "ckpt", False, {})
    assert (single.metric, single.value, single.metrics) == ("pass@1", 0.5, {"pass@1": 0.5})
    with pytest.raises(ValueError, match=r"different numbers of samples \[1, 3\]"):
        summarize([record(0, ["3"]), *records], "gsm8k", "ckpt", True, {})
    with pytest.raises(ValueError, match="no question records"):
        summarize([], "gsm8k", "ckpt", True, {})


def test_summarize_names_each_way_of_reading_the_answers():
    r = record(0, ["3", "3"])
    both = QuestionRecord(
        r.index, r.prompt, r.generations, r.samples, {**r.scores, "authors": score_votes(["4", "4"], "3")}
    )
    result = summarize([both], "gsm8k", "ckpt", True, {})
    assert result.metric == "cot-maj@2 (qstar)" and result.value == 1.0
    assert result.metrics["cot-maj@2 (authors)"] == 0.0 and result.metrics["pass@1 (authors)"] == 0.0


def test_results_json_is_written_atomically(tmp_path):
    path = tmp_path / "out" / "results.json"
    counts = {"stops": {"eos": 4}, "truncated_prompts": 0}
    result = EvalResult("csqa", "pass@1", 0.25, 4, "ckpt", False, {"votes": 1, "limit": 4}, {"pass@1": 0.25}, counts)
    write_results(path, result)
    assert EvalResult(**json.loads(path.read_text())) == result
    assert json.loads(path.read_text())["thoughts"] is False
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    broken = EvalResult("csqa", "pass@1", 0.5, 4, "ckpt", False, {"unserialisable": object()}, {"pass@1": 0.5}, counts)
    with pytest.raises(TypeError):
        write_results(path, broken)
    assert EvalResult(**json.loads(path.read_text())) == result  # the old file is intact and no temporary file is left
    assert os.listdir(path.parent) == ["results.json"]


def test_running_accuracy():
    running = RunningAccuracy.of([record(0, ["3"]), record(1, ["4"])])
    assert (running.correct, running.n, running.value) == (1, 2, 0.5)
    running.add(True)
    assert str(running) == "acc 66.7% (2/3)"
    assert RunningAccuracy().value == 0.0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
