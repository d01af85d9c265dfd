"""Flags built from the settings dataclasses (TrainConfig, Recipe): one per field, named like mlx-lm's
(`--batch-size`), with the field's docstring as help and its default shown. A flag that is not given is None, so the
value of a config file or of a checkpoint's own recipe stays."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Annotated, Any, Optional, TypeVar

import typer

from qstar.core.fields import field_docs
from qstar.core.recipe import Recipe

OPTIONAL = {"int": Optional[int], "float": Optional[float], "bool": Optional[bool], "str": Optional[str]}  # noqa: UP045
"""Flag annotation per field type: typer reads typing.Optional from a built signature; None means "not given"."""
F = TypeVar("F", bound=Callable[..., Any])
AdapterPath = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(help="An adapter directory (a --fine-tune-type lora/dora run's checkpoint) to apply to --model"),
]


def field_flags(cls: type, panel: str, skip: tuple[str, ...] = (), default_note: str = "") -> list[inspect.Parameter]:
    """One keyword-only typer option per field of the dataclass `cls` (except `skip`)."""
    docs, params = field_docs(cls), []
    for f in fields(cls):
        if f.name in skip:
            continue
        kind = str(f.type).removesuffix(" | None")
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if kind == "bool" else [flag]
        default = f.default if f.default is not MISSING else None
        shown = (
            (f"{str(default).lower() if isinstance(default, bool) else default}{default_note}")
            if default is not None
            else False
        )
        option = typer.Option(None, *decls, help=docs.get(f.name, ""), rich_help_panel=panel, show_default=shown)
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=OPTIONAL[kind])
        )
    return params


RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))


def recipe_options(fn: F) -> F:
    """Give a command a flag for every recipe field, over the checkpoint's own recipe; the ones given reach it as the
    keyword argument `recipe_overrides`."""
    signature = inspect.signature(fn, eval_str=True)  # the Annotated typer options, not their strings
    kept = [p for p in signature.parameters.values() if p.name != "recipe_overrides"]
    flags = field_flags(Recipe, "Recipe (default: the checkpoint's own)", default_note=" in the default preset")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        overrides = {name: kwargs.pop(name) for name in RECIPE_FIELDS if name in kwargs}
        return fn(*args, recipe_overrides={k: v for k, v in overrides.items() if v is not None}, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*kept, *flags])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
