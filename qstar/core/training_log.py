"""What a training run shows and writes down: its header, a progress bar on a terminal, one line per report and
validation (one record a line, never wrapped, when the output is a file or a pipe), `metrics.jsonl` and
TensorBoard / Weights & Biases, and the summary at its end. The loop itself is qstar/core/trainer.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from qstar.core import lora
from qstar.core.console import console
from qstar.core.distributed import World
from qstar.core.extras import require_extra
from qstar.core.model import QStarModel
from qstar.core.recipe import Recipe, make_recipe
from qstar.core.train_config import CHECKPOINT, TrainConfig

REPORTED = (
    "loss",
    "lm",
    "policy",
    "nll_base",
    "nll_talk",
    "nll_base_hard",
    "nll_talk_hard",
    "mixing_weight",
    "positive_advantage",
    "policy_entropy",
    "thought_distinct",
    "thought_entropy",
    "grad_norm",
    "skipped",
    "tokens_per_s",
    "peak_memory_gb",
)
"""The metrics a report line shows, in order (metrics.jsonl holds every one)."""


class MetricLog:
    """metrics.jsonl in the run directory, plus TensorBoard / Weights & Biases when asked for."""

    def __init__(self, out: Path, cfg: TrainConfig) -> None:
        self.file = open(out / "metrics.jsonl", "a")
        self.tb = self.wandb = None
        if cfg.tensorboard:
            writer = require_extra("tensorboardX", "tensorboard", "--tensorboard").SummaryWriter
            self.tb = writer(str(out / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("--wandb needs Weights & Biases: pip install wandb") from None
            self.wandb = wandb.init(project="qstar", config=cfg.to_dict(), dir=str(out))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        for key, value in record.items():
            if isinstance(value, float | int) and key != "step":
                if self.tb is not None:
                    self.tb.add_scalar(f"{record['split']}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(
                {f"{record['split']}/{k}": v for k, v in record.items() if k not in ("step", "split")}, step=step
            )

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_record(record: dict[str, Any]) -> str:
    parts = [f"{k}={record[k]:.4g}" for k in REPORTED if k in record and (k != "skipped" or record[k])]
    return f"{record['split']:>5} step {record['step']}: " + " ".join(parts)


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class TrainingLog:
    """The run's console and metric files; rank 0 alone writes (every rank may call)."""

    def __init__(self, cfg: TrainConfig, world: World, show_progress: bool = True) -> None:
        self.cfg, self.world, self.show_progress = cfg, world, show_progress
        self.console = console()
        self.metrics: MetricLog | None = None
        self.progress: Any = None
        self.task: Any = None
        self.started = time.perf_counter()

    def say(self, line: str) -> None:
        """One line, never wrapped (above the progress bar while it shows)."""
        if self.world.main:
            (self.console if self.progress is None else self.progress.console).print(line)

    def open(self, out: Path, start: int) -> TrainingLog:
        """From the first step on: metrics.jsonl, and the progress bar where the output is a terminal."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.started = time.perf_counter()
        if not self.world.main:
            return self
        self.metrics = MetricLog(out, self.cfg)
        if self.show_progress and self.console.is_terminal:
            columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}")]
            columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
            self.progress = Progress(*columns, console=self.console)
            self.progress.start()
            self.task = self.progress.add_task("", total=self.cfg.iters, completed=start)
        return self

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def stepped(self, metrics: dict[str, float]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=f"loss {metrics['loss']:.4g}")

    def record(self, record: dict[str, Any]) -> None:
        """A report or validation: into metrics.jsonl and onto the console."""
        if self.metrics is not None:
            self.metrics.write(record)
        self.say(format_record(record))

    def elapsed(self) -> str:
        return duration(time.perf_counter() - self.started)


def run_header(cfg: TrainConfig, model: QStarModel, resumed: Path | None, parallel: str, world: World) -> str:
    """What the run is, before it starts: model, where it computes, recipe, data, length, where it writes."""
    lines = [
        f"qstar train: {cfg.model} ({model.config.model_type}) on {cfg.backend}, {model.ops.device_name()}, "
        f"{cfg.dtype}, " + (f"{model.step_mode} steps" if cfg.thoughts else "no thoughts (the language model alone)"),
        f"  {recipe_line(cfg, model.recipe)}",
        *([f"  {adapter_line(model)}"] if model.adapter else []),
        f"  data {cfg.data}: {cfg.iters} steps of {cfg.batch_size} x {cfg.max_seq_length} tokens"
        + (f" x {cfg.grad_accumulation_steps} accumulated" if cfg.grad_accumulation_steps > 1 else "")
        + f", learning rate {cfg.learning_rate:g}"
        + (f" (mixing head and thought vectors {cfg.head_learning_rate:g})" if cfg.head_learning_rate else ""),
        *([f"  training only {cfg.train_only} (every other weight frozen)"] if cfg.train_only else []),
        *(
            [f"  data parallel: {world.size} processes x {cfg.batch_size} sequences each; {parallel}"]
            * (world.size > 1)
        ),
        *(
            [
                "  compiling: the first step traces and compiles the thought steps and the sampling loop (a minute or "
                "more); later steps reuse the graphs, and later runs the compiler's cache (TORCHINDUCTOR_CACHE_DIR)"
            ]
            * cfg.compile
        ),
        f"  writing to {cfg.out}" + (f" (resuming {resumed.name})" if resumed else ""),
    ]
    return "\n".join(lines)


def recipe_line(cfg: TrainConfig, r: Recipe) -> str:
    """The run's recipe and where it comes from: the checkpoint's own, or a preset (chosen by --recipe, or by auto for
    a checkpoint that records none); each field that differs from the checkpoint's names what changed it."""
    shown = (
        f"{r.thought_tokens} thought tokens, lookahead {r.lookahead}, {r.thoughts_per_position} thoughts per position, "
        f"policy weight {r.policy_weight:g}"
    )
    flags = cfg.recipe_overrides
    notes = []
    if cfg.recipe == CHECKPOINT:
        head = "recipe from the checkpoint"
    elif cfg.model_recipe is None:
        head = f"recipe {cfg.recipe} (the checkpoint records none)"
    else:
        head = f"recipe {cfg.recipe} (--recipe)"
        saved, preset = make_recipe(cfg.model_recipe).to_dict(), cfg.base_recipe().to_dict()
        replaced = [f"{k}={v}" for k, v in saved.items() if preset[k] != v and k not in flags]
        notes += [f"replacing the checkpoint's {', '.join(replaced)}"] * bool(replaced)
    notes += [f"changed by flags: {', '.join(f'{k}={v}' for k, v in flags.items())}"] * bool(flags)
    return f"{head}: {shown}" + (f" ({'; '.join(notes)})" if notes else "")


def adapter_line(model: QStarModel) -> str:
    """What an adapter run trains, and how much of the model that is."""
    a = model.adapter
    assert a is not None
    params = model.parameters()
    trained = sum(int(np.prod(v.shape)) for k, v in params.items() if lora.trainable(k))
    total = sum(int(np.prod(v.shape)) for v in params.values())
    layers = "all" if a.num_layers < 0 else f"the last {min(a.num_layers, model.config.num_layers)}"
    return (
        f"{a.fine_tune_type} rank {a.rank} scale {a.scale:g} on {len(a.keys)} Linear layers of {layers} decoder "
        f"layers, with the thought vectors and mixing head: {trained:,} of {total:,} parameters train "
        f"({trained / total:.2%})"
    )
