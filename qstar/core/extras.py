"""The optional extras (pyproject.toml's [project.optional-dependencies]): a package one of them installs is imported
through `require_extra`, so that a missing one is one line naming the extra that installs it, whichever command
reaches it."""

from __future__ import annotations

import importlib
from types import ModuleType


def install_hint(extra: str) -> str:
    """The command that installs an extra, in a clone or not (pip adds an installed package's extras too)."""
    return f"pip install 'qstar-lm[{extra}]'"


def require_extra(module: str, extra: str, what: str, instead: str = "") -> ModuleType:
    """Import `module`; if it, or a package it imports, is missing or broken, one error that says `what` needs it,
    which extra installs it, and what to do `instead`. An ImportError of qstar's own keeps its message: that is a
    bug, not a missing extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = (err.name or module).split(".")[0]
        if package == "qstar":
            raise
        if isinstance(err, ModuleNotFoundError):
            problem = f"{what} needs {package}, which is not installed"
        else:
            problem = f"{what} cannot import {package} ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        raise ImportError(f"{problem}: {install_hint(extra)}" + (f", or {instead}" if instead else "")) from None
