"""What a new user meets in the first hour: Ctrl-C keeps the work and says how to go on, the help reads at 80
columns, a log written to a file is one record a line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, TRAIN_SMALL, assert_same_runs, backend_params, train_records

import qstar
from qstar.weights import DEFAULT_MODEL

QSTAR = [sys.executable, "-m", "qstar.cli.main"]


def train_command(checkpoint: Path, out: Path, backend: str, *more: str) -> list[str]:
    args = ["train", "--backend", backend, "--model", str(checkpoint), "--out", str(out), *TRAIN_SMALL]
    return [*QSTAR, *args, "--iters", "10", "--save-every", "100", "--steps-per-eval", "5", *more]


@pytest.mark.parametrize(
    ("backend", "signal_number"), backend_params(("torch", signal.SIGINT), ("mlx", signal.SIGTERM))
)
def test_an_interrupted_run_keeps_a_checkpoint_that_resumes_exactly(llama_checkpoint, tmp_path, backend, signal_number):
    """A real signal in the middle of a run (before its first --save-every): the step under way finishes, a
    checkpoint is kept, the message names the command that continues, and that command reproduces the uninterrupted
    run bit for bit."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(train_command(llama_checkpoint, whole, backend), check=True, capture_output=True)
    process = subprocess.Popen(
        train_command(llama_checkpoint, broken, backend), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while not any(r["step"] >= 3 for r in train_records_or_none(broken)):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    kept = sorted(p.name for p in (broken / "checkpoints").iterdir())
    assert len(kept) == 1 and not (broken / "checkpoints" / "step-0000010").exists()
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and f"checkpoints/{kept[0]}" in lines[0], stderr
    command = re.search(r"continue with: (qstar train --resume --out \S+)", lines[0])
    assert command is not None, lines[0]
    done = subprocess.run([*QSTAR, *command[1].split()[1:]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_runs(whole, broken, 10)


def train_records_or_none(out: Path) -> list[dict]:
    return list(train_records(out).values()) if (out / "metrics.jsonl").is_file() else []


def test_help_keeps_every_flag_whole_at_80_columns():
    env = {**os.environ, "COLUMNS": "80"}
    for command in ("train", "generate", "eval", "inspect", "bench", "convert", "fuse"):
        done = subprocess.run([*QSTAR, command, "--help"], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert all(len(line) <= 80 for line in done.stdout.splitlines() if not line.lstrip().startswith("--")), command
        flags = set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", done.stdout))
        assert not any("…" in line for line in done.stdout.splitlines())
        if command == "train":
            assert {"--grad-accumulation-steps", "--thoughts-per-position", "--reshard-after-forward"} <= flags
            assert "<bool>" not in done.stdout and "(400)" not in done.stdout
            assert "[default: 400]" in done.stdout


def test_the_command_list_gives_each_command_a_whole_sentence():
    """`qstar --help` at 80 columns: every command's summary is a sentence of its own, not cut with `...`."""
    done = subprocess.run([*QSTAR, "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    listed = done.stdout.split("Commands:")[1].splitlines()[1:]
    summaries = dict(line.split(maxsplit=1) for line in listed if line.strip())
    assert set(summaries) == {"convert", "train", "generate", "eval", "inspect", "bench", "fuse", "serve"}
    assert all(s.endswith(".") and not s.endswith("...") for s in summaries.values()), summaries


def test_output_to_a_pipe_is_never_wrapped(tmp_path):
    """What generate, inspect and eval print to a file or pipe keeps every sentence and path on its line, though a
    pipe counts as 80 columns."""
    deep = tmp_path / ("a-directory-whose-name-alone-takes-more-than-eighty-columns-" * 2)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "2:dje=", "answer": "#### 7"}) + "\n")
    model = ["--model", DEFAULT_MODEL, "--backend", "torch"]
    commands = {
        "ignores --top-k and --top-p: pass --temperature > 0": ["generate", *model, "--prompt", "2:dje="]
        + ["--max-tokens", "1", "--temperature", "0", "--top-k", "5"],
        f"wrote {deep / 'r.html'}": ["inspect", *model, "--text", str(ROOT / "docs" / "toy-heldout.txt")]
        + ["--limit", "2", "--out", str(deep / "r.html")],
        f"wrote {deep / 'eval' / 'results.json'} and": ["eval", "gsm8k", *model, "--data", str(questions)]
        + ["--limit", "1", "--max-tokens", "4", "--out", str(deep / "eval")],
    }
    printed = {}
    for whole, command in commands.items():
        done = subprocess.run([*QSTAR, *command], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
        assert done.returncode == 0, done.stderr
        assert any(whole in line for line in done.stderr.splitlines()), done.stderr
        printed[command[0]] = done.stderr
    assert "\nhard tokens the text marks (" in printed["inspect"]  # the two views of hard tokens say how they differ
    assert "\nhardest 10% by this model's NLL without thoughts (" in printed["inspect"]


def test_a_log_written_to_a_file_is_one_record_a_line(llama_checkpoint, tmp_path):
    """Piped, nothing wraps at the 80 columns a pipe gets, and no progress bar is drawn between the records."""
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        command = train_command(llama_checkpoint, tmp_path / "run", "torch")
        subprocess.run(command, stderr=handle, stdout=handle, check=True, env={**os.environ, "COLUMNS": "80"})
    lines = log.read_text().splitlines()
    records = [line for line in lines if re.match(r"^\s*(train|val) step \d+: ", line)]
    assert len(records) == 10 + 3 and all("peak_memory_gb=" in r for r in records if "train step" in r)
    fragments = [line for line in lines if re.search(r"\b(loss|nll_base|grad_norm|tokens_per_s)=", line)]
    assert all(re.match(r"^\s*(train|val) step", line) for line in fragments), lines
    assert not any("━" in line for line in lines)
    model = qstar.load(str(tmp_path / "run" / "model"), backend="torch")
    assert model.finite()


def test_training_a_checkpoint_starts_from_its_own_recipe(llama_checkpoint, tmp_path):
    """A checkpoint converted with --thought-tokens 12 trains with 12 thought tokens unless a flag or --recipe says
    otherwise; the header says where the recipe comes from, and a resumed run keeps it."""
    from typer.testing import CliRunner

    from qstar.cli.main import app

    converted = tmp_path / "converted"
    runner = CliRunner()
    done = runner.invoke(app, ["convert", str(llama_checkpoint), str(converted), "--thought-tokens", "12"])
    assert done.exit_code == 0, done.output
    small = ["--iters", "1", "--warmup-steps", "0", "--max-seq-length", "8", "--batch-size", "1", "--val-batches", "1"]
    runs = {
        "own": ([], "recipe from the checkpoint: 12 thought tokens, lookahead 4,", 12),
        "flag": (["--thought-tokens", "3"], "(changed by flags: thought_tokens=3)", 3),
        "preset": (["--recipe", "paper"], "recipe paper (--recipe): 9 thought tokens", 9),
    }
    for name, (flags, header, thought_tokens) in runs.items():
        args = ["train", "--backend", "torch", "--model", str(converted), "--out", str(tmp_path / name), *small]
        done = runner.invoke(app, [*args, *flags])
        assert done.exit_code == 0 and header in done.output, done.output
        assert qstar.load(str(tmp_path / name / "model"), backend="torch").recipe.thought_tokens == thought_tokens
    assert "replacing the checkpoint's thought_tokens=12" in done.output
    config = json.loads((tmp_path / "own" / "config.json").read_text())
    assert config["recipe"] == "checkpoint" and config["model_recipe"]["thought_tokens"] == 12
    done = runner.invoke(app, ["train", "--resume", "--out", str(tmp_path / "own"), "--iters", "2"])
    assert done.exit_code == 0 and "recipe from the checkpoint: 12 thought tokens" in done.output, done.output
    assert qstar.load(str(tmp_path / "own" / "model"), backend="torch").recipe.thought_tokens == 12


def test_a_local_path_that_does_not_exist_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """`runs/does-not-exist` beside a `runs/` directory is a mistyped path, not the hub repository of that name."""
    from typer.testing import CliRunner

    from qstar.cli.main import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    result = CliRunner().invoke(app, ["generate", "--model", "runs/does-not-exist", "--prompt", "x"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "runs/does-not-exist does not exist" in errors[0] and "download" not in errors[0]
