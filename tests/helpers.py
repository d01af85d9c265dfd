"""Shared test utilities: tiny checkpoints written by transformers itself, and ../shared access."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import string
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURE = SHARED / "fixtures" / "reference" / "tiny-mistral-a"

# Shapes chosen to exercise GQA, an odd number of heads/kv heads, explicit head_dim, tied embeddings and biases.
TINY = {
    "llama": dict(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        hidden_size=36,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
}
VOCAB = 128


def require(*modules: str) -> None:
    """Skip the calling conftest's directory where a backend's packages are not installed; under CI=true, where
    everything is installed, a missing one is a failure."""
    for name in modules:
        if os.environ.get("CI") == "true":
            importlib.import_module(name)
        else:
            pytest.importorskip(name)


def backend_params(*cases: str | tuple) -> list:
    """pytest.param per case (a backend name, or a tuple that starts with one), skipped where that backend is not
    installed (never under CI=true)."""
    ci = os.environ.get("CI") == "true"
    params = []
    for case in cases:
        values = case if isinstance(case, tuple) else (case,)
        missing = not ci and importlib.util.find_spec(values[0]) is None
        params.append(pytest.param(*values, marks=pytest.mark.skipif(missing, reason=f"{values[0]} not installed")))
    return params


def shared_file(relative: str) -> Path:
    """A file under ../shared; skipped where absent, but a failure under CI=true."""
    path = SHARED / relative
    if not path.exists():
        message = f"{path} is missing (the read-only ../shared beside the checkout)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def char_tokenizer():
    """A character-level fast tokenizer (ids < VOCAB) so tiny checkpoints carry real tokenizer files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable[:95])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_hf_checkpoint(
    path: Path, model_type: str, seed: int = 0, tokenizer: bool = True, top_level_rope: bool = True, **overrides
) -> Path:
    """save_pretrained of a random tiny model of `model_type` (float32) into `path`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**TINY[model_type], **overrides}
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, **kwargs
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms and biases so that no term hides behind an identity init
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    if tokenizer:
        char_tokenizer().save_pretrained(path)
    if top_level_rope:  # mlx-lm 0.32 reads only a top-level rope_theta (silently defaults otherwise)
        cfg = json.loads((path / "config.json").read_text())
        cfg["rope_theta"] = kwargs["rope_theta"]
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length))


TRAIN_SMALL = [
    "--thought-tokens",
    "2",
    "--lookahead",
    "2",
    "--max-seq-length",
    "16",
    "--batch-size",
    "2",
    "--policy-weight",
    "1",
    "--steps-per-report",
    "1",
    "--val-batches",
    "1",
    "--warmup-steps",
    "2",
]


def train_records(out: Path, split: str = "train") -> dict[int, dict]:
    """The last metrics record per step (a resumed run repeats the steps after its checkpoint)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["split"] == split}


def short_training(backend: str, checkpoint: Path, tmp_path: Path) -> Path:
    """30 CLI training steps at a high learning rate: the LM loss falls, validations and checkpoints land where
    asked, the resolved config is saved. Returns the run directory."""
    from typer.testing import CliRunner

    from qstar.cli.main import app

    out = tmp_path / "run"
    args = [
        "train",
        "--backend",
        backend,
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--iters",
        "30",
        "--learning-rate",
        "3e-3",
        "--steps-per-eval",
        "15",
        "--save-every",
        "15",
        *TRAIN_SMALL,
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    train = train_records(out)
    first = np.mean([train[s]["lm"] for s in (1, 2, 3)])
    last = np.mean([train[s]["lm"] for s in (28, 29, 30)])
    assert last < first - 0.3
    assert set(train_records(out, "val")) == {15, 30}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000015", "step-0000030"]
    config = json.loads((out / "config.json").read_text())
    assert config["iters"] == 30 and config["backend"] == backend
    return out


def killed_and_uninterrupted(backend: str, checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Train 12 steps once uninterrupted, once SIGKILLed after the step-6 checkpoint appeared (wherever it then is,
    even mid-save) and resumed with `--resume`; returns the two run directories."""
    import signal
    import subprocess
    import sys
    import time

    from typer.testing import CliRunner

    from qstar.cli.main import app

    common = [
        "train",
        "--backend",
        backend,
        "--model",
        str(checkpoint),
        "--iters",
        "12",
        "--save-every",
        "3",
        "--steps-per-eval",
        "6",
        "--keep-checkpoints",
        "5",
        *TRAIN_SMALL,
    ]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert CliRunner().invoke(app, [*common, "--out", str(whole)]).exit_code == 0
    code = "import sys; from qstar.cli.main import app; sys.argv = ['qstar', *sys.argv[1:]]; app()"
    process = subprocess.Popen(
        [sys.executable, "-c", code, *common, "--out", str(broken)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while not (broken / "checkpoints" / "step-0000006").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (broken / "checkpoints" / "step-0000012").exists()
    result = CliRunner().invoke(app, ["train", "--resume", "--out", str(broken)])  # the run's backend is kept
    assert result.exit_code == 0, result.output
    a, b = train_records(whole), train_records(broken)
    assert set(a) == set(b) == set(range(1, 13))
    for step in a:
        for key in ("loss", "lm", "policy", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
    assert train_records(whole, "val") == train_records(broken, "val")
    return whole, broken
