"""Thought overhead ratio: one qstar training step vs one ordinary causal-LM step over the same token count.

W = B*P*L*(k+2+A) + B*L tokens is what one Quiet-STaR step must at least process (every position's
<start>, thought, <end> and lookahead, plus the base pass). The baseline is the framework's own LM
(transformers for torch, mlx-lm for mlx) trained on W tokens in sequences of length L, with AdamW too.
Times come from one process that alternates a qstar step and an LM step (a busy machine slows both alike);
memory from a fresh process per side, so each peak is its own. Model FLOPs utilisation counts 6 x (parameters a token
multiplies through) x W FLOPs per step, the yardstick's tokens, attention not included.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from qstar.core.api import check_dtype
from qstar.core.hf_config import ModelConfig, parse_config, read_config
from qstar.core.lora import FINE_TUNE_TYPES
from qstar.core.memory import Step
from qstar.core.ops import peak_rss_gb


@dataclass
class BenchConfig:
    backend: str = "torch"
    model: str | None = None
    """A checkpoint directory; None builds a random model of the shape below."""
    arch: str = "llama"
    """llama, or qwen2 (q/k/v biases)."""
    tie_embeddings: bool = False
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 704
    vocab: int = 4096
    seq_len: int = 64
    thought_tokens: int = 8
    lookahead: int = 4
    thoughts_per_position: int = 2
    batch: int = 1
    dtype: str = "float32"
    device: str | None = None
    steps: int = 5
    warmup: int = 2
    threads: int | None = None
    compile: bool = False
    """torch: compile the thought steps (TrainConfig.compile)."""
    step_mode: str | None = None
    """one-pass or two-pass (TrainConfig.step_mode); None: the device's default."""
    grad_checkpoint: bool = False
    """Recompute layer activations in backward (TrainConfig.grad_checkpoint)."""
    fine_tune_type: str = "full"
    """full, lora or dora (TrainConfig.fine_tune_type; the adapters of TrainConfig's defaults)."""
    attention: str = "split"
    """torch: split or flex (TrainConfig.attention)."""
    peak_tflops: float | None = None
    """The device's peak FLOP/s for the dtype, for model FLOPs utilisation; None: known CUDA GPUs in 16-bit, else
    no MFU."""

    @property
    def tokens(self) -> int:
        """W, the tokens one Quiet-STaR step must at least process."""
        per_thought = self.thought_tokens + 2 + self.lookahead
        return self.batch * self.thoughts_per_position * self.seq_len * per_thought + self.batch * self.seq_len


SHAPES: dict[str, dict[str, Any]] = {
    "issue": {},
    "qwen2-0.5b": dict(
        arch="qwen2", tie_embeddings=True, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936
    ),
}
"""Named model shapes: the performance issue's CPU shape (the BenchConfig defaults) and Qwen2-0.5B's."""

PEAK_TFLOPS_16BIT = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16/fp16 tensor-core peaks (SXM parts)."""


def quiet_transformers() -> None:
    """No "Writing model shards" / "Loading weights" bars between the benchmark's own lines."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def hf_dims(cfg: BenchConfig) -> dict[str, Any]:
    """The benchmark shape as a Hugging Face config's fields."""
    return dict(
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.intermediate,
        vocab_size=cfg.vocab,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    )


def random_checkpoint(cfg: BenchConfig, directory: Path) -> Path:
    """A random model of the benchmark shape written by transformers (no tokenizer: ids after the vocabulary)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[cfg.arch](**hf_dims(cfg))
    torch.manual_seed(0)
    quiet_transformers()
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    raw = json.loads((directory / "config.json").read_text())
    raw["rope_theta"] = 10000.0  # mlx-lm reads only the top-level key
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


def current_rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:
        return peak_rss_gb()


def reset_peak_rss() -> None:
    """Restart this process's peak resident set from the current one (Linux), so that a step's peak is its own and
    not the model load's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def reset_peak(cfg: BenchConfig) -> None:
    """Restart the peak memory count of the benchmark's device (CUDA's allocator, else the resident set)."""
    if cfg.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def step_peak_rss_gb() -> float:
    """The peak resident set since reset_peak_rss (VmHWM on Linux; elsewhere the process's peak)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return peak_rss_gb()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kib * 1024 / 1e9


def make_step(cfg: BenchConfig, mode: str, path: Path) -> Callable[[], Any]:
    """One training step of `mode` ("qstar" or "lm"), set up in this process."""
    from qstar.core.train_config import TrainConfig

    if cfg.backend == "torch":
        import torch

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
    if mode == "lm":
        return lm_step(cfg, path)
    train_cfg = TrainConfig(
        backend=cfg.backend,
        model=str(path),
        dtype=cfg.dtype,
        batch_size=cfg.batch,
        max_seq_length=cfg.seq_len,
        learning_rate=1e-4,
        warmup_steps=0,
        iters=10**6,
        compile=cfg.compile,
        step_mode=cfg.step_mode,
        attention=cfg.attention,
        grad_checkpoint=cfg.grad_checkpoint,
        fine_tune_type=cfg.fine_tune_type,
        recipe_overrides=dict(
            thought_tokens=cfg.thought_tokens,
            lookahead=cfg.lookahead,
            thoughts_per_position=cfg.thoughts_per_position,
            policy_weight=1.0,
        ),
    )
    return qstar_step(cfg, train_cfg, path)


def measure(cfg: BenchConfig, mode: str, path: Path) -> dict[str, Any]:
    """In this process: mode "time" alternates qstar and LM steps and returns their median step times; mode
    "qstar" or "lm" runs warm-up steps and one more of that kind and returns the memory it added."""
    sync = device_sync(cfg)
    if mode == "time":
        steps = {kind: make_step(cfg, kind, path) for kind in ("qstar", "lm")}
        times: dict[str, list[float]] = {kind: [] for kind in steps}
        for i in range(cfg.warmup + cfg.steps):
            for kind, step in steps.items():
                tic = time.perf_counter()
                step()
                sync()
                if i >= cfg.warmup:
                    times[kind].append(time.perf_counter() - tic)
        mode = steps["qstar"].session.model.step_mode  # type: ignore[attr-defined]
        return {f"{kind}_step_s": statistics.median(t) for kind, t in times.items()} | {
            "device": device_name(cfg),
            "step_mode": mode,
        }
    step = make_step(cfg, mode, path)
    base_memory = device_memory(cfg)
    for _ in range(cfg.warmup):  # the optimizer's state exists from the first step on: a later step's peak has it
        step()
        sync()
    reset_peak(cfg)
    step()
    sync()
    peak = device_memory(cfg, peak=True)
    return {"memory_added_gb": max(peak - base_memory, 0.0)}


def device_name(cfg: BenchConfig) -> str:
    if cfg.backend == "torch" and cfg.device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def matmul_params(c: ModelConfig) -> int:
    """Parameters every token multiplies through: all but the input embedding lookup (a tied LM head counts)."""
    attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    return c.num_layers * (attention + 3 * c.hidden_size * c.intermediate_size) + c.hidden_size * c.vocab_size


def peak_tflops(cfg: BenchConfig, device: str) -> float | None:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    if cfg.dtype not in ("bfloat16", "float16"):
        return None
    return next((peak for name, peak in PEAK_TFLOPS_16BIT.items() if name in device), None)


def device_sync(cfg: BenchConfig) -> Callable[[], None]:
    if cfg.backend == "torch":
        import torch

        return torch.cuda.synchronize if cfg.device == "cuda" else (lambda: None)
    return lambda: None


def device_memory(cfg: BenchConfig, peak: bool = False) -> float:
    """GB in use on the benchmark's device, or its peak since reset_peak (CUDA's allocator, else the resident set)."""
    if cfg.device != "cuda":
        return step_peak_rss_gb() if peak else current_rss_gb()
    import torch

    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 1e9


def batch(cfg: BenchConfig, rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, cfg.vocab, size=(rows, cfg.seq_len))


@dataclass
class QstarStep:
    """One optimizer step of a training session on a fixed batch."""

    session: Any
    data: list[Any]

    def __call__(self) -> dict[str, float]:
        result: dict[str, float] = self.session.step(self.data, 1e-4)
        return result


def qstar_step(cfg: BenchConfig, train_cfg: Any, path: Path) -> QstarStep:
    import qstar
    from qstar import backends
    from qstar.core.session import Batch

    model = qstar.load(
        str(path),
        backend=cfg.backend,
        dtype=cfg.dtype,
        recipe=train_cfg.make_recipe(),
        device=cfg.device,
        step_mode=cfg.step_mode,
    )
    adapters = train_cfg.lora_config()
    if adapters is not None:
        model.add_adapters(adapters)
    ids = batch(cfg, cfg.batch)
    return QstarStep(backends.get(cfg.backend).Session(model, train_cfg), [Batch(ids, np.ones(ids.shape, bool))])


def lm_step(cfg: BenchConfig, path: Path) -> Callable[[], None]:
    """One causal-LM training step of the framework's own model (transformers, mlx-lm) over >= W tokens, AdamW too."""
    ids = batch(cfg, math.ceil(cfg.tokens / cfg.seq_len))
    return torch_lm_step(cfg, path, ids) if cfg.backend == "torch" else mlx_lm_step(path, ids)


def torch_lm_step(cfg: BenchConfig, path: Path, ids: np.ndarray) -> Callable[[], None]:
    import torch
    from transformers import AutoModelForCausalLM

    from qstar.torch_backend.train import FUSED_ADAMW_DEVICES

    device = cfg.device or "cpu"
    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype), attn_implementation="sdpa")
    model.to(device)  # type: ignore[arg-type]
    # The same AdamW as the qstar session's, so that the ratio compares the steps, not the optimizers.
    fused = torch.device(device).type in FUSED_ADAMW_DEVICES
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    x = torch.from_numpy(ids).to(device)

    def step() -> None:
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def mlx_lm_step(path: Path, ids: np.ndarray) -> Callable[[], None]:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    optimizer = optim.AdamW(learning_rate=1e-4)
    x = mx.array(ids)

    def loss_fn(model: Any, x: Any) -> Any:
        logits = model(x[:, :-1])
        return nn.losses.cross_entropy(logits, x[:, 1:]).mean()

    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled(x: Any) -> Any:
        loss, grads = grad_fn(model, x)
        optimizer.update(model, grads)
        return loss

    def step() -> None:
        mx.eval(compiled(x), state)

    return step


MMAP_THRESHOLD = 65536
"""Bytes above which glibc's malloc maps each allocation apart, so that the resident set follows the live tensors."""


def run_one(cfg: BenchConfig, mode: str, path: Path) -> dict[str, Any]:
    """Measure in a fresh interpreter (clean peak memory)."""
    code = (
        "import json,sys; from pathlib import Path; from qstar.bench import BenchConfig, measure; "
        "c=BenchConfig(**json.loads(sys.argv[1])); print(json.dumps(measure(c, sys.argv[2], Path(sys.argv[3]))))"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}  # big buffers go back to the system on free
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(asdict(cfg)), mode, str(path)], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of {mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def resolve_device(cfg: BenchConfig) -> BenchConfig:
    """torch's default device made explicit, so that every process syncs and counts memory on the right one."""
    if cfg.backend != "torch" or cfg.device is not None:
        return cfg
    from qstar.torch_backend.api import default_device

    return replace(cfg, device=default_device())


def bench(cfg: BenchConfig) -> dict[str, Any]:
    cfg = resolve_device(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(cfg.model) if cfg.model else random_checkpoint(cfg, Path(tmp))
        times = run_one(cfg, "time", path)
        memory = {mode: run_one(cfg, mode, path)["memory_added_gb"] for mode in ("qstar", "lm")}
        model_flops = 6 * matmul_params(read_config(path)[0]) * cfg.tokens
    peak = peak_tflops(cfg, times["device"])
    return {
        **asdict(cfg),
        "W": cfg.tokens,
        **times,
        "ratio": times["qstar_step_s"] / times["lm_step_s"],
        "qstar_tokens_per_s": cfg.tokens / times["qstar_step_s"],
        "qstar_memory_added_gb": memory["qstar"],
        "lm_memory_added_gb": memory["lm"],
        "model_tflops_per_step": model_flops / 1e12,
        "mfu": None if peak is None else model_flops / times["qstar_step_s"] / (peak * 1e12),
    }


def measure_generation(cfg: BenchConfig, path: Path, batch: int, new_tokens: int = 24) -> dict[str, float]:
    """Emitted tokens/s with and without thoughts (greedy, prompt of 16 tokens), in this process."""
    import qstar

    model = qstar.load(
        str(path), backend=cfg.backend, dtype=cfg.dtype, device=cfg.device, thought_tokens=cfg.thought_tokens
    )
    prompts = np.random.default_rng(0).integers(3, cfg.vocab, size=(batch, 16)).tolist()
    rates = {}
    for thoughts in (False, True):
        model.generate(prompts, max_tokens=2, thoughts=thoughts)  # warm-up
        tic = time.perf_counter()
        model.generate(prompts, max_tokens=new_tokens, thoughts=thoughts)
        rates["thoughts" if thoughts else "plain"] = batch * new_tokens / (time.perf_counter() - tic)
    return rates


def bench_generation(cfg: BenchConfig, batches: tuple[int, ...] = (1, 8)) -> list[dict[str, Any]]:
    """Thoughtful vs plain decoding; the target is thoughts >= 0.7 * plain / (thought_tokens + 3)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(cfg.model) if cfg.model else random_checkpoint(cfg, Path(tmp))
        for batch in batches:
            rates = measure_generation(cfg, path, batch)
            target = 0.7 * rates["plain"] / (cfg.thought_tokens + 3)
            rows.append(
                {
                    "backend": cfg.backend,
                    "batch": batch,
                    "plain_tokens_per_s": rates["plain"],
                    "thought_tokens_per_s": rates["thoughts"],
                    "target_tokens_per_s": target,
                    "meets_target": rates["thoughts"] >= target,
                }
            )
    return rows


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
"""Bytes an element of each of qstar's dtypes (core.api.DTYPES)."""


def shape_config(cfg: BenchConfig) -> ModelConfig:
    """The ModelConfig of the benchmark's random shape (what random_checkpoint writes)."""
    return parse_config({"model_type": cfg.arch, **hf_dims(cfg)})


def memory_step(cfg: BenchConfig, devices: int = 1) -> Step:
    """The estimator's description of the step the benchmark runs."""
    return Step(
        batch=cfg.batch,
        seq_len=cfg.seq_len,
        thought_tokens=cfg.thought_tokens,
        lookahead=cfg.lookahead,
        thoughts_per_position=cfg.thoughts_per_position,
        dtype_bytes=DTYPE_BYTES[check_dtype(cfg.dtype)],
        fine_tune="lora" if cfg.fine_tune_type == "dora" else cfg.fine_tune_type,
        devices=devices,
        grad_checkpoint=cfg.grad_checkpoint,
        step_mode=cfg.step_mode or "two-pass",
        backend=cfg.backend,
    )


def measure_memory(cfg: BenchConfig) -> float:
    """GB one training step adds to its loaded model and session at its peak (gradients, optimizer state,
    activations), a later step's (the optimizer state exists), in a fresh process on a random model of the shape
    unless cfg.model names one."""
    if cfg.fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError("--measure runs full, lora or dora steps; a QLoRA base is an MLX-quantized --model")
    cfg = replace(resolve_device(cfg), warmup=max(cfg.warmup, 1))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(cfg.model) if cfg.model else random_checkpoint(cfg, Path(tmp))
        added: float = run_one(cfg, "qstar", path)["memory_added_gb"]
    return added


def added_by_the_step(terms: dict[str, float]) -> float:
    """GB of the estimated terms a step adds (what measure_memory measures): all but those that exist before it runs,
    the weights and the float32 master copies."""
    return sum(v for k, v in terms.items() if not k.startswith(("weights", "master", "adapters"))) / 1e9
