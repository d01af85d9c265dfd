"""Settings dataclasses: their attribute docstrings (the CLI's help for every setting comes from one place), and one
check of their values' types at the boundary."""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
from dataclasses import field, fields
from typing import Any


def setting(default: Any, *, positive: bool = False, resumable: bool = False) -> Any:
    """A settings field with its rules beside it: `positive`, at least 1 (or None); `resumable`, a value a resumed
    run may change (the length of the run, reporting, saving, switches that leave the mathematics as it is)."""
    return field(default=default, metadata={"positive": positive, "resumable": resumable})


def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring written under it} (fields without one are absent)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


KINDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}


def check_fields(settings: Any) -> None:
    """Check every field of a settings dataclass against its annotation, in place: an int is an int (not a bool, not
    2.5), a float a finite number (an int, or a numeric string as YAML 1.1 reads `1e-4`, becomes a float), a bool a
    bool, a str a str; `X | None` also takes None. One clear error names the field and its flag."""
    for f in fields(settings):
        kind, value = str(f.type), getattr(settings, f.name)
        optional = kind.endswith(" | None")
        kind = kind.removesuffix(" | None")
        if kind not in KINDS or (optional and value is None):
            continue
        checked = _checked(kind, value)
        if checked is None:
            flag = "--" + f.name.replace("_", "-")
            raise ValueError(f"{f.name} ({flag}) must be {KINDS[kind]}, got {value!r}")
        if checked is not value:
            object.__setattr__(settings, f.name, checked)  # frozen dataclasses too


def _checked(kind: str, value: Any) -> Any:
    """`value` as a `kind`, or None when it is not one."""
    if kind == "bool" or kind == "str":
        return value if isinstance(value, bool if kind == "bool" else str) else None
    if isinstance(value, bool):
        return None
    if kind == "int":
        return value if isinstance(value, int) else None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value) if isinstance(value, int) else value
