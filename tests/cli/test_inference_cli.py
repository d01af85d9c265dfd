"""`qstar generate`, `qstar eval` and `qstar inspect` end to end on a tiny model, both backends."""

from __future__ import annotations

import json

import pytest
from helpers import backend_params
from transformers import AutoTokenizer
from typer.testing import CliRunner

from qstar.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize("backend", backend_params("torch", "mlx"))
def test_generate_shows_thoughts(llama_checkpoint, backend):
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(llama_checkpoint),
            "--prompt",
            "abc",
            "--max-tokens",
            "3",
            "--show-thoughts",
            "--backend",
            backend,
            "--seed",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("abc")


def test_inspect_writes_one_span_per_token(llama_checkpoint, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a=5;b=a+3;\nc=8.")
    out = tmp_path / "r.html"
    result = runner.invoke(
        app, ["inspect", "--model", str(llama_checkpoint), "--text", str(text), "--out", str(out), "--backend", "torch"]
    )
    assert result.exit_code == 0, result.output
    tokens = AutoTokenizer.from_pretrained(llama_checkpoint)(text.read_text())["input_ids"]
    assert out.read_text().count('class="tok"') == len(tokens) == len(text.read_text())
    assert "nats/token" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "mmlu", "--model", "M"], "unknown task"),
        (["eval", "gsm8k", "--model", "M", "--votes", "0"], "--votes must be >= 1"),
        (["eval", "gsm8k", "--model", "M", "--data", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
        (["generate", "--model", "M", "--prompt", ""], "empty prompt"),
        (["inspect", "--model", "M", "--text", "/nonexistent.txt"], "not found"),
    ],
)
def test_bad_input_is_one_clear_line(llama_checkpoint, args, message):
    args = [str(llama_checkpoint) if a == "M" else a for a in args]
    result = runner.invoke(app, [*args, "--backend", "torch"])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output


def test_eval_csqa_end_to_end(llama_checkpoint, tmp_path):
    data = tmp_path / "csqa.jsonl"
    question = {
        "question": {
            "stem": "Where is a cat?",
            "choices": [
                {"label": label, "text": text}
                for label, text in zip("ABCDE", ["mat", "sky", "sea", "sun", "car"], strict=True)
            ],
        },
        "answerKey": "A",
    }
    data.write_text("\n".join(json.dumps(question) for _ in range(2)))
    result = runner.invoke(
        app,
        [
            "eval",
            "csqa",
            "--model",
            str(llama_checkpoint),
            "--data",
            str(data),
            "--max-tokens",
            "4",
            "--out",
            str(tmp_path / "out"),
            "--backend",
            "torch",
            "--no-thoughts",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["task"] == "csqa" and results["n"] == 2 and results["thoughts"] is False
