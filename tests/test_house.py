"""The house's rules, measured from the code: framework code only in the backends, imports that only run downward
and no deeper than they are today, no long functions. (tests/core/test_imports.py: the core imports no backend.)"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

FRAMEWORKS = ("torch", "mlx", "mlx_lm", "safetensors.torch", "safetensors.mlx")
BACKENDS = ("qstar/torch_backend/", "qstar/mlx_backend/")
REGISTRY = "qstar/core/backend.py"
"""The one place outside the backends that knows the backends' names."""
MAX_FUNCTION_LINES = 60
MAX_IMPORT_LEVELS = 13
"""The import graph's depth before the house was rebuilt (fewer is better; more means a new layer crept in)."""


def sources() -> dict[str, ast.Module]:
    """Every module of the package as the repository holds it: qstar/ and cli/ (installed as qstar.cli)."""
    files = sorted([*(ROOT / "qstar").rglob("*.py"), *(ROOT / "cli").glob("*.py")])
    return {str(f.relative_to(ROOT)): ast.parse(f.read_text()) for f in files}


def module_name(path: str) -> str:
    name = path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    return "qstar." + name if name.startswith("cli") else name


def imports(tree: ast.Module) -> set[str]:
    """What a module imports, function bodies included."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_framework_code_lives_only_in_the_backends():
    offenders = {}
    for path, tree in sources().items():
        if path.startswith(BACKENDS):
            continue
        used = sorted(
            n
            for n in imports(tree)
            if n.startswith(FRAMEWORKS) and n.split(".")[0] in ("torch", "mlx", "mlx_lm", "safetensors")
        )
        branches = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Compare)
            and any(isinstance(c, ast.Constant) and c.value in ("torch", "mlx") for c in [node.left, *node.comparators])
        ]
        if used or (branches and path != REGISTRY):
            offenders[path] = {"imports": used, "backend-name branches at lines": branches}
    assert offenders == {}


def graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a `from package import module` names the module)."""
    trees = sources()
    modules = {module_name(p) for p in trees}
    edges = {}
    for path, tree in trees.items():
        me = module_name(path)
        edges[me] = {n for n in imports(tree) if n in modules and n != me and not me.startswith(n + ".")}
    return edges


def test_imports_run_downward_and_no_deeper_than_before():
    edges, depth, visiting = graph(), {}, set()

    def level(module: str) -> int:
        if module in depth:
            return depth[module]
        assert module not in visiting, f"import cycle through {module}"
        visiting.add(module)
        depth[module] = 1 + max((level(m) for m in edges[module]), default=0)
        visiting.discard(module)
        return depth[module]

    deepest = max(edges, key=level)
    assert level(deepest) <= MAX_IMPORT_LEVELS, f"{deepest} stands {level(deepest)} levels up"


def test_no_function_is_longer_than_a_screen():
    """A command's typer signature does not count (one option a line); its body does."""
    long = {}
    for path, tree in sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = node.body[0].lineno if path.startswith("cli/") else node.lineno
                lines = (node.end_lineno or node.lineno) - first + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path}:{node.lineno} {node.name}"] = lines
    assert long == {}


def test_the_folders_say_what_they_install_as():
    for folder, package in (("cli", "qstar.cli"), ("weights", "qstar.weights")):
        assert f"`{package}`" in (Path(ROOT) / folder / "__init__.py").read_text()


def test_test_files_have_unique_names():
    """pytest imports test modules by basename (tests/ has no packages): two files of one name abort collection."""
    names = [f.name for f in (Path(ROOT) / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
