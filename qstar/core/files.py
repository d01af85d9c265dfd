"""Files that are never half-written: atomic directories and files, the leftovers of writers that were killed, and the
lock that keeps a second writer out.

A directory or file is written under a temporary sibling name `.NAME.tmp-PID-XXXXXXXX` and appears under its own name
in one rename; a kill can leave only such a sibling, which `remove_orphans` removes once the process PID is gone (a
directory of qstar's own: it carries a marker file until its rename).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

ORPHAN = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]{8}$")
"""The name of a temporary sibling written by atomic_directory."""
MARK = ".qstar-partial"
"""Inside every temporary directory of atomic_directory from its creation until after its rename, so that only qstar's
own are ever removed (one that a kill caught before its marker was written is still empty)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def temporary_name(target: Path, kind: str = "tmp") -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def user_mode(path: Path) -> None:
    """mkdtemp/mkstemp create private entries (0700/0600): give them the user's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


LOW_SPACE = 16 << 20
"""Free bytes below which a failed write is taken for a full disk (some writers, torch.save's among them, do not say
so in their errors)."""


class DiskFull(OSError):
    """A write that ran out of space; what was being written was removed."""


def out_of_space(err: BaseException, parent: Path) -> bool:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space left on device" in str(err):
        return True
    try:
        return isinstance(err, OSError | RuntimeError) and shutil.disk_usage(parent).free < LOW_SPACE
    except OSError:
        return False


def disk_full(target: Path, parent: Path) -> DiskFull:
    free = shutil.disk_usage(parent).free
    return DiskFull(
        errno.ENOSPC, f"no space left on device while writing {target} ({free / 1e6:.1f} MB free): free some space"
    )


def writable_parent(target: Path) -> Path:
    """The directory `target` will be written into, created if needed; one clear error when that is impossible."""
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create {parent} ({err.strerror}): choose a writable output directory") from None
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to {parent}: choose a writable output directory")
    return parent


@contextmanager
def atomic_directory(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it becomes `dst` in one rename, on error it vanishes."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists: choose a new output directory or remove it first")
    parent = writable_parent(dst)
    tmp = Path(mkdtemp(dst, parent))
    try:
        (tmp / MARK).touch()
        yield tmp
        user_mode(tmp)
        old = None
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=temporary_name(dst, "old"), dir=parent))
            (old / MARK).touch()
            os.replace(dst, old / dst.name)
        os.replace(tmp, dst)
        (dst / MARK).unlink()  # after the rename: a directory of this name is never left without its marker
        if old is not None:
            shutil.rmtree(old)
    except BaseException as err:
        full = out_of_space(err, parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full(dst, parent) from err
        raise


def mkdtemp(target: Path, parent: Path) -> str:
    try:
        return tempfile.mkdtemp(prefix=temporary_name(target), dir=parent)
    except OSError as err:  # a read-only file system, a full disk: permission bits alone do not tell (root)
        raise PermissionError(
            f"cannot write to {parent} ({err.strerror}): choose a writable output directory"
        ) from None


def write_atomic(path: str | Path, text: str) -> None:
    """Write a text file so that a reader only ever sees the old content or the new one, never half of it."""
    path = Path(path)
    parent = writable_parent(path)
    try:
        handle, tmp = tempfile.mkstemp(prefix=temporary_name(path), dir=parent)
    except OSError as err:
        raise PermissionError(f"cannot write {path} ({err.strerror}): choose a writable location") from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        user_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException as err:
        full = out_of_space(err, parent)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise disk_full(path, parent) from err
        raise


def remove_orphans(parent: Path, say: Callable[[str], None]) -> list[Path]:
    """Remove what killed writers left in `parent`: atomic_directory's temporary directories whose process is gone.
    Says what it removes."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for item in sorted(parent.iterdir()):
        match = ORPHAN.match(item.name)
        if match is None or item.is_symlink() or not item.is_dir():
            continue
        if int(match["pid"]) == os.getpid() or pid_alive(int(match["pid"])):
            continue
        if (item / MARK).is_file():
            shutil.rmtree(item, ignore_errors=True)
        elif not any(item.iterdir()):  # killed between its creation and its marker's
            item.rmdir()
        else:
            continue
        say(f"removing {item}, left by an interrupted write (process {match['pid']} is gone)")
        removed.append(item)
    return removed


class DirectoryLock:
    """An exclusive lock on a directory, held by one process at a time: `flock` on DIR/.lock, which the system releases
    when its holder exits in any way, even killed. The file records the holder's pid for the messages."""

    def __init__(self, directory: Path, what: str, say: Callable[[str], None]) -> None:
        self.file, self.what, self.say = directory / ".lock", what, say
        self.handle: int | None = None

    def acquire(self) -> int:
        """The locked file's handle; one clear error when another process holds the lock."""
        handle = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(handle)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            owner = self.file.read_text().strip() or "?"
            raise RuntimeError(
                f"{self.file.parent} is in use by another {self.what} (pid {owner}): wait for it to finish, or "
                "choose another directory"
            ) from None
        return handle

    def check_free(self) -> None:
        """Raise the error of `acquire` if the lock is held now; change nothing (an absent directory is free)."""
        if self.file.exists():
            os.close(self.acquire())

    def __enter__(self) -> DirectoryLock:
        handle = self.acquire()
        previous = os.read(handle, 64).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid():
            self.say(f"{self.file.parent}: the previous {self.what} (pid {previous}) ended without releasing it")
        os.ftruncate(handle, 0)
        os.pwrite(handle, str(os.getpid()).encode(), 0)
        self.handle = handle
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.handle is not None:
            os.ftruncate(self.handle, 0)
            os.close(self.handle)  # closing releases the flock
            self.handle = None
