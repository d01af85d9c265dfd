"""Hostile input to every command, as a careless or unlucky user gives it: each case exits with code 1 and one clear
line naming the file or flag, writes nothing half-way and loses nothing (no corrupt or non-finite checkpoint, no
earlier run overwritten or mixed in)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import TRAIN_SMALL, backend_params, train_records
from typer.testing import CliRunner

import qstar
from qstar.cli.main import app
from qstar.core import files

runner = CliRunner()


def train_args(checkpoint: Path, out: Path, *more: str, backend: str = "torch") -> list[str]:
    return ["train", "--backend", backend, "--model", str(checkpoint), "--out", str(out), *TRAIN_SMALL, *more]


def succeeds(args: list[str]) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def fails(args: list[str], *expected: str) -> str:
    """Runs a command that must fail with exit code 1 and exactly one `error:` line, which contains `expected`."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def converted(src: Path, dst: Path) -> Path:
    qstar.convert(str(src), str(dst), backend="torch")
    return dst


# ---- data loss and silent wrong results ----


@pytest.mark.parametrize("backend", backend_params("torch", "mlx"))
def test_non_finite_steps_are_skipped_then_stop_and_never_reach_a_checkpoint(llama_checkpoint, tmp_path, backend):
    out = tmp_path / "run"
    args = train_args(
        llama_checkpoint, out, "--iters", "6", "--save-every", "1", "--warmup-steps", "0", backend=backend
    )
    error = fails([*args, "--learning-rate", "1e30"], "not finite for 3 steps in a row", "the last good checkpoint")
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved and f"checkpoints/{saved[-1]}" in error
    for name in saved:  # every checkpoint that exists holds finite weights and is the one the link points at
        assert qstar.load(out / "checkpoints" / name, backend=backend).finite()
    assert os.readlink(out / "model") == f"checkpoints/{saved[-1]}"
    skipped = [r["step"] for r in train_records(out).values() if r["skipped"]]
    assert len(skipped) == 3 and all(int(s.split("-")[1]) < skipped[0] for s in saved)


def test_a_collapsed_run_is_reported(tmp_path):
    """Built to be exactly 0 every step, whatever the libraries' rounding: the mixing head starts at weight 0, so the
    thought vectors get no gradient from the LM loss, and --policy-weight 0 takes away the REINFORCE one."""
    output = succeeds(
        ["train", "--backend", "torch", "--out", tmp_path / "run", "--iters", "6", "--train-only", "thought."]
        + ["--policy-weight", "0", "--batch-size", "2", "--max-seq-length", "16", "--val-batches", "1"]
    )
    assert "the gradient norm has been exactly 0 for 5 steps" in output and "collapsed" in output


def test_a_second_run_in_the_same_directory_is_refused_and_a_dead_runs_lock_taken_over(llama_checkpoint, tmp_path):
    out = tmp_path / "run"
    args = train_args(llama_checkpoint, out, "--iters", "400", "--save-every", "1000")
    code = "import sys; from qstar.cli.main import app; sys.argv = ['qstar', *sys.argv[1:]]; app()"
    first = subprocess.Popen([sys.executable, "-c", code, *args[0:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists():
        assert first.poll() is None and time.time() < deadline, first.stderr.read().decode() if first.stderr else ""
        time.sleep(0.05)
    try:
        fails(train_args(llama_checkpoint, out, "--iters", "2", "--overwrite"), "in use by another qstar train")
        fails(["train", "--resume", "--out", out], "in use by another qstar train", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / "metrics.jsonl").exists()  # the first run's files were left alone
    output = succeeds(train_args(llama_checkpoint, out, "--iters", "2", "--overwrite"))
    assert f"the previous qstar train (pid {first.pid}) ended without releasing it" in output


@pytest.fixture
def finished_run(llama_checkpoint, tmp_path) -> Path:
    """A torch run of 4 steps with checkpoints at 2 and 4."""
    out = tmp_path / "run"
    succeeds(train_args(llama_checkpoint, out, "--iters", "4", "--save-every", "2"))
    return out


@pytest.mark.parametrize(
    ("flag", "value", "saved"),
    [
        ("--batch-size", "3", "batch_size=2"),
        ("--learning-rate", "0.5", "learning_rate=0.0001"),
        ("--thought-tokens", "5", "thought_tokens=2"),
        ("--recipe", "paper", "recipe=default"),
        ("--data", "other.txt", "data=synthetic"),
    ],
)
def test_resume_refuses_a_setting_that_contradicts_the_run(finished_run, flag, value, saved):
    before = (finished_run / "metrics.jsonl").read_text()
    fails(["train", "--resume", "--out", finished_run, "--iters", "6", flag, value], f"{flag} {value}", saved)
    assert (finished_run / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(("flag", "value"), [("--backend", "mlx"), ("--dtype", "bfloat16")])
def test_resume_on_another_backend_or_dtype_is_refused_with_what_to_do(finished_run, flag, value):
    fails(["train", "--resume", "--out", finished_run, flag, value], "does not move", f"--model {finished_run}/model")


def test_resume_takes_the_checkpoints_settings_without_config_json(finished_run):
    (finished_run / "config.json").unlink()
    succeeds(["train", "--resume", "--out", finished_run, "--iters", "6", "--steps-per-report", "2"])
    config = json.loads((finished_run / "config.json").read_text())
    assert config["recipe_overrides"]["thought_tokens"] == 2 and config["iters"] == 6
    assert qstar.load(finished_run / "model", backend="torch").recipe.thought_tokens == 2
    assert sorted(train_records(finished_run)) == [1, 2, 3, 4, 6]


def test_resuming_a_finished_run_trains_nothing_and_repeats_its_summary(finished_run):
    """A run killed after its last checkpoint was written, then resumed: the case a random kill reaches by chance."""
    before = (finished_run / "metrics.jsonl").read_text()
    summary = next(line for line in before.splitlines()[::-1] if '"val"' in line)
    output = succeeds(["train", "--resume", "--out", finished_run])
    assert "nothing to train: the run had already finished its 4 steps" in output
    assert f"{json.loads(summary)['nll_talk_next']:.4f} with thoughts" in output
    assert (finished_run / "metrics.jsonl").read_text() == before


def test_a_fresh_run_into_a_used_directory_is_refused_unless_overwrite(llama_checkpoint, finished_run):
    before = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    fails(train_args(llama_checkpoint, finished_run, "--iters", "2"), "already holds a run", "--overwrite")
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == before
    output = succeeds(train_args(llama_checkpoint, finished_run, "--iters", "2", "--overwrite"))
    assert "--overwrite: removed the earlier run's" in output
    assert sorted(train_records(finished_run)) == [1, 2]  # no record of the earlier run is left in the log


def test_the_files_of_a_run_killed_before_its_first_checkpoint_are_not_mixed_in(llama_checkpoint, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 1, "loss": 9.0}) + "\n")
    # both commands name the one action that works: --overwrite
    new = fails(train_args(llama_checkpoint, out, "--iters", "2"), "earlier run's files (metrics.jsonl)", "--overwrite")
    resumed = fails(["train", "--resume", "--out", out], "no complete checkpoint", "start over with --overwrite")
    assert "--resume to continue" not in new and "without --resume" not in resumed
    succeeds(train_args(llama_checkpoint, out, "--iters", "2", "--overwrite"))
    assert train_records(out)[1]["loss"] != 9.0


def test_resume_without_a_run_is_refused_and_creates_nothing(tmp_path):
    fails(["train", "--resume", "--out", tmp_path / "nothing"], "holds no run: start one without --resume")
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--temperature", "nan", "temperature (--temperature) must be a finite number"),
        ("--top-p", "nan", "top_p (--top-p) must be a finite number"),
        ("--temperature", "inf", "temperature (--temperature) must be a finite number"),
    ],
)
def test_generate_refuses_non_finite_sampling_flags(llama_checkpoint, flag, value, message):
    fails(["generate", "--backend", "torch", "--model", llama_checkpoint, "--prompt", "ab", flag, value], message)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("policy_weight", float("inf"), "policy_weight (--policy-weight) must be a finite number, got inf"),
        ("sample_temperature", float("nan"), "must be a finite number, got nan"),
        ("thought_tokens", 2.5, "thought_tokens (--thought-tokens) must be an integer, got 2.5"),
        ("lookahead", True, "lookahead (--lookahead) must be an integer, got True"),
        ("init_token", 3, "init_token (--init-token) must be a string"),
    ],
)
def test_api_refuses_recipe_values_of_the_wrong_type(llama_checkpoint, field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        qstar.load(llama_checkpoint, backend="torch", **{field: value})


def test_orphaned_temporary_directories_are_removed_on_the_next_start(llama_checkpoint, finished_run, tmp_path):
    pid = dead_pid()
    orphans = [
        finished_run / "checkpoints" / f".step-0000006.tmp-{pid}-abcd1234",
        tmp_path / f".dst.tmp-{pid}-x1y2z3w4",
    ]
    alive = tmp_path / f".other.tmp-{os.getpid()}-a1b2c3d4"  # a write in progress: its process is running
    for path in [*orphans, alive]:
        path.mkdir()
        (path / files.MARK).touch()
        (path / "model.safetensors").write_bytes(b"x" * 100)
    not_ours = tmp_path / f".notes.tmp-{pid}-q1w2e3r4"  # same shape of name, but no qstar marker: never touched
    not_ours.mkdir()
    (not_ours / "notes.txt").write_text("someone else's")
    output = succeeds(["train", "--resume", "--out", finished_run, "--iters", "5"])
    assert f"removing {orphans[0]}" in output and not orphans[0].exists()
    result = runner.invoke(app, ["convert", str(llama_checkpoint), str(tmp_path / "dst"), "--backend", "torch"])
    assert result.exit_code == 0 and f"removing {orphans[1]}" in result.output
    assert not orphans[1].exists() and alive.exists() and not_ours.exists()


# ---- one clear line instead of a traceback or a riddle ----


@pytest.mark.parametrize("backend", backend_params("torch", "mlx"))
@pytest.mark.parametrize("name", ["model.safetensors", "qstar.safetensors"])
def test_truncated_weights(llama_checkpoint, tmp_path, backend, name):
    ckpt = converted(llama_checkpoint, tmp_path / "ckpt")
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 2])
    fails(["generate", "--backend", backend, "--model", ckpt, "--prompt", "ab"], f"{ckpt / name}", "damaged")


def test_truncated_safetensors_header(llama_checkpoint, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for item in llama_checkpoint.iterdir():
        (src / item.name).write_bytes(item.read_bytes())
    (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:90])
    fails(["convert", src, tmp_path / "dst", "--backend", "torch"], f"{src / 'model.safetensors'}", "damaged")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        (None, "has no 'num_attention_heads' setting"),
    ],
)
def test_broken_config_json(llama_checkpoint, tmp_path, content, message):
    ckpt = converted(llama_checkpoint, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    del config["num_attention_heads"]
    (ckpt / "config.json").write_text(json.dumps(config) if content is None else content)
    fails(["generate", "--backend", "torch", "--model", ckpt, "--prompt", "ab"], f"{ckpt / 'config.json'}", message)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "is not valid JSON"), ('{"eos_token_id": "</s>"}', "eos_token_id must be a token id or a list")],
)
def test_broken_generation_config_json(llama_checkpoint, tmp_path, content, message):
    ckpt = converted(llama_checkpoint, tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text(content)
    args = ["generate", "--backend", "torch", "--model", ckpt, "--prompt", "ab"]
    fails(args, f"{ckpt / 'generation_config.json'}", message)


def test_config_file_numbers_as_users_write_them(llama_checkpoint, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1e-4\nwarmup_steps: 1\npolicy_temperature: 2e0\n")  # PyYAML: strings
    out = tmp_path / "run"
    succeeds([*train_args(llama_checkpoint, out, "--iters", "1"), "--config", config])
    saved = json.loads((out / "config.json").read_text())
    assert saved["learning_rate"] == 1e-4 and saved["recipe_overrides"]["policy_temperature"] == 2.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('iters: "5"\n', "iters (--iters) must be an integer, got '5'"),
        ("iters: 2.5\n", "iters (--iters) must be an integer, got 2.5"),
        ("thought_tokens: 1.5\n", "thought_tokens (--thought-tokens) must be an integer, got 1.5"),
        ("learning_rate: fast\n", "learning_rate (--learning-rate) must be a finite number, got 'fast'"),
        ("- 1\n- 2\n", "must hold a mapping of settings, not a list"),
        ("iters: [\n", "is not valid YAML"),
    ],
)
def test_config_file_values_of_the_wrong_type(llama_checkpoint, tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    fails(["train", "--backend", "torch", "--out", tmp_path / "run", "--config", config], message)
    assert not (tmp_path / "run").exists()


def test_convert_into_a_read_only_place(llama_checkpoint, tmp_path, monkeypatch):
    """A read-only file system refuses even root, whom permission bits do not stop: simulated at mkdtemp."""

    def read_only(*args: object, **kwargs: object) -> str:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkdtemp", read_only)
    fails(["convert", llama_checkpoint, tmp_path / "ro" / "dst", "--backend", "torch"], "cannot write to", "Read-only")


def test_inspect_into_a_read_only_place(llama_checkpoint, tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("abcabc")

    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    out = tmp_path / "report.html"
    fails(["inspect", "--backend", "torch", "--model", llama_checkpoint, "--text", text, "--out", out], f"{out}")
    assert not out.exists()


def test_disk_full_during_convert(llama_checkpoint, tmp_path, monkeypatch):
    """Simulated where safetensors writes, with the error safetensors raises on a full disk."""
    from qstar.torch_backend import qstar_model

    def full(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(qstar_model, "save_file", full)
    fails(["convert", llama_checkpoint, tmp_path / "dst", "--backend", "torch"], "no space left on device", "dst")
    assert os.listdir(tmp_path) == []  # neither the destination nor a temporary directory


def test_disk_full_during_training(llama_checkpoint, tmp_path, monkeypatch):
    """torch.save on a full disk says only "unexpected pos ..."; the free space tells (simulated both)."""
    import shutil

    import torch

    out = tmp_path / "run"
    succeeds(train_args(llama_checkpoint, out, "--iters", "2", "--save-every", "2"))
    real_usage = shutil.disk_usage

    def full(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1854784 vs 1854672")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1 << 20))
    fails(["train", "--resume", "--out", out, "--iters", "4"], "step 4: no space left on device", "step-0000002")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_data_file(llama_checkpoint, tmp_path, content):
    data = tmp_path / "empty.txt"
    data.write_bytes(content)
    fails(train_args(llama_checkpoint, tmp_path / "run", "--data", data), f"{data} has no usable text")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["data.txt", "data.jsonl"])
def test_binary_data_file(llama_checkpoint, tmp_path, name):
    data = tmp_path / name
    data.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(500))
    fails(train_args(llama_checkpoint, tmp_path / "run", "--data", data), f"{data} is not UTF-8 text")
    assert not (tmp_path / "run").exists()


def test_a_failed_run_removes_only_what_it_created(llama_checkpoint, tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    bad = tmp_path / "bad.txt"
    bad.write_text("")
    fails(train_args(llama_checkpoint, keep, "--data", bad), "has no usable text")
    fails(train_args(llama_checkpoint, tmp_path / "a" / "b" / "run", "--data", bad), "has no usable text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "mine"]
    assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]
