"""The training loop, written once: data, schedule, reports, validation, atomic checkpoints, resume.

A backend supplies a `Session` (its model, optimizer and random state, qstar/core/session.py); everything else lives
here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qstar.core import lora
from qstar.core.api import QStarModel
from qstar.core.backend import Backend, load
from qstar.core.data import BlockStream, TokenCache, hard_characters, is_hub_spec, open_documents
from qstar.core.distributed import World
from qstar.core.files import DiskFull, write_atomic
from qstar.core.rundir import CONFIG_FILE, STATE_FILE, RunDirectory, checkpoints
from qstar.core.session import Batch, Session, mean_metrics
from qstar.core.train_config import TrainConfig

COLLAPSE_STEPS = 5
"""Steps in a row with a gradient norm of exactly 0 after which the run is reported as collapsed."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite steps, weights); the message names the step and what to do."""


def last_good(out: Path) -> str:
    """What to do after a run went bad: start a new run from its newest checkpoint (written only after good steps)."""
    last = checkpoints(out)
    if not last:
        return "no checkpoint was written yet: start again with a lower --learning-rate (and --overwrite)"
    return (
        f"the last good checkpoint is {last[-1]}: start a new run from it with a lower --learning-rate "
        f"(--model {last[-1]} --out NEW_DIR)"
    )


@dataclass
class Guard:
    """Counts the steps that were skipped (non-finite loss or gradient norm) and those with a zero gradient norm, in a
    row; saved with each checkpoint so that a resumed run judges exactly as an uninterrupted one. No checkpoint is
    written right after a skipped step: the newest checkpoint is always one of good steps."""

    max_bad_steps: int
    bad: int = 0
    zero: int = 0
    skipped: int = 0

    def check(
        self, step: int, metrics: dict[str, float], lr: float, out: Path, say: Callable[[str], None]
    ) -> TrainingError | None:
        """Counts the step; the error to stop with after max_bad_steps skipped steps in a row."""
        if metrics["skipped"]:
            self.bad, self.skipped = self.bad + 1, self.skipped + 1
            say(f"step {step}: loss {metrics['loss']:.4g}, grad norm {metrics['grad_norm']:.4g}: skipped the update")
            if self.bad >= self.max_bad_steps:
                return TrainingError(
                    f"step {step}: the loss or gradient norm was not finite for {self.bad} steps in a row (learning "
                    f"rate {lr:.3g}), so training stopped; {last_good(out)}; or check the data, or continue with "
                    f"--resume --max-bad-steps {2 * self.max_bad_steps}"
                )
            return None
        self.bad = 0
        self.zero = self.zero + 1 if metrics["grad_norm"] == 0 else 0
        if self.zero == COLLAPSE_STEPS:
            say(
                f"warning: step {step}: the gradient norm has been exactly 0 for {COLLAPSE_STEPS} steps (loss "
                f"{metrics['loss']:.4g}): nothing learns (a collapsed model, or weights that get no gradient): lower "
                "--learning-rate, or train other weights (--train-only)"
            )
        return None

    def state(self) -> dict[str, int]:
        return {"bad": self.bad, "zero": self.zero, "skipped": self.skipped}


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then linear decay to 0 at `iters` (the schedule of the authors' HF Trainer run)."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    remaining = max(cfg.iters - cfg.warmup_steps, 1)
    return cfg.learning_rate * max(0.0, 1 - (step - cfg.warmup_steps) / remaining)


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


def save_checkpoint(session: Session, out: Path, step: int, state: dict[str, Any], cfg: TrainConfig) -> Path:
    """Write checkpoints/step-N atomically (weights + training state), then keep the newest `keep_checkpoints`. Weights
    that are not finite are never written: the last good checkpoint stays the newest."""
    if not session.model.finite():
        raise TrainingError(f"step {step}: the weights are not finite, so no checkpoint was written; {last_good(out)}")
    target = out / "checkpoints" / f"step-{step:07d}"

    def extra(tmp: Path) -> None:
        session.write_state(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state, "config": cfg.to_dict()}))

    model = session.model
    try:
        (model.save if model.adapter is None else model.save_adapter)(target, overwrite=True, extra=extra)
    except DiskFull as err:
        last = checkpoints(out)
        resume = f"; --resume continues from the last complete checkpoint, {last[-1].name}" if last else ""
        raise TrainingError(f"step {step}: {err.strerror}{resume}") from None
    link = out / "model"
    tmp_link = out / ".model.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(Path("checkpoints") / target.name)
    os.replace(tmp_link, link)
    for old in checkpoints(out)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return target


def make_streams(
    cfg: TrainConfig, tokenizer: Any, min_len: int, world: World | None = None
) -> tuple[BlockStream, list[Batch]]:
    """The training stream of global batches (world.size * batch_size rows) and a fixed list of this rank's held-out
    batches (a disjoint part of --data unless --val-data).
    A streamed hub dataset is tokenized once into OUT/token-cache/, which resumes and later epochs read. Held-out
    batches of a source that marks hard tokens (data.hard_characters) carry them (Batch.hard)."""

    world = world or World()

    def encode(text: str) -> list[int]:
        return tokenizer(text)["input_ids"]

    def marker(spec: str) -> Callable[[str], list[bool]] | None:
        """A token is hard when a character it covers is (the tokenizer's offsets; special tokens cover none)."""
        hard = hard_characters(spec)
        if hard is None:
            return None

        def mark(text: str) -> list[bool]:
            chars = hard(text)
            return [any(chars[a:b]) for a, b in tokenizer(text, return_offsets_mapping=True)["offset_mapping"]]

        return mark

    def stream(spec: str, part: str, held_out: bool = False) -> BlockStream:
        def documents(seed: int) -> Iterator[Any]:
            return open_documents(spec, cfg.text_field, seed=seed, part=part)

        factory: Callable[[int], Iterable[Any]] = documents
        encoder: Callable[[Any], list[int]] = encode  # a cached stream yields ids already: its encoder copies them
        if is_hub_spec(spec):
            key = hashlib.sha1(f"{spec}\n{cfg.text_field}".encode()).hexdigest()[:12]
            cache = TokenCache(Path(cfg.out) / "token-cache" / f"{part}-{key}")
            factory, encoder = (lambda seed: cache.documents(lambda: documents(seed), encode)), list
        mark = marker(spec) if held_out else None
        rows = cfg.batch_size * world.size
        return BlockStream(factory, encoder, cfg.max_seq_length, rows, cfg.seed, eos, pad, min_len, mark=mark)

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    train = stream(cfg.data, "all" if cfg.val_data else "train")
    val = stream(*((cfg.val_data, "all") if cfg.val_data else (cfg.data, "validation")), held_out=True)
    return train, [world.share(Batch(*next(val))) for _ in range(cfg.val_batches)]


def run(
    cfg: TrainConfig, backend: Backend, resume: bool = False, overwrite: bool = False, show_progress: bool = True
) -> Path:
    """Train on `backend` (cfg.backend names it); returns the run directory (its `model` link points at the newest
    checkpoint)."""
    from rich.console import Console

    console = Console(stderr=True)
    world = backend.join()

    def say(message: str) -> None:
        if world.main:
            console.print(message, highlight=False, soft_wrap=True)

    out = Path(cfg.out)
    with RunDirectory(out, say) if world.main else nullcontext() as run_dir:  # rank 0 owns the directory
        chosen = run_dir.prepare(resume, overwrite) if run_dir is not None else None
        found = world.gather(None if chosen is None else str(chosen))[0]  # every rank resumes from rank 0's choice
        latest = None if found is None else Path(found)
        model = load_for_training(cfg, backend, latest)
        if model.tokenizer is None:
            raise ValueError(f"{cfg.model} has no tokenizer files: qstar train needs them to tokenize --data")
        train_stream, val_batches = make_streams(cfg, model.tokenizer, model.recipe.min_seq_len(), world)
        session: Session = backend.Session(model, cfg, world)
        say(run_header(cfg, model, latest))
        if world.size > 1:
            say(f"  data parallel: {world.size} processes x {cfg.batch_size} sequences each; {session.parallel}")
        start, guard, window = 0, Guard(cfg.max_bad_steps), []
        if latest is not None:
            state = json.loads((latest / STATE_FILE).read_text())
            session.read_state(latest)
            train_stream.restore(state["data"])
            start, window = state["step"], state.get("window", [])
            guard = Guard(cfg.max_bad_steps, **state.get("guard", {}))
        if run_dir is not None:
            write_atomic(out / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2))
            run_dir.started()
        train_loop(cfg, session, train_stream, val_batches, out, start, guard, window, say, show_progress, world)
    return out


def load_for_training(cfg: TrainConfig, backend: Backend, latest: Path | None) -> QStarModel:
    """The model a run trains: its newest checkpoint on resume; else --model, with --adapter-path's adapter or fresh
    adapters in a lora/dora run."""
    adapters = cfg.lora_config()
    adapter_path: str | None
    if latest is not None and adapters is not None:  # an adapter run's checkpoints hold the adapter alone
        source, adapter_path = cfg.model, str(latest)
    else:
        source, adapter_path = str(latest or cfg.model), cfg.adapter_path
    model = load(backend, source, cfg.dtype, cfg.make_recipe(), step_mode=cfg.step_mode, adapter_path=adapter_path)
    if model.adapter is not None and adapters is None:
        raise ValueError(
            f"--model {source} is an adapter: pass --fine-tune-type {model.adapter.fine_tune_type} to train it on, or "
            "merge it first (qstar fuse) to train every weight"
        )
    if model.quantization is not None and adapters is None:
        raise ValueError(
            f"--model {source} is quantized (QLoRA base): pass --fine-tune-type lora or dora, or train a model "
            "converted without --quantize"
        )
    if model.adapter is None and adapters is not None:
        model.add_adapters(adapters)
    if cfg.train_only:
        prefixes = cfg.trained_prefixes()
        if not any(name.startswith(prefixes) for name in model.parameters()):
            tops = sorted({name.split(".")[0] for name in model.parameters()})
            raise ValueError(
                f"--train-only {cfg.train_only} matches no parameter of {cfg.model}: its parameter names start "
                f"with {', '.join(tops)} (e.g. --train-only mixing_head)"
            )
        kept = lora.trainable if model.adapter is not None else (lambda name: True)  # within an adapter run's set
        model._freeze(lambda name: name.startswith(prefixes) and kept(name))
    return model


def run_header(cfg: TrainConfig, model: QStarModel, resumed: Path | None) -> str:
    """What the run is, before it starts: model, where it computes, recipe, data, length, where it writes."""
    r = model.recipe
    return "\n".join(
        [
            f"qstar train: {cfg.model} ({model.config.model_type}) on {cfg.backend}, {model.ops.device_name()}, "
            f"{cfg.dtype}, {model.step_mode} steps",
            f"  recipe {cfg.recipe_name()}: {r.thought_tokens} thought tokens, lookahead {r.lookahead}, "
            f"{r.thoughts_per_position} thoughts per position, policy weight {r.policy_weight:g}"
            + (
                f" (changed: {', '.join(f'{k}={v}' for k, v in cfg.recipe_overrides.items())})"
                if cfg.recipe_overrides
                else ""
            ),
            *([f"  {adapter_line(model)}"] if model.adapter else []),
            f"  data {cfg.data}: {cfg.iters} steps of {cfg.batch_size} x {cfg.max_seq_length} tokens"
            + (f" x {cfg.grad_accumulation_steps} accumulated" if cfg.grad_accumulation_steps > 1 else "")
            + f", learning rate {cfg.learning_rate:g}",
            *([f"  training only {cfg.train_only} (every other weight frozen)"] if cfg.train_only else []),
            f"  writing to {cfg.out}" + (f" (resuming {resumed.name})" if resumed else ""),
        ]
    )


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
        "layers, "
        f"with the thought vectors and mixing head: {trained:,} of {total:,} parameters train ({trained / total:.2%})"
    )


def train_loop(
    cfg: TrainConfig,
    session: Session,
    train_stream: BlockStream,
    val_batches: list[Batch],
    out: Path,
    start: int,
    guard: Guard,
    window: list[dict[str, float]],
    say: Callable[[str], None],
    show_progress: bool,
    world: World,
) -> None:
    """Steps start+1..iters: reports every steps_per_report, validation every steps_per_eval, a checkpoint every
    save_every (and at the end). `window` holds the steps since the last report (restored on resume). Every rank
    steps; rank 0 alone reports, logs and writes the checkpoints."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    log = MetricLog(out, cfg) if world.main else None
    columns = [
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    tokens_per_step = world.size * cfg.batch_size * cfg.grad_accumulation_steps * cfg.max_seq_length
    try:
        with Progress(*columns, console=Console(stderr=True), disable=not (show_progress and world.main)) as progress:

            def show(line: str) -> None:
                if world.main:
                    progress.console.print(line)

            task = progress.add_task("", total=cfg.iters, completed=start)
            tic, timed = time.perf_counter(), 0
            for step in range(start, cfg.iters):
                batches = [world.share(Batch(*next(train_stream))) for _ in range(cfg.grad_accumulation_steps)]
                lr = learning_rate(cfg, step)
                window.append(session.step(batches, lr))
                done, timed = step + 1, timed + 1
                progress.update(task, advance=1, description=f"loss {window[-1]['loss']:.4g}")
                stop = guard.check(done, window[-1], lr, out, show)
                if stop or done % cfg.steps_per_report == 0 or done == cfg.iters:
                    record = {
                        "split": "train",
                        "step": done,
                        "lr": lr,
                        **mean_metrics(window),
                        "tokens_per_s": tokens_per_step * timed / (time.perf_counter() - tic),
                        "peak_memory_gb": session.peak_memory(),
                    }
                    if log is not None:
                        log.write(record)
                    show(format_record(record))
                    window, tic, timed = [], time.perf_counter(), 0
                if stop:
                    raise stop
                if done % cfg.steps_per_eval == 0 or done == cfg.iters:
                    record = {"split": "val", "step": done, **session.evaluate(val_batches, cfg.seed + 1)}
                    if log is not None:
                        log.write(record)
                    show(format_record(record))
                if (done % cfg.save_every == 0 or done == cfg.iters) and guard.bad:
                    show(f"step {done}: no checkpoint after a skipped step")
                elif done % cfg.save_every == 0 or done == cfg.iters:
                    state = {"data": train_stream.state(), "window": window, "guard": guard.state()}
                    with session.gathered():
                        if world.main:
                            save_checkpoint(session, out, done, state, cfg)
                    world.barrier()  # no rank runs ahead of a checkpoint it may have to resume from
    finally:
        if log is not None:
            log.close()
    if guard.skipped:
        say(f"{guard.skipped} of the steps had a non-finite loss or gradient norm; their updates were skipped")


def format_record(record: dict[str, Any]) -> str:
    keys = [
        "loss",
        "lm",
        "policy",
        "nll_base",
        "nll_talk",
        "nll_base_hard",
        "nll_talk_hard",
        "mixing_weight",
        "positive_advantage",
        "grad_norm",
        "skipped",
        "tokens_per_s",
        "peak_memory_gb",
    ]
    parts = [f"{k}={record[k]:.4g}" for k in keys if k in record and (k != "skipped" or record[k])]
    return f"{record['split']:>5} step {record['step']}: " + " ".join(parts)
