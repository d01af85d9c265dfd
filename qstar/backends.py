"""The backends by name: one registry, the only place that turns a name into a backend package."""

from __future__ import annotations

import importlib
import importlib.util
import platform
from typing import cast

from qstar.core.backend import Backend

PACKAGES = {"torch": "qstar.torch_backend", "mlx": "qstar.mlx_backend"}
"""Backend name -> its package; the name is also the framework it needs."""


def available(preferred: str = "auto") -> str:
    """ "auto" picks mlx on Apple silicon when installed, else torch; an explicit name must be importable."""
    installed = {name: importlib.util.find_spec(name) is not None for name in PACKAGES}
    if preferred == "auto":
        on_mac = platform.system() == "Darwin" and platform.machine() == "arm64"
        for name in ("mlx", "torch") if on_mac else ("torch", "mlx"):
            if installed[name]:
                return name
        raise RuntimeError("neither torch nor mlx is installed: pip install 'qstar[torch]' or 'qstar[mlx]'")
    if preferred not in PACKAGES:
        raise ValueError(f"unknown backend {preferred!r}: choose auto, {' or '.join(PACKAGES)}")
    if not installed[preferred]:
        raise RuntimeError(f"the {preferred} backend is not installed: pip install 'qstar[{preferred}]'")
    return preferred


def get(name: str = "auto") -> Backend:
    """The backend package of `name` (or of `available(name)` for "auto")."""
    return cast(Backend, importlib.import_module(PACKAGES[available(name)]))
