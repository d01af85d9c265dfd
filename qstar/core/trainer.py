"""The training loop, written once: data, schedule, reports, validation, atomic checkpoints, resume.

A backend supplies a `Session` (its model, optimizer and random state, qstar/core/session.py); everything else lives
here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from qstar.core.backend import Backend, load
from qstar.core.data import BlockStream, TokenCache, is_hub_spec, open_documents
from qstar.core.session import Batch, Session, mean_metrics
from qstar.core.train_config import TrainConfig

STATE_FILE = "trainer_state.json"
CHECKPOINT_DIR = re.compile(r"^step-(\d{7})$")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then linear decay to 0 at `iters` (the schedule of the authors' HF Trainer run)."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    remaining = max(cfg.iters - cfg.warmup_steps, 1)
    return cfg.learning_rate * max(0.0, 1 - (step - cfg.warmup_steps) / remaining)


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (each appeared by one atomic rename), oldest first."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CHECKPOINT_DIR.match(p.name) and (p / STATE_FILE).is_file())


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


class MetricLog:
    """metrics.jsonl in the run directory, plus TensorBoard / Weights & Biases when asked for."""

    def __init__(self, out: Path, cfg: TrainConfig) -> None:
        self.file = open(out / "metrics.jsonl", "a")
        self.tb = self.wandb = None
        if cfg.tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise RuntimeError("--tensorboard needs tensorboardX: pip install 'qstar[tensorboard]'") from None
            self.tb = SummaryWriter(str(out / "tensorboard"))
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


def save_checkpoint(session: Session, out: Path, step: int, data_state: dict[str, Any], cfg: TrainConfig) -> Path:
    """Write checkpoints/step-N atomically (weights + training state), then keep the newest `keep_checkpoints`."""
    target = out / "checkpoints" / f"step-{step:07d}"

    def extra(tmp: Path) -> None:
        session.write_state(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "data": data_state, "config": cfg.to_dict()}))

    session.model.save(target, overwrite=True, extra=extra)
    link = out / "model"
    tmp_link = out / ".model.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(Path("checkpoints") / target.name)
    os.replace(tmp_link, link)
    for old in checkpoints(out)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return target


def make_streams(cfg: TrainConfig, tokenizer: Any, min_len: int) -> tuple[BlockStream, list[Batch]]:
    """The training stream and a fixed list of held-out batches (a disjoint part of --data unless --val-data).
    A streamed hub dataset is tokenized once into OUT/token-cache/, which resumes and later epochs read."""

    def encode(text: str) -> list[int]:
        return tokenizer(text)["input_ids"]

    def stream(spec: str, part: str) -> BlockStream:
        def documents(seed: int) -> Iterator[Any]:
            return open_documents(spec, cfg.text_field, seed=seed, part=part)

        factory: Callable[[int], Iterable[Any]] = documents
        encoder: Callable[[Any], list[int]] = encode  # a cached stream yields ids already: its encoder copies them
        if is_hub_spec(spec):
            key = hashlib.sha1(f"{spec}\n{cfg.text_field}".encode()).hexdigest()[:12]
            cache = TokenCache(Path(cfg.out) / "token-cache" / f"{part}-{key}")
            factory, encoder = (lambda seed: cache.documents(lambda: documents(seed), encode)), list
        return BlockStream(factory, encoder, cfg.max_seq_length, cfg.batch_size, cfg.seed, eos, pad, min_len)

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    train = stream(cfg.data, "all" if cfg.val_data else "train")
    val = stream(*((cfg.val_data, "all") if cfg.val_data else (cfg.data, "validation")))
    return train, [Batch(*next(val)) for _ in range(cfg.val_batches)]


def prepare_out(out: Path, resume: bool) -> Path | None:
    """Check the run directory before any work; returns the checkpoint to resume from, if any."""
    existing = checkpoints(out)
    if existing and not resume:
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file: choose a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create --out {out} ({err.strerror}): choose a writable directory") from None
    if not os.access(out, os.W_OK):
        raise PermissionError(f"--out {out} is not writable: choose a writable directory")
    return existing[-1] if resume and existing else None


def run(cfg: TrainConfig, backend: Backend, resume: bool = False, show_progress: bool = True) -> Path:
    """Train on `backend` (cfg.backend names it); returns the run directory (its `model` link points at the newest
    checkpoint)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    out = Path(cfg.out)
    latest = prepare_out(out, resume)
    model = load(backend, latest or cfg.model, cfg.dtype, cfg.make_recipe())
    if model.tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer files: qstar train needs them to tokenize --data")
    train_stream, val_batches = make_streams(cfg, model.tokenizer, model.recipe.min_seq_len())
    session: Session = backend.Session(model, cfg)
    start = 0
    if latest is not None:
        state = json.loads((latest / STATE_FILE).read_text())
        session.read_state(latest)
        train_stream.restore(state["data"])
        start = state["step"]
    write_json_atomic(out / "config.json", cfg.to_dict())

    console = Console(stderr=True)
    log = MetricLog(out, cfg)
    window: list[dict[str, float]] = []
    columns = [
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    tokens_per_step = cfg.batch_size * cfg.grad_accumulation_steps * cfg.max_seq_length
    try:
        with Progress(*columns, console=console, disable=not show_progress) as progress:
            task = progress.add_task("", total=cfg.iters, completed=start)
            tic = time.perf_counter()
            for step in range(start, cfg.iters):
                batches = [Batch(*next(train_stream)) for _ in range(cfg.grad_accumulation_steps)]
                lr = learning_rate(cfg, step)
                window.append(session.step(batches, lr))
                done = step + 1
                progress.update(task, advance=1, description=f"loss {window[-1]['loss']:.4g}")
                if done % cfg.steps_per_report == 0 or done == cfg.iters:
                    elapsed = time.perf_counter() - tic
                    record = {
                        "split": "train",
                        "step": done,
                        "lr": lr,
                        **mean_metrics(window),
                        "tokens_per_s": tokens_per_step * len(window) / elapsed,
                        "peak_memory_gb": session.peak_memory(),
                    }
                    log.write(record)
                    progress.console.print(format_record(record))
                    window, tic = [], time.perf_counter()
                if done % cfg.steps_per_eval == 0 or done == cfg.iters:
                    record = {"split": "val", "step": done, **session.evaluate(val_batches, cfg.seed + 1)}
                    log.write(record)
                    progress.console.print(format_record(record))
                if done % cfg.save_every == 0 or done == cfg.iters:
                    save_checkpoint(session, out, done, train_stream.state(), cfg)
    finally:
        log.close()
    return out


def format_record(record: dict[str, Any]) -> str:
    keys = [
        "loss",
        "lm",
        "policy",
        "nll_base",
        "nll_talk",
        "mixing_weight",
        "positive_advantage",
        "grad_norm",
        "tokens_per_s",
        "peak_memory_gb",
    ]
    parts = [f"{k}={record[k]:.4g}" for k in keys if k in record]
    return f"{record['split']:>5} step {record['step']}: " + " ".join(parts)
