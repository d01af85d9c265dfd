"""`qstar eval` end to end: numbers that can be published. The baseline without thoughts has none, every sample is
seeded by its question (the same command gives the same answers, interrupted or not), answers of another evaluation
are never mixed in, and a generation that meets the model's context stops there, saying so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import backend_params, shared_file
from typer.testing import CliRunner

import qstar
from qstar.cli.main import app
from qstar.core.eval.run import EvalSettings, teacher_forced
from qstar.core.eval.tasks import (
    TASKS,
    answer_token_ids,
    load_examples,
    teacher_forced_logprobs,
    teacher_forced_score,
)
from qstar.weights import DEFAULT_MODEL

runner = CliRunner()


def eval_args(model: Path, out: Path, *more: str) -> list[str]:
    data = shared_file("data/gsm8k/test.jsonl")
    return ["eval", "gsm8k", "--model", str(model), "--data", str(data), "--out", str(out), *more]


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", backend_params("torch", "mlx"))
def test_eval_gsm8k_end_to_end_and_resume(mixing_checkpoint, tmp_path, backend):
    args = eval_args(mixing_checkpoint, tmp_path, "--limit", "3", "--max-tokens", "6", "--batch-size", "2")
    args += ["--backend", backend, "--teacher-forced"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["n"] == 3 and results["task"] == "gsm8k" and results["thoughts"] is True
    assert 0 <= results["metrics"]["teacher_forced_answer_probability"] <= 1
    header, *records = lines(tmp_path)
    assert header["evaluation"]["settings"]["protocol"] == "qstar" and header["evaluation"]["task"] == "gsm8k"
    assert [r["scores"]["qstar"]["gold"] for r in records] == ["18", "3", "70000"]
    for r in records:  # what happened to each sample is in its record
        (info,) = r["samples"]
        assert info["stop"] in ("eos", "stop", "max_tokens") and 0 < info["reasoning_tokens"] <= 6
        assert info["prompt_tokens"] > 50 and info["answer_tokens"] > 0
    again = runner.invoke(app, args)  # resumes: nothing left to do, same numbers
    assert again.exit_code == 0
    assert lines(tmp_path) == [header, *records]
    assert json.loads((tmp_path / "results.json").read_text())["metrics"] == results["metrics"]


def test_the_baseline_without_thoughts_uses_the_plain_predictions(mixing_checkpoint):
    """--no-thoughts --teacher-forced scored the thought-mixed logits before; with a mixing head that mixes, the two
    numbers differ, and the baseline is what the plain logits give."""
    m = qstar.load(mixing_checkpoint, backend="torch")
    examples = load_examples("gsm8k", str(shared_file("data/gsm8k/test.jsonl")), limit=3)
    with_thoughts = teacher_forced(m, TASKS["gsm8k"], examples, EvalSettings())
    without = teacher_forced(m, TASKS["gsm8k"], examples, EvalSettings(thoughts=False))
    assert with_thoughts != without
    plain = []  # the baseline computed by hand from the plain logits, the authors' way
    for e in examples:
        context, answer = TASKS["gsm8k"].teacher_forced_prompt(e)
        start, ids = len(m.tokenizer(context)["input_ids"]), m.tokenizer(context + answer)["input_ids"]
        logits = m.logits([ids])[0, start - 1 : len(ids) - 1]
        allowed = answer_token_ids("gsm8k", m.tokenizer)
        plain.append(teacher_forced_score(teacher_forced_logprobs(logits, ids[start:], allowed)))
    assert without == pytest.approx(float(np.mean(plain)), rel=1e-6)


def test_a_sampled_eval_is_the_same_in_another_process_and_after_an_interruption(mixing_checkpoint, tmp_path):
    more = ["--limit", "5", "--votes", "2", "--temperature", "0.8", "--max-tokens", "5", "--batch-size", "4"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert runner.invoke(app, [*eval_args(mixing_checkpoint, first, *more), "--backend", "torch"]).exit_code == 0
    code = "import sys; from qstar.cli.main import app; sys.argv = ['qstar', *sys.argv[1:]]; app()"
    cmd = [sys.executable, "-c", code, *eval_args(mixing_checkpoint, second, *more), "--backend", "torch"]
    subprocess.run(cmd, check=True, capture_output=True)
    assert (first / "questions.jsonl").read_text() == (second / "questions.jsonl").read_text()
    # a kill after two questions, in the middle of the third's line: the resumed run writes what the whole one did
    whole = (first / "questions.jsonl").read_text().splitlines(keepends=True)
    (second / "questions.jsonl").write_text("".join(whole[:3]) + whole[3][:40])
    (second / "results.json").unlink()
    assert runner.invoke(app, [*eval_args(mixing_checkpoint, second, *more), "--backend", "torch"]).exit_code == 0
    assert (second / "questions.jsonl").read_text() == "".join(whole)
    assert json.loads((second / "results.json").read_text()) == json.loads((first / "results.json").read_text())


def test_answers_of_another_evaluation_are_never_mixed_in(mixing_checkpoint, llama_checkpoint, tmp_path):
    more = ["--limit", "2", "--max-tokens", "4", "--backend", "torch"]
    assert runner.invoke(app, eval_args(mixing_checkpoint, tmp_path, *more)).exit_code == 0
    before = (tmp_path / "questions.jsonl").read_text()
    for change, what in (
        (["--no-thoughts"], "thoughts: True there, False now"),
        (["--model", str(llama_checkpoint)], "model"),
        (["--max-tokens", "3"], "max_tokens: 4 there, 3 now"),
    ):
        result = runner.invoke(app, [*eval_args(mixing_checkpoint, tmp_path, *more), *change])
        assert result.exit_code == 1 and "holds the answers of another evaluation" in result.output, result.output
        assert what in result.output and "--overwrite" in result.output
        assert (tmp_path / "questions.jsonl").read_text() == before
    result = runner.invoke(app, [*eval_args(mixing_checkpoint, tmp_path, *more), "--no-thoughts", "--overwrite"])
    assert result.exit_code == 0
    assert json.loads((tmp_path / "results.json").read_text())["thoughts"] is False


def test_a_context_shorter_than_the_question_is_recorded_and_the_eval_goes_on(tmp_path):
    """The shipped model reads characters and has a context of 512: GSM8K prompts are often longer. They lose their
    start (as lm-evaluation-harness does), generations stop at the context, and the records and summary say so."""
    result = runner.invoke(app, eval_args(Path(DEFAULT_MODEL), tmp_path, "--limit", "5", "--max-tokens", "8"))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["n"] == 5 and summary["counts"]["truncated_prompts"] >= 1
    _, *records = lines(tmp_path)
    cut = [r["samples"][0] for r in records if r["samples"][0]["truncated"]]
    assert cut and all(s["prompt_tokens"] + s["truncated"] > 511 for s in cut)
    assert "prompts cut to the context:" in result.output


def test_the_papers_protocol_end_to_end(mixing_checkpoint, tmp_path):
    """The authors' settings with fewer votes and tokens: its two ways of reading the answers are reported."""
    more = ["--protocol", "paper", "--limit", "2", "--votes", "2", "--max-tokens", "4", "--answer-tokens", "3"]
    result = runner.invoke(app, [*eval_args(mixing_checkpoint, tmp_path, *more), "--backend", "torch"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["metric"] == "cot-maj@2 (authors)"
    assert set(summary["metrics"]) == {"pass@1 (authors)", "cot-maj@2 (authors)", "pass@1 (qstar)", "cot-maj@2 (qstar)"}
    _, first, _ = lines(tmp_path)
    assert all(g.count("\nTherefore, the answer (arabic numerals) is") == 1 for g in first["generations"])


def test_a_larger_limit_extends_an_evaluation_and_each_model_has_its_own_default_out(
    mixing_checkpoint, llama_checkpoint, tmp_path, monkeypatch
):
    """The README's command run for a second model, then again with a larger --limit: no collision, no refusal; the
    questions already answered are kept and only the new ones are asked."""
    monkeypatch.chdir(tmp_path)
    data = str(shared_file("data/gsm8k/test.jsonl"))
    common = ["eval", "gsm8k", "--data", data, "--max-tokens", "4", "--backend", "torch"]
    for model in (mixing_checkpoint, llama_checkpoint):
        result = runner.invoke(app, [*common, "--model", str(model), "--limit", "2"])
        assert result.exit_code == 0, result.output
    outs = sorted(tmp_path.glob("runs/eval/*/gsm8k-qstar-thoughts"))
    assert len(outs) == 2
    first = lines(outs[0])
    model = mixing_checkpoint if str(mixing_checkpoint).endswith(outs[0].parent.name[-10:]) else llama_checkpoint
    result = runner.invoke(app, [*common, "--model", str(model), "--limit", "4"])
    assert result.exit_code == 0, result.output
    extended = lines(outs[0])
    assert extended[: len(first)] == first and len(extended) == len(first) + 2
    assert json.loads((outs[0] / "results.json").read_text())["n"] == 4
