"""The backend-agnostic core imports no backend: neither torch nor mlx, nor qstar's backend packages, lazily or not."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import qstar.core

CORE = Path(qstar.core.__file__).parent
FRAMEWORKS = ("torch", "mlx", "mlx_lm")
PACKAGES = ("qstar.torch_backend", "qstar.mlx_backend")


def core_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(CORE)], prefix="qstar.core."))


def imported_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_core_module_imports_a_backend_anywhere_in_its_code():
    """Statically, function bodies included (a lazy import inside a function counts too)."""
    offenders = {}
    for file in sorted(CORE.rglob("*.py")):
        names = imported_names(ast.parse(file.read_text()))
        bad = sorted(n for n in names if n == "qstar" or n.split(".")[0] in FRAMEWORKS or n.startswith(PACKAGES))
        if bad:
            offenders[str(file.relative_to(CORE))] = bad
    assert offenders == {}


def test_every_core_module_imports_with_torch_and_mlx_unimportable():
    modules = core_modules()
    assert len(modules) > 15 and "qstar.core.thinker" in modules
    blocked = "".join(f"sys.modules[{name!r}] = None; " for name in ("torch", "mlx", "mlx.core", "mlx_lm"))
    code = f"import importlib, sys; {blocked}" + "".join(f"importlib.import_module({m!r}); " for m in modules)
    code += "print(sorted(m for m in sys.modules if m.startswith(('qstar.torch_backend', 'qstar.mlx_backend'))))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
