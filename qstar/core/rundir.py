"""A training run's directory (`--out`): one run in it at a time, nothing of an earlier run silently mixed in or lost.

- A lock (qstar/core/files.py) keeps a second `qstar train` out while one runs; a killed run's lock is taken over.
- A fresh run needs a directory without an earlier run's files; `--resume` continues its newest complete checkpoint;
  `--overwrite` removes the earlier run's files (only those qstar writes) first.
- What killed writers left (temporary checkpoint directories) is removed, saying so.
- A resumed run cuts `metrics.jsonl` back to its checkpoint's step, so that every step is logged exactly once.
- A run that fails before its first step removes what it created, and nothing else.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from qstar.core.distributed import launched_rank
from qstar.core.files import DirectoryLock, remove_orphans, write_atomic

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = re.compile(r"^step-(\d{7})$")
RUN_FILES = ("checkpoints", METRICS_FILE, CONFIG_FILE, "model", "tensorboard", "wandb")
"""What a run writes into its directory (besides the lock and token-cache/, which --overwrite keeps: the cache only
depends on the data)."""


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (each appeared by one atomic rename), oldest first."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CHECKPOINT_DIR.match(p.name) and (p / STATE_FILE).is_file())


def resume_command(out: str | Path) -> str:
    return f"qstar train --resume --out {out}"


def earlier_run(out: Path) -> list[str]:
    """What of an earlier run's files `out` holds."""
    return sorted(name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink())


def nothing_to_resume(out: Path) -> FileNotFoundError:
    """--resume where no complete checkpoint is: what to do instead, the same whichever command finds it."""
    earlier = earlier_run(out)
    if not earlier:
        return FileNotFoundError(f"--resume: {out} holds no run: start one without --resume")
    return FileNotFoundError(
        f"--resume: {out} holds {', '.join(earlier)} but no complete checkpoint, so nothing can be resumed: start "
        "over with --overwrite instead of --resume (or choose another --out)"
    )


def saved_config(out: Path) -> dict[str, Any]:
    """The settings of the run in `out`, as its newest complete checkpoint recorded them."""
    if launched_rank() == 0:  # a run still going is the thing to say first (rank 0 locks: the others would race it)
        DirectoryLock(out, "qstar train", print).check_free()
    existing = checkpoints(out)
    if not existing:
        raise nothing_to_resume(out)
    config: dict[str, Any] = json.loads((existing[-1] / STATE_FILE).read_text())["config"]
    return config


class RunDirectory:
    """Entered for the whole run: creates and locks the directory, cleans leftovers; on an error before `started()`,
    removes what this run created."""

    def __init__(self, out: Path, say: Callable[[str], None]) -> None:
        self.out, self.say = out, say
        self.created: list[Path] = []
        self.began = False
        self.lock = DirectoryLock(out, "qstar train", say)

    def __enter__(self) -> RunDirectory:
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"--out {self.out} is a file: choose a directory")
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(
                f"cannot create --out {self.out} ({err.strerror}): choose a writable directory"
            ) from None
        self.created = missing[::-1]
        if not self.created and not self.lock.file.exists():
            self.created = [self.lock.file]  # a directory that existed: only the lock file is this run's
        try:
            self.lock.__enter__()
        except BaseException:
            self.remove_created()
            raise
        remove_orphans(self.out, self.say)
        remove_orphans(self.out / "checkpoints", self.say)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.lock.__exit__(kind, error, trace)
        if kind is not None and not self.began:
            self.remove_created()

    def remove_created(self) -> None:
        """Remove what this run created: its directories (outermost first), which hold nothing but what it wrote, or in
        a directory that existed, its lock file."""
        for path in self.created:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            if not path.exists():
                break

    def started(self) -> None:
        """The first step is under way: from now on the directory holds a run worth keeping, even if it fails."""
        self.began = True

    def prepare(self, resume: bool, overwrite: bool) -> Path | None:
        """Check what the directory holds against how the run was asked for; returns the checkpoint to resume."""
        existing, earlier = checkpoints(self.out), earlier_run(self.out)
        if resume:
            if overwrite:
                raise ValueError("--resume continues the run in --out, --overwrite starts it over: pass one of them")
            if not existing:
                raise nothing_to_resume(self.out)
            self.trim_metrics(json.loads((existing[-1] / STATE_FILE).read_text())["step"])
            return existing[-1]
        if earlier and not overwrite:
            if existing:
                raise FileExistsError(
                    f"{self.out} already holds a run: pass --resume to continue it, --overwrite to start over, or "
                    "choose another --out"
                )
            raise FileExistsError(
                f"{self.out} already holds an earlier run's files ({', '.join(earlier)}) but no checkpoint to resume: "
                "pass --overwrite to start over, or choose another --out"
            )
        for name in earlier:
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if earlier:
            self.say(f"--overwrite: removed the earlier run's {', '.join(earlier)} from {self.out}")
        return None

    def trim_metrics(self, step: int) -> None:
        """Drop the records after `step` (logged by the run after its last checkpoint, and logged again on resume)."""
        file = self.out / METRICS_FILE
        if not file.is_file():
            return
        lines = file.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            write_atomic(file, "".join(kept))
