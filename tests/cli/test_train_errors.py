"""Bad input to `qstar train`: one clear line each, exit code 1, nothing half-written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qstar.cli.main import app

runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["train", "--backend", "torch", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize("distributed", ["fsdp", "hsdp"])
def test_fsdp_is_torchs(tmp_path, distributed):
    args = ["train", "--backend", "mlx", "--distributed", distributed, "--out", str(tmp_path / "r")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and f"--distributed {distributed} is PyTorch's FSDP2" in result.output
    assert not (tmp_path / "r").exists()


def test_nonexistent_model(tmp_path):
    code, output = run("--model", str(tmp_path / "nope"), "--out", str(tmp_path / "run"))
    assert code == 1 and "does not exist" in output and "Traceback" not in output


def test_unsupported_architecture(tmp_path, llama_checkpoint):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    config = json.loads((llama_checkpoint / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    code, output = run("--model", str(bad), "--out", str(tmp_path / "run"))
    assert code == 1 and "unsupported model_type 'gpt2'" in output


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_data_without_text(tmp_path, llama_checkpoint, content):
    data = tmp_path / "empty.txt"
    data.write_text(content)
    code, output = run("--model", str(llama_checkpoint), "--data", str(data), "--out", str(tmp_path / "run"))
    assert code == 1 and "empty.txt" in output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sequences_shorter_than_the_recipe_needs(tmp_path, llama_checkpoint):
    code, output = run("--model", str(llama_checkpoint), "--max-seq-length", "4", "--lookahead", "4")
    assert code == 1 and "--max-seq-length 4 is shorter than lookahead=4 needs (6 tokens)" in output


def test_out_that_cannot_be_a_directory(tmp_path, llama_checkpoint):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, output = run("--model", str(llama_checkpoint), "--out", str(blocker / "run"))
    assert code == 1 and "--out" in output and "Traceback" not in output
    code, output = run("--model", str(llama_checkpoint), "--out", str(blocker))
    assert code == 1 and "is a file" in output


def test_bad_values_and_unknown_settings(tmp_path):
    code, output = run("--iters", "0")
    assert code == 1 and "--iters must be >= 1" in output
    config = tmp_path / "c.toml"
    config.write_text("itres = 3\n")
    code, output = run("--config", str(config))
    assert code == 1 and "unknown setting 'itres'" in output
