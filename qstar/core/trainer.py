"""The training loop, written once: data, schedule, validation, atomic checkpoints, resume, and a checkpoint kept
when the run is interrupted (Ctrl-C, or a scheduler's SIGTERM).

A backend supplies a `Session` (its model, optimizer and random state, qstar/core/session.py); what the run shows and
logs is qstar/core/training_log.py; everything else lives here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from qstar.core import lora
from qstar.core.backend import Backend
from qstar.core.checkpoint import EXTRA_PREFIXES
from qstar.core.data import Batch, BlockStream, TokenCache, hard_mask, is_hub_spec, is_synthetic, open_documents
from qstar.core.distributed import World
from qstar.core.files import DiskFull, write_atomic
from qstar.core.loading import load, saved_recipe
from qstar.core.model import QStarModel
from qstar.core.recipe import make_recipe
from qstar.core.rundir import CONFIG_FILE, STATE_FILE, RunDirectory, checkpoints, resume_command
from qstar.core.session import Session, evaluate, mean_metrics
from qstar.core.thinker import NO_THOUGHTS
from qstar.core.train_config import TrainConfig
from qstar.core.training_log import TrainingLog, run_header

COLLAPSE_STEPS = 5
"""Steps in a row with a gradient norm of exactly 0 after which the run is reported as collapsed."""
COLLAPSED = 0.9
"""The share of the held-out thoughts that one string reaches, from which the thoughts count as collapsed."""


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


def save_checkpoint(session: Session, out: Path, step: int, state: dict[str, Any], cfg: TrainConfig) -> Path:
    """Write checkpoints/step-N atomically (weights + training state), then keep the newest `keep_checkpoints`. Weights
    that are not finite are never written: the last good checkpoint stays the newest."""
    if not session.model.finite():
        raise TrainingError(f"step {step}: the weights are not finite, so no checkpoint was written; {last_good(out)}")
    target = out / "checkpoints" / f"step-{step:07d}"

    def extra(tmp: Path) -> None:
        session.write_state(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state, "config": cfg.to_dict()}))

    try:
        session.model.save_any(target, overwrite=True, extra=extra)
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
    batches carry the hard tokens their text marks (data.hard_mask; Batch.hard)."""

    world = world or World()

    def encode(text: str) -> list[int]:
        return tokenizer(text)["input_ids"]

    def mark(text: str | list[int]) -> list[bool]:
        """A token is hard when a character it covers is (the tokenizer's offsets; special tokens cover none). A
        streamed source's cached documents are ids already: none is marked."""
        if not isinstance(text, str):
            return [False] * len(text)
        chars = hard_mask(text)
        return [any(chars[a:b]) for a, b in tokenizer(text, return_offsets_mapping=True)["offset_mapping"]]

    def stream(spec: str, part: str, held_out: bool = False) -> BlockStream:
        def documents(seed: int) -> Iterator[Any]:
            return open_documents(spec, cfg.text_field, seed=seed, part=part)

        factory: Callable[[int], Iterable[Any]] = documents
        encoder: Callable[[Any], list[int]] = encode  # a cached stream yields ids already: its encoder copies them
        if is_hub_spec(spec):
            key = hashlib.sha1(f"{spec}\n{cfg.text_field}".encode()).hexdigest()[:12]
            cache = TokenCache(Path(cfg.out) / "token-cache" / f"{part}-{key}")
            factory, encoder = (lambda seed: cache.documents(lambda: documents(seed), encode)), list
        marks = mark if held_out else None
        rows = ((cfg.val_batch_size or cfg.batch_size) if held_out else cfg.batch_size) * world.size
        return BlockStream(factory, encoder, cfg.max_seq_length, rows, cfg.seed, eos, pad, min_len, mark=marks)

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    train = stream(cfg.data, "all" if cfg.val_data else "train")
    val = stream(*((cfg.val_data, "all") if cfg.val_data else (cfg.data, "validation")), held_out=True)
    return train, [world.share(Batch(*next(val))) for _ in range(cfg.val_batches)]


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM; the message says what was kept and how to continue."""


class StopRequests:
    """SIGINT and SIGTERM (Ctrl-C, a scheduler about to preempt) ask the run to stop after the step under way and keep a
    checkpoint; a second Ctrl-C stops at once. Installed while the loop runs (main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say, self.asked = say, ""
        self.previous: dict[int, Any] = {}

    def handle(self, number: int, frame: FrameType | None) -> None:
        if self.asked and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.asked = signal.Signals(number).name
        self.say(f"{self.asked}: stopping after this step and keeping a checkpoint (Ctrl-C again stops at once)")

    def __enter__(self) -> StopRequests:
        try:
            self.previous = {n: signal.signal(n, self.handle) for n in self.SIGNALS}
        except ValueError:  # not the main thread: signals stay as they are
            self.previous = {}
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def train(
    cfg: TrainConfig, backend: Backend, resume: bool = False, overwrite: bool = False, show_progress: bool = True
) -> Path:
    """Train on `backend` (cfg.backend names it); returns the run directory (its `model` link points at the newest
    checkpoint). A new run reads the recipe --model records (the base of --recipe auto); a resumed one keeps its
    own."""
    if not resume or cfg.recipe == "auto":
        cfg = cfg.with_model_recipe(saved_recipe(cfg.model, cfg.adapter_path))
    backend.check_settings(cfg)
    world = backend.join()
    log = TrainingLog(cfg, world, show_progress)
    out = Path(cfg.out)
    with RunDirectory(out, log.say) if world.main else nullcontext() as run_dir:  # rank 0 owns the directory
        chosen = run_dir.prepare(resume, overwrite) if run_dir is not None else None
        found = world.gather(None if chosen is None else str(chosen))[0]  # every rank resumes from rank 0's choice
        latest = None if found is None else Path(found)
        model = load_for_training(cfg, backend, latest)
        backend.set_threads(cfg.threads, model.parameter_count)
        if model.tokenizer is None:
            raise ValueError(f"{cfg.model} has no tokenizer files: qstar train needs them to tokenize --data")
        train_stream, val_batches = make_streams(cfg, model.tokenizer, model.recipe.min_seq_len(), world)
        session: Session = backend.Session(model, cfg, world)
        log.say(run_header(cfg, model, latest, session.parallel, world))
        if cfg.iters <= cfg.warmup_steps:
            log.say(
                f"warning: --iters {cfg.iters} ends inside --warmup-steps {cfg.warmup_steps}: the learning rate never "
                f"reaches --learning-rate {cfg.learning_rate:g}; pass fewer --warmup-steps"
            )
        loop = Loop(cfg, session, train_stream, val_batches, out, log)
        if latest is not None:
            loop.restore(latest)
        if run_dir is not None:
            write_atomic(out / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2))
            run_dir.started()
        with log.open(out, loop.start), StopRequests(log.say) as stops:
            loop.run(stops)
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
    model = load(source, backend, cfg.dtype, cfg.make_recipe(), step_mode=cfg.step_mode, adapter_path=adapter_path)
    if not cfg.thoughts:
        model.step_mode = NO_THOUGHTS
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
    if model.quantization is not None and cfg.sharded():
        raise ValueError(
            f"--model {source} is quantized: FSDP shards float weights; drop --distributed {cfg.distributed} (its "
            "adapters train with ddp)"
        )
    if model.adapter is None and adapters is not None:
        model.add_adapters(adapters)
    prefixes = cfg.trained_prefixes() or ("",)
    if not any(name.startswith(prefixes) for name in model.parameters()):
        tops = sorted({name.split(".")[0] for name in model.parameters()})
        raise ValueError(
            f"--train-only {cfg.train_only} matches no parameter of {cfg.model}: its parameter names start "
            f"with {', '.join(tops)} (e.g. --train-only mixing_head)"
        )
    if cfg.train_only or not cfg.thoughts:
        kept = lora.trainable if model.adapter is not None else (lambda name: True)  # within an adapter run's set
        # without thoughts nothing reaches the mixing head and the thought vectors: they keep their values (weight
        # decay alone would move them)
        extra = EXTRA_PREFIXES if not cfg.thoughts else ()
        model.freeze(lambda name: name.startswith(prefixes) and kept(name) and not name.startswith(extra))
    return model


class Loop:
    """Steps start+1..iters: a report every steps_per_report, validation every steps_per_eval, a checkpoint every
    save_every (and at the end, or when asked to stop). Every rank steps; rank 0 alone logs and writes checkpoints."""

    def __init__(
        self,
        cfg: TrainConfig,
        session: Session,
        stream: BlockStream,
        val_batches: list[Batch],
        out: Path,
        log: TrainingLog,
    ) -> None:
        self.cfg, self.session, self.stream, self.val_batches, self.out, self.log = (
            cfg,
            session,
            stream,
            val_batches,
            out,
            log,
        )
        self.world: World = session.world
        self.start, self.guard = 0, Guard(cfg.max_bad_steps)
        self.validation: dict[str, float] = {}
        self.collapse_said = False
        self.window: list[dict[str, float]] = []
        """The steps since the last report (restored on resume)."""
        self.tokens_per_step = self.world.size * cfg.batch_size * cfg.grad_accumulation_steps * cfg.max_seq_length

    def restore(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        self.session.read_state(checkpoint)
        self.stream.restore(state["data"])
        self.start, self.window = state["step"], state.get("window", [])
        self.validation = state.get("validation", {})
        self.guard = Guard(self.cfg.max_bad_steps, **state.get("guard", {}))

    def run(self, stops: StopRequests) -> None:
        if self.start == 0:  # where the run starts from: the untrained model's held-out numbers
            self.validate(0)
        tic, timed = time.perf_counter(), 0
        for step in range(self.start, self.cfg.iters):
            done = step + 1
            lr = learning_rate(self.cfg, step)
            batches = [self.world.share(Batch(*next(self.stream))) for _ in range(self.cfg.grad_accumulation_steps)]
            self.window.append(self.session.step(batches, lr))
            self.log.stepped(self.window[-1])
            timed += 1
            failed = self.guard.check(done, self.window[-1], lr, self.out, self.log.say)
            if failed or done % self.cfg.steps_per_report == 0 or done == self.cfg.iters:
                self.report(done, lr, timed / (time.perf_counter() - tic))
                tic, timed = time.perf_counter(), 0
            if failed:
                raise failed
            if done % self.cfg.steps_per_eval == 0 or done == self.cfg.iters:
                self.validate(done)
            stop = self.stop_asked(stops)
            if done % self.cfg.save_every == 0 or done == self.cfg.iters or stop:
                self.save(done)
            if stop:
                raise Interrupted(self.interrupted(done, stops.asked))
        if self.guard.skipped:
            self.log.say(
                f"{self.guard.skipped} of the steps had a non-finite loss or gradient norm; their updates were skipped"
            )
        if self.start >= self.cfg.iters:
            self.log.say(f"nothing to train: the run had already finished its {self.cfg.iters} steps")
        else:
            self.log.say(f"trained {self.cfg.iters - self.start} steps in {self.log.elapsed()}")
        if self.validation:  # absent only when resuming a checkpoint written before validations were kept
            self.log.say(self.summary())

    def summary(self) -> str:
        """What the run achieved on held-out data: the final validation's next-token NLL (and the hard tokens'), and
        on the synthetic corpus the measurement of the README's table (qstar/core/toy_effect.py)."""
        v = self.validation
        parts = [f"summary: held-out next-token NLL {v['nll_base_next']:.4f} -> {v['nll_talk_next']:.4f} with thoughts"]
        if "nll_base_hard" in v:
            parts.append(f"hard tokens {v['nll_base_hard']:.4f} -> {v['nll_talk_hard']:.4f}")
        parts.append(f"mixing weight {v['mixing_weight']:.3f}")
        if "thought_distinct" in v:
            parts.append(
                f"distinct thoughts at a position {v['thought_distinct']:.0%}, thought entropy "
                f"{v['thought_entropy']:.3f}, the commonest thought {v['thought_mode']:.0%}"
            )
        line = ", ".join(parts)
        toy = self.cfg.base_recipe() == make_recipe("toy")
        if is_synthetic(self.cfg.data) and toy and self.world.size == 1:  # the default run, or one trained on from it
            from qstar.core import toy_effect

            line += "\n  " + toy_effect.summary_line(toy_effect.measure(self.session.model))
        return line

    def validate(self, done: int) -> None:
        """Held-out metrics with the same thoughts' seed every time (core/session.evaluate); a warning, once, when the
        thoughts have collapsed to one string."""
        self.validation = evaluate(self.session, self.val_batches, self.cfg.seed + 1)
        self.log.record({"split": "val", "step": done, **self.validation})
        mode = self.validation.get("thought_mode", 0.0)
        if mode >= COLLAPSED and not self.collapse_said:
            self.collapse_said = True
            self.log.say(
                f"warning: step {done}: the thoughts have collapsed: one string is {mode:.0%} of those sampled on "
                f"held-out data (thought_entropy {self.validation['thought_entropy']:.3f}), a pause, not a thought "
                f"(docs/REAL.md); look at them with qstar inspect --model {self.out / 'model'}"
            )

    def stop_asked(self, stops: StopRequests) -> bool:
        """Whether any rank was asked to stop (every rank stops after the same step)."""
        asked = bool(stops.asked)
        return any(self.world.gather(asked)) if self.world.size > 1 else asked

    def report(self, done: int, lr: float, steps_per_s: float) -> None:
        record = {"split": "train", "step": done, "lr": lr, **mean_metrics(self.window)}
        record |= {"tokens_per_s": self.tokens_per_step * steps_per_s, "peak_memory_gb": self.session.peak_memory()}
        self.log.record(record)
        self.window = []

    def save(self, done: int) -> None:
        if self.guard.bad:
            self.log.say(f"step {done}: no checkpoint after a skipped step")
            return
        state = {"data": self.stream.state(), "window": self.window, "guard": self.guard.state()}
        state["validation"] = self.validation  # the summary of a run resumed after its last checkpoint
        with self.session.gathered():
            if self.world.main:
                save_checkpoint(self.session, self.out, done, state, self.cfg)
        self.world.barrier()  # no rank runs ahead of a checkpoint it may have to resume from

    def interrupted(self, done: int, signal_name: str) -> str:
        kept = checkpoints(self.out)
        if not kept:
            return f"{signal_name} at step {done}: no checkpoint could be kept; start over with --overwrite"
        return f"{signal_name} at step {done}: kept {kept[-1]}; continue with: {resume_command(self.cfg.out)}"
