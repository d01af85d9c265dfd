"""qstar as an lm-evaluation-harness model, offline on task files the tests write: a GSM8K-style generation task with
the harness's own gsm8k_cot_zeroshot filters, a multiple-choice task, a rolling-perplexity task; both backends, with
and without thoughts, the same numbers twice; without thoughts the log-likelihoods are transformers' (HFLM)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import backend_params, require, shared_file

lm_eval = require("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import qstar  # noqa: E402
from qstar.core.eval.harness import QStarLM  # noqa: E402
from qstar.weights import DEFAULT_MODEL  # noqa: E402

GSM8K_YAML = """task: local_gsm8k_cot_zeroshot
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA: Let's think step by step."
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
generation_kwargs:
  until: ["Q:", "</s>", "<|im_end|>"]
  do_sample: false
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "The answer is (\\\\-?[0-9\\\\.\\\\,]+)."
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: "take_first"
"""
"""gsm8k_cot_zeroshot (lm-eval 0.4.13, tasks/gsm8k/gsm8k-cot-zeroshot.yaml) on a local file, max_gen_toks set."""

CHOICE_YAML = """task: local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{problem}}}}="
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

ROLLING_YAML = """task: local_perplexity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""

TOY = ["2:dje=7.", "0:mpg=3.", "5:ab=1.", "9:q=4.", "1:xyz=6."]
"""Synthetic documents (the shipped model's world) as problems."""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    gsm8k = shared_file("data/gsm8k/test.jsonl")
    (folder / "gsm8k.jsonl").write_text("".join(gsm8k.read_text().splitlines(keepends=True)[:5]))
    choices = [{"problem": d[: d.index("=")], "choices": list("0123456789"), "answer": int(d[-2])} for d in TOY]
    (folder / "choice.jsonl").write_text("".join(json.dumps(c) + "\n" for c in choices))
    (folder / "rolling.jsonl").write_text("".join(json.dumps({"text": " ".join(TOY[i:])}) + "\n" for i in range(3)))
    for name, text in (("gsm8k", GSM8K_YAML), ("choice", CHOICE_YAML), ("rolling", ROLLING_YAML)):
        yaml = text.format(data=folder / f"{name}.jsonl", max_gen_toks=8)
        (folder / f"{name}.yaml").write_text(yaml)
    return folder


def evaluate(tasks: Path, backend: str, thoughts: bool) -> dict:
    model = QStarLM(DEFAULT_MODEL, backend=backend, thoughts=thoughts, batch_size=2)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    names = ["local_gsm8k_cot_zeroshot", "local_choice", "local_perplexity"]
    return lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, log_samples=True)


@pytest.mark.parametrize("thoughts", [True, False])
@pytest.mark.parametrize("backend", backend_params("torch", "mlx"))
def test_every_kind_of_request_through_the_harness_twice_alike(tasks, backend, thoughts):
    first, second = evaluate(tasks, backend, thoughts), evaluate(tasks, backend, thoughts)
    assert first["results"] == second["results"]
    results = first["results"]
    assert set(results["local_gsm8k_cot_zeroshot"]) >= {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert 0 <= results["local_choice"]["acc,none"] <= 1
    assert results["local_perplexity"]["word_perplexity,none"] > 1
    generations = {s["doc_id"]: s["resps"][0][0] for s in first["samples"]["local_gsm8k_cot_zeroshot"]}
    assert sorted(generations) == list(range(5)) and all(isinstance(g, str) for g in generations.values())


def test_thoughts_change_the_scores_of_a_trained_model(tasks, mixing_checkpoint):
    """A mixing head that mixes in something: thoughts move every log-likelihood, and is_greedy follows the mixed
    prediction."""
    requests = [Instance("loglikelihood", {}, ("ab", "cd"), 0), Instance("loglikelihood", {}, ("xyz", " q"), 1)]
    plain = QStarLM(str(mixing_checkpoint), backend="torch", thoughts=False).loglikelihood(requests)
    mixed = QStarLM(str(mixing_checkpoint), backend="torch", thoughts=True).loglikelihood(requests)
    assert all(abs(a[0] - b[0]) > 1e-6 for a, b in zip(plain, mixed, strict=True))


def test_without_thoughts_the_loglikelihoods_are_transformers(tasks, llama_checkpoint, tmp_path):
    """HFLM (transformers) and qstar on the same converted checkpoint, float32, request by request: 1e-4."""
    from lm_eval.models.huggingface import HFLM

    converted = qstar.convert(str(llama_checkpoint), str(tmp_path / "ckpt"), backend="torch")
    texts = [("Hello there,", " general"), ("A", "bcdefg"), ("", "xyz"), ("1 2 3", " 4 5")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(texts)]
    rolling = [Instance("loglikelihood_rolling", {}, ("the quick brown fox " * 40,), 0)]
    ours = QStarLM(converted, thoughts=False, batch_size=3, max_length=64)  # rolling: several windows
    hf = HFLM(pretrained=str(tmp_path / "ckpt"), batch_size=3, dtype="float32", device="cpu", max_length=64)
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(requests), hf.loglikelihood(requests), strict=True):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b
    assert abs(ours.loglikelihood_rolling(rolling)[0] - hf.loglikelihood_rolling(rolling)[0]) < 1e-3


def test_bad_model_args_and_missing_checkpoints_are_one_line(tasks, tmp_path):
    command = [sys.executable, "-m", "qstar.lm_eval", "run", "--model", "qstar", "--tasks", "local_choice"]
    command += ["--include_path", str(tasks)]
    for model_args, says in (
        (f"pretrained={DEFAULT_MODEL},bogus=1", "unknown key 'bogus'"),
        (f"pretrained={tmp_path / 'nothing'}", "does not exist"),
    ):
        done = subprocess.run([*command, "--model_args", model_args], capture_output=True, text=True, cwd=tmp_path)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 1 and len(errors) == 1 and says in errors[0], done.stderr[-2000:]
        assert "Traceback" not in done.stderr


def test_a_continuation_longer_than_the_context_is_one_clear_error():
    model = QStarLM(DEFAULT_MODEL, max_length=8)
    with pytest.raises(ValueError, match="does not fit the model's context of 8"):
        model.loglikelihood([Instance("loglikelihood", {}, ("a", "1234567890" * 2), 0)])


def test_the_harness_and_qstar_eval_generate_alike(tmp_path, mixing_checkpoint):
    """20 GSM8K questions, greedy, with and without thoughts: the harness's gsm8k_cot_zeroshot and `qstar eval gsm8k`
    (protocol qstar) ask the same prompt, seed each question alike and batch alike, so the reasoning is the same text
    up to where each stops (the harness at "Q:", qstar at "\nQ:"); they score it differently (the harness reads
    "The answer is N." or the last number, qstar asks for the answer after its trigger and reads the first)."""
    from typer.testing import CliRunner

    from qstar.cli.main import app
    from qstar.core.eval.tasks import TASKS

    data = shared_file("data/gsm8k/test.jsonl")
    (tmp_path / "gsm8k.yaml").write_text(GSM8K_YAML.format(data=data, max_gen_toks=12))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    m = qstar.load(str(mixing_checkpoint), backend="torch")
    trigger = " " + TASKS["gsm8k"].answer_trigger
    for thoughts in (True, False):
        lm = QStarLM(m, thoughts=thoughts, batch_size=8)
        out = lm_eval.simple_evaluate(model=lm, tasks=["local_gsm8k_cot_zeroshot"], task_manager=manager, limit=20)
        harness = {s["doc_id"]: s["resps"][0][0] for s in out["samples"]["local_gsm8k_cot_zeroshot"]}
        args = ["eval", "gsm8k", "--model", str(mixing_checkpoint), "--data", str(data), "--limit", "20"]
        args += [
            "--max-tokens",
            "12",
            "--batch-size",
            "8",
            "--backend",
            "torch",
            "--out",
            str(tmp_path / str(thoughts)),
        ]
        result = CliRunner().invoke(app, [*args, "--thoughts" if thoughts else "--no-thoughts"])
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in (tmp_path / str(thoughts) / "questions.jsonl").read_text().splitlines()]
        for record in records[1:]:
            reasoning = record["generations"][0].split(trigger)[0]
            assert reasoning.split("Q:")[0].rstrip() == harness[record["index"]].rstrip(), record["index"]
    assert np.isfinite(out["results"]["local_gsm8k_cot_zeroshot"]["exact_match,flexible-extract"])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("backend", backend_params("torch", "mlx"))
def test_next_token_scores_are_the_log_softmax_of_the_predictions(mixing_checkpoint, backend, monkeypatch):
    """next_token_scores reduces on the device what next_token_logits returns: the same log-probabilities and argmax
    flags, plain and mixed, in one chunk of positions or one position at a time."""
    m = qstar.load(str(mixing_checkpoint), backend=backend)
    ids = np.random.default_rng(0).integers(3, 90, (3, 24))
    positions, seeds = np.array([0, 4, 5, 13, 22]), [[0, 1], [0, 2], [0, 3]]
    targets = ids[:, positions + 1]
    full = m.next_token_logits(ids, seed=seeds)
    for thoughts, logits in ((True, full.mixed[:, positions]), (False, full.plain[:, positions])):
        want = np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0]
        for chunk in (qstar.core.model.SCORED_LOGITS, 3 * m.config.vocab_size):  # every position / one at a time
            monkeypatch.setattr(qstar.core.model, "SCORED_LOGITS", chunk)
            got = m.next_token_scores(ids, targets, positions, seed=seeds, thoughts=thoughts)
            np.testing.assert_allclose(got.logprob, want, atol=2e-5)
            assert np.array_equal(got.greedy, logits.argmax(-1) == targets)
    with pytest.raises(ValueError, match="targets must be integers of shape"):
        m.next_token_scores(ids, targets[:, :2], positions)
