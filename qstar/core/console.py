"""The one way qstar prints through rich."""

from __future__ import annotations

from rich.console import Console


def console(stderr: bool = True) -> Console:
    """A console that never wraps a line: a terminal folds long lines on screen by itself, and a file or pipe (which
    rich takes for 80 columns) gets every sentence and path whole, one record a line."""
    return Console(stderr=stderr, highlight=False, soft_wrap=True)
