"""qstar as an lm-evaluation-harness model, offline on task files the tests write: a GSM8K-style generation task with
the harness's own gsm8k_cot_zeroshot filters, a multiple-choice task, a rolling-perplexity task; both backends, with
and without thoughts, the same numbers twice; without thoughts the log-likelihoods are transformers' (HFLM)."""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    assert_harness_like_hflm,
    backend_params,
    bos_tokenizer,
    char_tokenizer,
    make_hf_checkpoint,
    require,
    shared_file,
)

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


@pytest.fixture(scope="module", params=["plain", "bos"])
def full_vocabulary(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama converted by qstar whose vocabulary is its tokenizer's (98 ids), so that the thought delimiters
    lie beyond the LM head, as in a real model's conversion: qstar never emits them, transformers would. Its
    tokenizer adds BOS before every text (`bos`) or nothing (`plain`)."""
    folder = tmp_path_factory.mktemp(request.param)
    path = make_hf_checkpoint(folder / "hf", "llama", vocab_size=98)
    (bos_tokenizer() if request.param == "bos" else char_tokenizer()).save_pretrained(path)
    qstar.convert(str(path), str(folder / "qstar"), backend="torch")
    return folder / "qstar"


ROLLING_TEXT = " ".join(TOY) * 70
"""2,870 characters: several rolling windows of the shipped model's 512 tokens and the tiny models' 1,024."""
CONTEXTS = ["2:dje=", "the quick", "the quick brown fox " * 60]
"""Generation prompts; the last is longer than max_length - max_gen_toks, so it loses its start."""


def test_without_thoughts_the_shipped_model_answers_every_request_as_hflm():
    """HFLM with its default arguments on the shipped model (its tokenizer adds BOS): the same tokens, windows of the
    model's whole context (512 tokens), generation's left truncation; the same numbers."""
    assert_harness_like_hflm(Path(DEFAULT_MODEL), ROLLING_TEXT, CONTEXTS)


@pytest.mark.parametrize("max_length", [None, 40])
def test_without_thoughts_every_request_is_answered_as_hflm_answers_it(full_vocabulary, max_length):
    """HFLM with its default arguments, BOS added by the tokenizer or not; with max_length=40 given to both, long
    contexts left-truncated in every kind of request and rolling windows of 40 tokens."""
    assert_harness_like_hflm(
        full_vocabulary, ROLLING_TEXT, CONTEXTS, **({} if max_length is None else {"max_length": max_length})
    )


def lm_eval_command(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """`python -m qstar.lm_eval ARGV` in this process (the harness imported once, not once a command): its exit
    status, stdout and stderr. The environment it sets (offline flags) is restored afterwards."""
    from qstar import lm_eval as command

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, os.environ.get(name, "0"))
    monkeypatch.setattr(sys, "argv", ["qstar.lm_eval", *argv])
    capsys.readouterr()
    try:
        command.main()
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_model_args_and_missing_checkpoints_are_one_line(tasks, tmp_path, monkeypatch, capsys):
    command = ["run", "--model", "qstar", "--tasks", "local_choice", "--include_path", str(tasks)]
    for model_args, says in (
        (f"pretrained={DEFAULT_MODEL},bogus=1", "unknown key 'bogus'"),
        (f"pretrained={tmp_path / 'nothing'}", "does not exist"),
    ):
        code, _, err = lm_eval_command([*command, "--model_args", model_args], monkeypatch, capsys)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1 and says in errors[0], err[-2000:]
        assert "Traceback" not in err


def test_the_command_computes_where_qstar_would_unless_told_a_device(tasks, monkeypatch, capsys):
    """Without --device the harness's own default (cuda:0) does not reach qstar: on a CPU machine the command runs; a
    device named on purpose that the machine lacks is one error line. (The command's own process: the README's
    test, tests/test_readme.py.)"""
    import torch

    command = ["run", "--model", "qstar", "--tasks", "local_choice", "--include_path", str(tasks)]
    command += ["--model_args", f"pretrained={DEFAULT_MODEL},thoughts=false"]
    code, out, err = lm_eval_command(command, monkeypatch, capsys)
    assert code == 0 and "local_choice" in out, err[-2000:]
    if torch.cuda.is_available():
        return
    code, _, err = lm_eval_command([*command, "--device", "cuda:0"], monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and errors == [
        f"error: device cuda:0 is not available: this PyTorch ({torch.__version__}) sees 0 CUDA devices; pass "
        "--device cpu, or leave --device out"
    ], err[-2000:]


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


REQUESTS = [
    ("2:dje=", "7."),
    ("0:mpg=3. 5:ab=", "1."),
    ("", "xyz"),
    ("the quick brown fox", " jumps over"),
    ("9:q=", "4."),
    ("1:xyz=6. 2:dje=7. 0:mpg=", "3."),
    ("ab", "cd"),
    ("q", " 4 5 6 7"),
    ("Hello there,", " general"),
    ("A", "bcdefg"),
]
"""Loglikelihood requests of many lengths, one with an empty context."""


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


@pytest.mark.parametrize("backend", backend_params("torch", "mlx"))
def test_thinking_only_at_the_scored_positions_gives_the_numbers_of_thinking_everywhere(mixing_checkpoint, backend):
    """Each request scored from a batch that thinks at its rows' continuation positions only equals the same request
    alone, thinking at every position (next_token_logits), seeded by (seed, its tokens)."""
    m = qstar.load(str(mixing_checkpoint), backend=backend)
    lm = QStarLM(m, thoughts=True, batch_size=4, seed=3)
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(REQUESTS)])
    for (context, continuation), (score, greedy) in zip(REQUESTS, got, strict=True):
        c, t = (
            lm._encode_pair(context, continuation) if context else ([lm.prefix_token_id], lm.tok_encode(continuation))
        )
        row = np.array(c + t)
        seed = [[3, zlib.crc32(row.astype(np.int64).tobytes())]]
        mixed = m.next_token_logits(row[None, :-1], seed=seed).mixed[0, len(c) - 1 :]
        assert abs(score - log_softmax(mixed)[np.arange(len(t)), t].sum()) < 1e-4
        assert greedy == bool((mixed.argmax(-1) == t).all())


def test_with_thoughts_a_requests_numbers_depend_on_neither_its_batch_nor_the_order(mixing_checkpoint):
    """Batch sizes 1, 3 and 8 (and auto), the requests shuffled: every request's numbers are its own."""
    m = qstar.load(str(mixing_checkpoint), backend="torch")
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(REQUESTS)]
    alone = QStarLM(m, thoughts=True, batch_size=1).loglikelihood(requests)
    for batch_size, seed in ((3, 1), (8, 2), ("auto", 3)):
        order = np.random.default_rng(seed).permutation(len(requests))
        got = QStarLM(m, thoughts=True, batch_size=batch_size).loglikelihood([requests[i] for i in order])
        for i, (score, greedy) in zip(order, got, strict=True):
            assert abs(score - alone[i][0]) < 1e-5 and greedy == alone[i][1]


REPEATS_YAML = """task: local_repeats
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
repeats: 3
doc_to_text: "{{{{problem}}}}="
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: true
  temperature: 1.0
  max_gen_toks: 6
filter_list:
  - name: "all"
    filter:
      - function: "take_first"
metric_list:
  - metric: exact_match
"""


@pytest.mark.parametrize("thoughts", [True, False])
def test_the_repeats_of_a_document_draw_different_samples(mixing_checkpoint, tmp_path, thoughts):
    """A task with repeats: 3 at temperature 1 (self-consistency, pass@k): the harness hands the model the same
    request three times, and each copy is seeded by its repeat index, so the three samples differ."""
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"problem": d[:-3], "answer": d[-2]}) + "\n" for d in TOY))
    (tmp_path / "repeats.yaml").write_text(REPEATS_YAML.format(data=tmp_path / "docs.jsonl"))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    lm = QStarLM(qstar.load(str(mixing_checkpoint), backend="torch"), thoughts=thoughts, batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["local_repeats"], task_manager=manager, log_samples=True)
    samples = [s["resps"][0] for s in out["samples"]["local_repeats"]]
    assert [len(s) for s in samples] == [3] * len(TOY)
    assert sum(len(set(s)) == 3 for s in samples) >= len(TOY) - 1, samples


def test_generation_left_truncates_the_context_to_leave_room_for_max_gen_toks():
    """max_length - max_gen_toks tokens of the context, its end, are what the model continues (HFLM's truncation);
    max_gen_toks that leave no room and a max_length beyond the model's context are one clear error each."""
    lm = QStarLM(DEFAULT_MODEL, thoughts=False, max_length=32)
    context = " ".join(TOY) * 5
    settings = {"until": ["\n"], "max_gen_toks": 10, "do_sample": False}
    (text,) = lm.generate_until([Instance("generate_until", {}, (context, settings), 0)])
    (expected,) = lm.model.generate([lm.tok_encode(context)[-22:]], max_tokens=10, thoughts=False, stop=["\n"])
    assert text == expected.text
    with pytest.raises(ValueError, match="max_gen_toks=32 leaves no room for a prompt in max_length=32"):
        lm.generate_until([Instance("generate_until", {}, (context, {**settings, "max_gen_toks": 32}), 0)])
    with pytest.raises(ValueError, match="max_length=513 is more than the model's context of 512"):
        QStarLM(DEFAULT_MODEL, max_length=513)
    assert QStarLM(DEFAULT_MODEL).max_length == 512  # HFLM's default: max_position_embeddings


def test_batch_sizes_the_harness_passes(mixing_checkpoint):
    """An integer, auto and auto:N (a batch of as many requests as AUTO_TOKENS tokens of work hold at its longest,
    at most max_batch_size); anything else is one clear error."""
    from qstar.core.eval.harness import AUTO_TOKENS

    lm = QStarLM(str(mixing_checkpoint), batch_size="auto:4", max_batch_size=5)
    assert lm.batch_size is None
    sizes = [len(b) for b in lm.batches(list(range(30)), [AUTO_TOKENS // 2] * 10 + [1] * 20, "test", True)]
    assert sizes == [2] * 5 + [5] * 4
    assert QStarLM(str(mixing_checkpoint), batch_size="3").batch_size == 3
    for bad in ("big", "0", "auto:x"):
        with pytest.raises(ValueError, match="give a positive integer, auto or auto:N"):
            QStarLM(str(mixing_checkpoint), batch_size=bad)


def test_bos_and_the_prefix_token_as_hflm_reads_them():
    """The shipped tokenizer adds BOS (HFLM keeps it), not before a text that starts with BOS's own text;
    add_bos_token=false drops it; prefix_token_id conditions an empty context."""
    lm = QStarLM(DEFAULT_MODEL, thoughts=False)
    plain = lm.tokenizer("2:dje", add_special_tokens=False)["input_ids"]
    assert lm.tok_encode("2:dje") == [1, *plain] and lm.tok_encode("<s>2:dje") == [1, *plain]
    assert QStarLM(DEFAULT_MODEL, add_bos_token="false").tok_encode("2:dje") == plain
    custom = QStarLM(DEFAULT_MODEL, thoughts=False, prefix_token_id=plain[0])
    ((score, _),) = custom.loglikelihood([Instance("loglikelihood", {}, ("", "dje"), 0)])
    z = log_softmax(custom.model.logits([[plain[0], *plain[2:]]])[0, :-1])  # "2" then "dje"
    assert abs(score - z[np.arange(3), plain[2:]].sum()) < 1e-5


def test_a_continuation_merged_into_its_context_scores_nothing():
    """A BPE merge can leave a request no continuation token of its own (HFLM asserts): log-probability 0, greedy."""
    lm = QStarLM(DEFAULT_MODEL)
    assert lm._loglikelihood_tokens([(None, [1, 5], []), (None, [1, 5], [])]) == [(0.0, True)] * 2
    assert lm._loglikelihood_tokens([(None, [1, 5], []), (None, [1, 5], [6])])[0] == (0.0, True)
