"""What `qstar bench` measures: a Quiet-STaR training step against ordinary causal-LM steps, its memory, and
thoughtful generation speed, on any backend (each supplies its LM yardstick, synchronisation and memory counters).

Two prices of a step:
- the implementation's efficiency, `ratio`: a qstar step against an LM step over the same W = B*P*L*(k+2+A) + B*L
  tokens, the least one Quiet-STaR step must process (every position's <start>, thought, <end> and lookahead, and
  the base pass);
- the user's price, `price`: against an LM step over the same text, B*L tokens, about W / (B L) = P (k+2+A) /
  think_every + 1 times fewer tokens (29x at k=8, A=4, P=2): what thinking costs a run over training without it.
The yardstick is the framework's own LM (transformers for torch, mlx-lm for mlx) with AdamW too. Times come from one
process that alternates the steps (a busy machine slows them alike); memory from a fresh process per side, so each
peak is its own. Model FLOPs utilisation counts 6 x (parameters a token multiplies through) x W FLOPs per step, the
yardstick's tokens, attention not included.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from qstar.core import backend as backends
from qstar.core.checkpoint import source_names
from qstar.core.data import Batch
from qstar.core.lora import FINE_TUNE_TYPES
from qstar.core.memory import Step, counts
from qstar.core.model_config import ModelConfig, is_linear, parse_config, read_config, shape_config, weight_shapes
from qstar.core.train_config import TrainConfig

BENCH_RECIPE = {"policy_weight": 1.0}
"""The benchmark's recipe: the default preset (k=8, A=4, P=2) with the REINFORCE term at weight 1."""
BENCH_DEFAULTS = {"batch_size": 1}
"""What a benchmarked step changes of TrainConfig's defaults."""


def bench_train(recipe_overrides: dict[str, Any] | None = None, **settings: Any) -> TrainConfig:
    """The training settings of a benchmarked step: TrainConfig's, but for BENCH_DEFAULTS and BENCH_RECIPE."""
    recipe = {**BENCH_RECIPE, **(recipe_overrides or {})}
    return TrainConfig(recipe="default", recipe_overrides=recipe, **{**BENCH_DEFAULTS, **settings})


@dataclass
class BenchConfig:
    """One measurement: the training step (`train`: backend, dtype, batch, length, recipe, step mode, ...) on
    `model`, or on a random model of the named `shape` with single config.json fields changed (`overrides`)."""

    train: TrainConfig = field(default_factory=bench_train)
    model: str | None = None
    shape: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    steps: int = 5
    warmup: int = 2
    peak_tflops: float | None = None
    """The device's peak FLOP/s for the dtype, for model FLOPs utilisation; None: known CUDA GPUs in 16-bit."""
    quantized: bool = False
    """The random model's base quantized to 4 bits as the step's backend quantizes it (a QLoRA step)."""

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):  # read back from JSON (a fresh measuring process)
            self.train = TrainConfig(**self.train)

    @property
    def tokens(self) -> int:
        """W, the tokens one Quiet-STaR step must at least process."""
        r, B, L = self.train.make_recipe(), self.train.batch_size, self.train.max_seq_length
        streams = math.ceil(L / r.think_every)
        return B * r.thoughts_per_position * streams * (r.thought_tokens + 2 + r.lookahead) + B * L

    def config_fields(self) -> dict[str, Any]:
        """config.json of the random model."""
        return shape_config(self.shape, **self.overrides)

    def model_config(self) -> ModelConfig:
        return read_config(self.model)[0] if self.model else parse_config(self.config_fields())


PEAK_TFLOPS_16BIT = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16/fp16 tensor-core peaks (SXM parts)."""


def random_checkpoint(fields: dict[str, Any], directory: Path, seed: int = 0) -> Path:
    """A random model of these config.json fields, as a Hugging Face checkpoint (no tokenizer: the benchmark's ids lie
    past the special ones). Weights are drawn as transformers initialises them (normal, std 0.02; norms 1)."""
    cfg, rng = parse_config(fields), np.random.default_rng(seed)
    tensors = {
        name: np.ones(shape, np.float32) if "norm" in name else (0.02 * rng.standard_normal(shape)).astype(np.float32)
        for name, shape in weight_shapes(cfg).items()
    }
    directory.mkdir(parents=True, exist_ok=True)  # under the family's own names (OpenELM's fused projections)
    save_file(source_names(cfg, tensors, np.concatenate), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({**fields, "dtype": "float32"}, indent=2))
    return directory


def token_batch(vocab: int, rows: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(rows, length))


@dataclass
class QStarStep:
    """One optimizer step of a training session on a fixed batch."""

    session: Any
    data: list[Batch]

    def __call__(self) -> dict[str, float]:
        result: dict[str, float] = self.session.step(self.data, 1e-4)
        return result


def make_step(cfg: BenchConfig, mode: str, path: Path) -> Callable[[], Any]:
    """One training step in this process: "qstar", or an LM step over W tokens ("lm") or over the same text
    ("lm-text")."""
    from qstar.core.loading import load

    backend, train = backends.get(cfg.train.backend), replace(cfg.train, model=str(path))
    backend.set_threads(train.threads, counts(cfg.model_config()).total)
    vocab, B, L = cfg.model_config().vocab_size, train.batch_size, train.max_seq_length
    if mode != "qstar":
        rows = math.ceil(cfg.tokens / L) if mode == "lm" else B
        return backend.lm_step(path, token_batch(vocab, rows, L), train.dtype, cfg.device)
    model = load(path, backend, train.dtype, train.make_recipe(), cfg.device, train.step_mode)
    adapters = train.lora_config()
    if adapters is not None:
        model.add_adapters(adapters)
    ids = token_batch(vocab, B, L)
    return QStarStep(backend.Session(model, train), [Batch(ids, np.ones(ids.shape, bool))])


def measure(cfg: BenchConfig, mode: str, path: Path) -> dict[str, Any]:
    """In this process: mode "time" alternates the qstar and LM steps and returns their median step times; mode
    "qstar" or "lm" runs warm-up steps and one more of that kind and returns the memory it added."""
    ops = backends.get(cfg.train.backend).make_ops(cfg.device)
    if mode == "time":
        steps = {kind: make_step(cfg, kind, path) for kind in ("qstar", "lm", "lm-text")}
        times: dict[str, list[float]] = {kind: [] for kind in steps}
        for _ in range(cfg.warmup + cfg.steps):
            for kind, step in steps.items():
                tic = time.perf_counter()
                step()
                ops.synchronize()
                times[kind].append(time.perf_counter() - tic)
        medians = {f"{kind.replace('-', '_')}_step_s": statistics.median(t[cfg.warmup :]) for kind, t in times.items()}
        session = steps["qstar"].session  # type: ignore[attr-defined]
        first = times["qstar"][0]  # with --compile: tracing and compiling too
        return medians | {
            "qstar_first_step_s": first,
            "device": session.model.ops.device_name(),
            "step_mode": session.model.step_mode,
        }
    step = make_step(cfg, mode, path)
    base_memory = ops.memory_gb()
    for _ in range(cfg.warmup):  # the optimizer's state exists from the first step on: a later step's peak has it
        step()
        ops.synchronize()
    ops.reset_peak_memory()
    step()
    ops.synchronize()
    return {"memory_added_gb": max(ops.peak_memory_gb() - base_memory, 0.0)}


def matmul_params(c: ModelConfig) -> int:
    """Parameters every token multiplies through: the decoder layers' Linear weights and the LM head."""
    return sum(math.prod(s) for n, s in weight_shapes(c).items() if is_linear(n)) + c.hidden_size * c.vocab_size


def peak_tflops(cfg: BenchConfig, device: str) -> float | None:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    if cfg.train.dtype not in ("bfloat16", "float16"):
        return None
    return next((peak for name, peak in PEAK_TFLOPS_16BIT.items() if name in device), None)


MMAP_THRESHOLD = 65536
"""Bytes above which glibc's malloc maps each allocation apart, so that the resident set follows the live tensors.
For the memory measurements only: mapping and faulting in every buffer anew is a cost no training run pays, and it
weighs more on a qstar step's many large temporaries than on the LM step's (docs/PERFORMANCE.md)."""


def run_one(cfg: BenchConfig, mode: str, path: Path) -> dict[str, Any]:
    """Measure in a fresh interpreter (clean peak memory; times under malloc's own settings, as a run has them)."""
    code = (
        "import json,sys; from pathlib import Path; from qstar.core.bench import BenchConfig, measure; "
        "c=BenchConfig(**json.loads(sys.argv[1])); print(json.dumps(measure(c, sys.argv[2], Path(sys.argv[3]))))"
    )
    env = dict(os.environ)
    if mode != "time":  # big buffers go back to the system on free
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(asdict(cfg)), mode, str(path)], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of {mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkpoint_of(cfg: BenchConfig, scratch: str) -> Path:
    if cfg.model:
        return Path(cfg.model)
    path = random_checkpoint(cfg.config_fields(), Path(scratch))
    if cfg.quantized:
        from qstar.core.loading import convert

        convert(path, Path(scratch) / "4-bit", backend=cfg.train.backend, quantize=(4, 64))
        path = Path(scratch) / "4-bit"
    return path


def overhead(cfg: BenchConfig) -> dict[str, Any]:
    """The step's times, the two prices, tokens/s, memory and MFU (module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint_of(cfg, tmp)
        times = run_one(cfg, "time", path)
        memory = {mode: run_one(cfg, mode, path)["memory_added_gb"] for mode in ("qstar", "lm")}
    model_flops = 6 * matmul_params(cfg.model_config()) * cfg.tokens
    peak = peak_tflops(cfg, times["device"])
    return {
        **asdict(cfg),
        "seq_len": cfg.train.max_seq_length,
        "W": cfg.tokens,
        **times,
        "ratio": times["qstar_step_s"] / times["lm_step_s"],
        "price": times["qstar_step_s"] / times["lm_text_step_s"],
        "qstar_first_step_s": times["qstar_first_step_s"],
        "qstar_tokens_per_s": cfg.tokens / times["qstar_step_s"],
        "qstar_memory_added_gb": memory["qstar"],
        "lm_memory_added_gb": memory["lm"],
        "model_tflops_per_step": model_flops / 1e12,
        "mfu": None if peak is None else model_flops / times["qstar_step_s"] / (peak * 1e12),
    }


def measure_generation(cfg: BenchConfig, path: Path, batch: int, new_tokens: int = 24) -> dict[str, float]:
    """Emitted tokens/s with and without thoughts (greedy, prompt of 16 tokens), in this process."""
    from qstar.core.loading import load

    model = load(path, cfg.train.backend, cfg.train.dtype, cfg.train.make_recipe(), device=cfg.device)
    prompts = token_batch(cfg.model_config().vocab_size, batch, 16).tolist()
    rates = {}
    for thoughts in (False, True):
        model.generate(prompts, max_tokens=2, thoughts=thoughts)  # warm-up
        tic = time.perf_counter()
        model.generate(prompts, max_tokens=new_tokens, thoughts=thoughts)
        rates["thoughts" if thoughts else "plain"] = batch * new_tokens / (time.perf_counter() - tic)
    return rates


def generation_speed(cfg: BenchConfig, batches: tuple[int, ...] = (1, 8)) -> list[dict[str, Any]]:
    """Thoughtful vs plain decoding; the target is thoughts >= 0.7 * plain / (thought_tokens + 3)."""
    rows = []
    k = cfg.train.make_recipe().thought_tokens
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint_of(cfg, tmp)
        for batch in batches:
            rates = measure_generation(cfg, path, batch)
            target = 0.7 * rates["plain"] / (k + 3)
            rows.append(
                {
                    "backend": cfg.train.backend,
                    "batch": batch,
                    "plain_tokens_per_s": rates["plain"],
                    "thought_tokens_per_s": rates["thoughts"],
                    "target_tokens_per_s": target,
                    "meets_target": rates["thoughts"] >= target,
                }
            )
    return rows


def memory_step(cfg: BenchConfig, devices: int = 1) -> Step:
    """The estimator's description of the step the benchmark runs."""
    t = cfg.train
    adapters = t.lora_config()
    fine_tune = "full" if adapters is None else "qlora" if cfg.quantized else "lora"
    step = Step(
        batch=t.batch_size,
        seq_len=t.max_seq_length,
        recipe=t.make_recipe(),
        dtype=t.dtype,
        fine_tune=fine_tune,
        devices=devices,
        grad_checkpoint=t.grad_checkpoint,
        step_mode=t.step_mode or "two-pass",
        backend=t.backend,
    )
    return step if adapters is None else replace(step, adapters=adapters)


def measure_memory(cfg: BenchConfig) -> float:
    """GB one training step adds to its loaded model and session at its peak (gradients, optimizer state,
    activations), a later step's (the optimizer state exists), in a fresh process on a random model of the shape
    unless cfg.model names one."""
    if cfg.train.fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError("--measure runs full, lora or dora steps")
    cfg = replace(cfg, warmup=max(cfg.warmup, 1))
    with tempfile.TemporaryDirectory() as tmp:
        added: float = run_one(cfg, "qstar", checkpoint_of(cfg, tmp))["memory_added_gb"]
    return added


def added_by_the_step(terms: dict[str, float]) -> float:
    """GB of the estimated terms a step adds (what measure_memory measures): all but those that exist before it runs,
    the weights and the float32 master copies."""
    return sum(v for k, v in terms.items() if not k.startswith(("weights", "master", "adapters"))) / 1e9
