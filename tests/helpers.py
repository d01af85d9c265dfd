"""Shared test utilities: tiny checkpoints written by transformers itself, and ../shared access."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from qstar.core.thinker import NO_THOUGHTS

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


def require(*modules: str) -> Any:
    """Skip the calling test (or conftest's directory) where these packages are not installed; under CI=true, where
    everything is installed, a missing one is a failure. Returns the last module."""
    module = None
    for name in modules:
        module = importlib.import_module(name) if os.environ.get("CI") == "true" else pytest.importorskip(name)
    return module


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

    kwargs = {"vocab_size": VOCAB, **TINY[model_type], **overrides}
    config = AutoConfig.for_model(model_type, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, **kwargs)
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


OPENELM = dict(
    model_type="openelm",
    vocab_size=VOCAB,
    model_dim=32,
    head_dim=8,
    num_transformer_layers=3,
    num_gqa_groups=2,
    num_query_heads=[4, 6, 4],
    num_kv_heads=[2, 3, 1],  # uneven across layers, GQA ratios 2, 2 and 4
    ffn_multipliers=[1.0, 2.0, 1.5],
    ffn_dim_divisor=16,  # widths 32, 64, 48
    ffn_with_glu=True,
    normalize_qk_projections=True,
    share_input_output_layers=True,
    rope_freq_constant=10000,
    max_context_length=1024,
    bos_token_id=1,
    eos_token_id=2,
)
"""A tiny OpenELM in the hub's config format (layer-wise scaling over 3 layers)."""


def make_openelm_checkpoint(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """A random tiny OpenELM as the hub holds one: config.json and model.safetensors under OpenELM's own names (fused
    qkv_proj rows q | k | v, proj_1 rows gate | up), no tokenizer (OpenELM ships none)."""
    from safetensors.numpy import save_file

    config, rng = {**OPENELM, **overrides}, np.random.default_rng(seed)
    d, hd = config["model_dim"], config["head_dim"]

    def normal(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    tensors = {"transformer.token_embeddings.weight": normal(config["vocab_size"], d, scale=1.0)}
    for i, (q, kv) in enumerate(zip(config["num_query_heads"], config["num_kv_heads"], strict=True)):
        width = int(config["ffn_multipliers"][i] * d) // config["ffn_dim_divisor"] * config["ffn_dim_divisor"]
        layer = f"transformer.layers.{i}."
        tensors |= {
            layer + "attn.qkv_proj.weight": normal((q + 2 * kv) * hd, d),
            layer + "attn.out_proj.weight": normal(d, q * hd),
            layer + "attn.q_norm.weight": 1 + normal(hd, scale=0.1),
            layer + "attn.k_norm.weight": 1 + normal(hd, scale=0.1),
            layer + "ffn.proj_1.weight": normal(2 * width, d),
            layer + "ffn.proj_2.weight": normal(d, width),
            layer + "attn_norm.weight": 1 + normal(d, scale=0.1),
            layer + "ffn_norm.weight": 1 + normal(d, scale=0.1),
        }
    tensors["transformer.norm.weight"] = 1 + normal(d, scale=0.1)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


FAMILIES = (*sorted(TINY), "openelm")
"""Every supported family; transformers builds the first ones, OpenELM (not in transformers) is written by hand."""


def make_checkpoint(path: Path, family: str) -> Path:
    """A tiny random checkpoint of a family (tokenizer files beside it, the char tokenizer)."""
    if family != "openelm":
        return make_hf_checkpoint(path, family)
    char_tokenizer().save_pretrained(make_openelm_checkpoint(path))
    return path


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length))


def rel(got: Any, want: Any) -> float:
    """Relative Frobenius-norm difference, in float64 (NaN where `want` is all zeros: no test passes on it)."""
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


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


def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(*args: str) -> list[str]:
    """A 2-process torchrun command on loopback, on a free port."""
    import sys

    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    return [*launch, "--master-addr", "127.0.0.1", *args]


def torchrun_nodes(*args: str, nodes: int = 2, per_node: int = 2) -> list[list[str]]:
    """The torchrun commands of one run over `nodes` nodes of `per_node` processes each, as a cluster launches it
    (`--nnodes`, `--node-rank`, a c10d rendezvous), all on loopback and a free port: start them all at once."""
    import sys

    port = free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(per_node)]
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"qstar-{port}"]
    return [[*launch, "--node-rank", str(node), *rendezvous, *args] for node in range(nodes)]


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun_train(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    """`qstar train` of 12 small steps under a 2-process torchrun, a checkpoint after each."""
    args = ["-m", "qstar.cli.main", "train", "--backend", "torch", "--model", str(checkpoint), "--out", str(out)]
    return torchrun(*args, "--iters", "12", "--save-every", "1", "--steps-per-eval", "4", *TRAIN_SMALL, *extra)


def train_records(out: Path, split: str = "train") -> dict[int, dict]:
    """The last metrics record per step (a resumed run repeats the steps after its checkpoint)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["split"] == split}


def mixing_head_only_training(backend: str, checkpoint: Path, tmp_path: Path) -> None:
    """--train-only mixing_head: the mixing head changes and nothing else does; validation on the synthetic corpus
    reports the NLL of its hard tokens (the answers) without and with thoughts."""
    import qstar
    from qstar.cli.main import app

    out = tmp_path / "only"
    args = ["train", "--backend", backend, "--model", str(checkpoint), "--out", str(out), "--iters", "3"]
    args += ["--learning-rate", "1e-2", "--steps-per-eval", "3", "--train-only", "mixing_head", *TRAIN_SMALL]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "training only mixing_head" in result.output and "nll_talk_hard=" in result.output
    before = qstar.load(str(checkpoint), backend="torch", thought_tokens=2, lookahead=2).parameters()
    after = qstar.load(str(out / "model"), backend="torch").parameters()
    changed = {k for k in before if not bool((before[k] == after[k]).all())}
    assert changed and all(k.startswith("mixing_head.") for k in changed), changed
    val = train_records(out, "val")[3]
    assert np.isfinite(val["nll_base_hard"]) and np.isfinite(val["nll_talk_hard"]) and "hard_tokens" not in val
    bad = CliRunner().invoke(app, [*args[:5], "--out", str(tmp_path / "none"), "--train-only", "nothing_such"])
    assert bad.exit_code == 1 and "matches no parameter" in " ".join(bad.output.split()), bad.output


def no_thought_training(backend: str, checkpoint: Path, tmp_path: Path) -> None:
    """--no-thoughts, a run's no-thought twin: its loss is the plain next-token NLL of the batch, the language model
    trains, the mixing head and the thought vectors (outside the graph) do not, and its reports read the prediction
    with a thought as the one without."""
    import qstar
    from qstar.cli.main import app

    out = tmp_path / "twin"
    args = ["train", "--backend", backend, "--model", str(checkpoint), "--out", str(out), "--iters", "3"]
    result = CliRunner().invoke(app, [*args, "--no-thoughts", "--steps-per-eval", "3", *TRAIN_SMALL])
    assert result.exit_code == 0, result.output
    assert "no thoughts (the language model alone)" in result.output
    before = qstar.load(str(checkpoint), backend="torch", thought_tokens=2, lookahead=2).parameters()
    after = qstar.load(str(out / "model"), backend="torch").parameters()
    changed = {k for k in before if not bool((before[k] == after[k]).all())}
    assert "lm_head.weight" in changed and not any(k.startswith(("mixing_head.", "thought.")) for k in changed)
    for record in train_records(out).values():
        assert record["policy"] == 0 and record["mixing_weight"] == 0 and record["nll_base"] == record["nll_talk"]
    val = train_records(out, "val")[3]
    assert val["nll_base_next"] == val["nll_talk_next"]
    m = qstar.load(str(checkpoint), backend=backend, thought_tokens=2, lookahead=2)
    ids = random_ids(2, 12, seed=4)
    logits = np.asarray(m.logits(ids), np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1).mean()
    terms = m.thinker().loss(m.ops.asarray(ids), None, m.layout(12), step_mode=NO_THOUGHTS)
    assert abs(float(m.ops.to_numpy(terms.total)) - nll) < 1e-5


def short_training(backend: str, checkpoint: Path, tmp_path: Path) -> Path:
    """30 CLI training steps at a high learning rate: the LM loss falls, validations and checkpoints land where
    asked, the resolved config is saved. Returns the run directory."""
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
    val = train_records(out, "val")
    assert set(val) == {0, 15, 30}  # step 0: the untrained model's numbers
    assert val[0]["nll_base_next"] == val[0]["nll_talk_next"]  # a fresh mixing head mixes in nothing
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000015", "step-0000030"]
    config = json.loads((out / "config.json").read_text())
    assert config["iters"] == 30 and config["backend"] == backend
    return out


def killed_at_random_and_uninterrupted(
    backend: str, checkpoint: Path, tmp_path: Path, kills: int = 4, seed: int = 0, extra: list[str] | None = None
) -> tuple[Path, Path]:
    """Fault injection: a 10-step run with a checkpoint after every step, once uninterrupted and once SIGKILLed at
    up to `kills` random moments (after a random number of steps, at a random time inside the next one: its forward,
    backward, log line or save), each time started again with `--resume` (or `--overwrite` while it had no checkpoint
    yet). After every kill each complete
    checkpoint must load; at the end no orphaned temporary directory is left, metrics.jsonl holds every step exactly
    once, and every loss equals the uninterrupted run's bit for bit. `extra`: more train flags (an adapter run).
    Returns the two run directories."""
    import random
    import signal
    import subprocess
    import sys
    import time

    import qstar
    from qstar.cli.main import app
    from qstar.core.rundir import checkpoints

    common = ["train", "--backend", backend, "--model", str(checkpoint), "--iters", "10", "--save-every", "1"]
    common += ["--steps-per-eval", "5", "--keep-checkpoints", "3", *TRAIN_SMALL, *(extra or [])]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert CliRunner().invoke(app, [*common, "--out", str(whole)]).exit_code == 0
    code = "import sys; from qstar.cli.main import app; sys.argv = ['qstar', *sys.argv[1:]]; app()"
    rng, killed, orphans = random.Random(seed), 0, []
    while killed < kills:
        done = int(checkpoints(broken)[-1].name.split("-")[1]) if checkpoints(broken) else 0
        if done >= 9:
            break
        target = broken / "checkpoints" / f"step-{rng.randint(done + 1, min(done + 3, 9)):07d}"
        again = ["--resume"] if done else ["--overwrite"]
        process = subprocess.Popen(
            [sys.executable, "-c", code, *common, "--out", str(broken), *again], stdout=subprocess.DEVNULL
        )
        deadline = time.time() + 300
        while not target.exists() and process.poll() is None:  # a random number of steps
            assert time.time() < deadline
            time.sleep(0.002)
        if killed % 2:  # then in the middle of the next save
            while not any(p.name.startswith(".step-") for p in target.parent.iterdir()) and process.poll() is None:
                time.sleep(0.0005)
        else:  # or at a random moment of the next step: its forward, backward, log line or save
            time.sleep(rng.uniform(0, 0.1))
        if process.poll() is not None:  # it finished first (waiting for a save after the last one)
            assert process.returncode == 0
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        orphans += [p for p in target.parent.iterdir() if p.name.startswith(".step-")]
        killed += 1
        for path in checkpoints(broken):  # whatever the moment, every complete checkpoint is whole
            assert qstar.load(path, backend=backend).finite(), path
    assert killed >= 3 and orphans  # some kills landed mid-save and left a temporary checkpoint directory
    again = ["--resume"] if checkpoints(broken) else ["--overwrite"]
    result = CliRunner().invoke(app, [*common, "--out", str(broken), *again])
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in orphans)  # each was removed by the next start
    leftovers = [p.name for p in (broken / "checkpoints").iterdir() if not p.name.startswith("step-")]
    assert leftovers == []
    lines = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert len({(r["split"], r["step"]) for r in lines}) == len(lines)  # every step exactly once
    assert_same_runs(whole, broken, 10)
    return whole, broken


def assert_same_runs(whole: Path, broken: Path, steps: int) -> None:
    """Both run directories logged steps 1..steps with the same losses, bit for bit, and the same validations."""
    a, b = train_records(whole), train_records(broken)
    assert set(a) == set(b) == set(range(1, steps + 1))
    for step in a:
        for key in ("loss", "lm", "policy", "grad_norm", "nll_base", "nll_talk"):
            assert a[step][key] == b[step][key], (step, key)
    assert train_records(whole, "val") == train_records(broken, "val")


def uneven_batch(model: Any, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4 rows padded unevenly (the first two padded, the others not) and thoughts for them, saved to `path` (.npz)
    for a data-parallel worker: what 2 ranks split and 1 process computes whole."""
    ids = random_ids(4, 9, seed=3)
    mask = np.ones(ids.shape, bool)
    mask[0, 6:] = mask[1, 4:] = False
    thoughts = model.sample_thoughts(ids, seed=5)
    np.savez(path, ids=ids, mask=mask, thoughts=thoughts)
    return ids, mask, thoughts


def assert_whole_batch_gradients(
    worker_out: Path, model: Any, ids: np.ndarray, mask: np.ndarray, thoughts: np.ndarray
) -> None:
    """The ranks' averaged gradients and mean loss (a worker's .npz) are the one-process ones on the whole batch:
    float64, gradients to 1e-10 of their largest entry, loss to 1e-12."""
    got = dict(np.load(worker_out))
    want = model.gradients(ids, mask, thoughts=thoughts)
    assert abs(float(got.pop("loss")) - model.loss(ids, mask, thoughts=thoughts).total) < 1e-12
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.abs(got[name] - want[name]).max() <= 1e-10 * max(np.abs(want[name]).max(), 1e-30), name


def bos_tokenizer():
    """The character tokenizer, adding BOS before every text as Llama's do (the char tokenizer adds nothing)."""
    from tokenizers import processors

    tokenizer = char_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return tokenizer


HARNESS_LOGLIKELIHOOD = [
    ("Hello there,", " general"),
    ("A", " bcdefg"),
    ("", "xyz"),
    ("1 2 3", " 4 5"),
    ("<s>ab", " c"),
    ("2:dje=", "7."),
    ("the quick brown fox " * 40, "jumps"),
]
"""Requests of every shape the harness sends: an empty context, a context that starts with BOS's text, one longer
than a small max_length; each continuation a token of its own in a BPE vocabulary too (HFLM asserts it)."""


def assert_harness_like_hflm(path: Path, rolling: str, contexts: list[str], **args: Any) -> None:
    """qstar's harness model without thoughts (batches of 3) and the harness's HFLM with its default arguments (on
    the CPU) answer every kind of request on the same checkpoint alike: log-likelihoods to 1e-4 and the same greedy
    flags, rolling log-likelihoods to 1e-4 relative (HFLM sums a window's thousand terms in float32), the same greedy
    text. `args` go to both (max_length)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from qstar.core.eval.harness import QStarLM

    ours = QStarLM(str(path), thoughts=False, batch_size=3, **args)
    hf = HFLM(pretrained=str(path), device="cpu", **args)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(HARNESS_LOGLIKELIHOOD)]
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(requests), hf.loglikelihood(requests), strict=True):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b, (a, b)
    texts = [Instance("loglikelihood_rolling", {}, (rolling,), 0), Instance("loglikelihood_rolling", {}, ("ab",), 1)]
    for a, b in zip(ours.loglikelihood_rolling(texts), hf.loglikelihood_rolling(texts), strict=True):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b)), (a, b)
    settings = {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False}
    prompts = [Instance("generate_until", {}, (c, settings), i) for i, c in enumerate(contexts)]
    assert ours.generate_until(prompts) == hf.generate_until(prompts)
