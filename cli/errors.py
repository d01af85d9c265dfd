"""Turn the errors a user can cause into one clear line and exit code 1, instead of a traceback; an interrupted
command (Ctrl-C, SIGTERM) says what it kept and exits 130."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.markup import escape

from qstar.core.console import console

USER_ERRORS = (OSError, ValueError, RuntimeError, ImportError)
"""What bad input or a bad environment raises (files, settings, a full disk, a missing package); anything else is a
bug and keeps its traceback."""


def message(err: BaseException) -> str:
    """One line: an OSError from the system as "reason: file", any other error as its own message, its lines
    joined."""
    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return " ".join(str(err).split())


def print_error(text: str) -> None:
    """`error: text` on standard error, whole however long."""
    console().print(f"[bold red]error:[/] {escape(text)}")


F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            print_error(message(err))
            raise typer.Exit(1) from None
        except KeyboardInterrupt as err:
            console().print(f"[bold]interrupted[/]: {escape(str(err) or 'nothing kept')}")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
