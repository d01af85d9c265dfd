"""The command line's shared parts, each defined once: the options every command takes (--model, --backend, --dtype,
--adapter-path, --threads), flags built from the settings dataclasses (TrainConfig, Recipe: one per field, named like
mlx-lm's, the field's docstring as help), and the help and error format: plain text that keeps every flag name whole
at 80 columns, options grouped in sections, `error: ...` for every error."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Annotated, Any, Optional, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer 0.2x carries its own copy of click; the exceptions and the help formatter are that copy's
    from typer import _click as click
    from typer._click import exceptions
except ImportError:  # pragma: no cover - typer on the click package
    import click  # type: ignore[no-redef]
    from click import exceptions  # type: ignore[no-redef]

from qstar.core.backend import NAMES
from qstar.core.dtypes import CHOICES
from qstar.core.fields import field_docs
from qstar.core.model import QStarModel
from qstar.core.recipe import PRESETS, Recipe, make_recipe

F = TypeVar("F", bound=Callable[..., Any])
OPTIONAL = {"int": Optional[int], "float": Optional[float], "bool": Optional[bool], "str": Optional[str]}  # noqa: UP045
"""Flag annotation per field type: typer reads typing.Optional from a built signature; None means "not given"."""

Model = Annotated[str, typer.Option(help="A qstar checkpoint, or any checkpoint qstar.load takes (HF, hub id)")]
Backend = Annotated[str, typer.Option(help=f"{', '.join(NAMES)} (auto: mlx on Apple silicon, else torch)")]
Dtype = Annotated[str, typer.Option(help=f"Compute dtype: {CHOICES}")]
SourceDtype = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--dtype", help=f"Dtype of the written weights: {CHOICES} [default: the checkpoint's own]"),
]
AdapterPath = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(help="An adapter directory (a --fine-tune-type lora/dora run's checkpoint) to apply to --model"),
]
Threads = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(help="CPU threads (PyTorch) [default: the framework's]"),
]


def shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def preset_defaults(name: str) -> str:
    """A recipe field's default in each preset ("paper 9, default 8, toy 4"), or the one value they share."""
    values = {preset: getattr(make_recipe(preset), name) for preset in PRESETS}
    if len(set(map(repr, values.values()))) == 1:
        return shown(next(iter(values.values())))
    return ", ".join(f"{preset} {shown(v)}" for preset, v in values.items())


def field_flags(
    cls: type,
    panel: str,
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] = (),
    recipe: str = "the checkpoint's",
    defaults: dict[str, Any] | None = None,
) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of the dataclass `cls` (but `skip`, or `only` these); a flag that is not
    given is None, so the value of a config file or of a checkpoint's own recipe (`recipe`) stays. `defaults`: what
    a command uses instead of a field's own default."""
    docs, params = field_docs(cls), []
    for f in fields(cls):
        if f.name in skip or (only and f.name not in only):
            continue
        kind = str(f.type).removesuffix(" | None")
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if kind == "bool" else [flag]
        doc = docs.get(f.name, "")
        if cls is Recipe:
            default = f" [default: {recipe} recipe; presets: {preset_defaults(f.name)}]"
        elif f.name in (defaults or {}):
            default = f" [default: {shown((defaults or {})[f.name])}]"
        elif f.default is MISSING or f.default is None or "default:" in doc.lower():  # the doc says it already
            default = ""
        else:
            default = f" [default: {shown(f.default)}]"
        option = typer.Option(None, *decls, help=doc + default, rich_help_panel=panel)
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=OPTIONAL[kind])
        )
    return params


def settings_options(cls: type, param: str, panel: str, skip: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Give a command a flag for every field of the settings dataclass `cls` (field_flags) but `skip`; it receives
    them as one `param: cls`, the flags not given keeping the fields' defaults."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        flags = field_flags(cls, panel, skip)
        names = [p.name for p in flags]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names}
            return fn(*args, **{param: cls(**{k: v for k, v in given.items() if v is not None})}, **kwargs)

        kept = [p for p in signature.parameters.values() if p.name != param]
        wrapper.__signature__ = signature.replace(parameters=[*kept, *flags])  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))


def recipe_options(fn: F, recipe: str = "the checkpoint's") -> F:
    """Give a command a flag for every recipe field, over `recipe` (the checkpoint's own); the ones given reach it as
    the keyword argument `recipe_overrides`."""
    signature = inspect.signature(fn, eval_str=True)  # the Annotated typer options, not their strings
    kept = [p for p in signature.parameters.values() if p.name != "recipe_overrides"]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        overrides = {name: kwargs.pop(name) for name in RECIPE_FIELDS if name in kwargs}
        return fn(*args, recipe_overrides={k: v for k, v in overrides.items() if v is not None}, **kwargs)

    flags = field_flags(Recipe, "Recipe", recipe=recipe)
    wrapper.__signature__ = signature.replace(parameters=[*kept, *flags])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


@dataclass
class ModelChoice:
    """What --model, --backend, --dtype, --adapter-path, --threads and the recipe flags ask for."""

    path: str
    backend: str = "auto"
    dtype: str = "float32"
    adapter_path: str | None = None
    threads: int | None = None
    recipe_overrides: dict[str, Any] = field(default_factory=dict)

    def load(self) -> QStarModel:
        from qstar.core import backend as backends
        from qstar.core.loading import load

        chosen = backends.get(self.backend)
        model = load(self.path, chosen, self.dtype, adapter_path=self.adapter_path, **self.recipe_overrides)
        chosen.set_threads(self.threads, model.parameter_count)
        return model


def model_flags() -> list[inspect.Parameter]:
    """The options of ModelChoice (but the recipe's), one definition for every command that loads a model."""
    options: dict[str, tuple[Any, Any]] = {
        "model": (Model, inspect.Parameter.empty),
        "backend": (Backend, "auto"),
        "dtype": (Dtype, "float32"),
        "adapter_path": (AdapterPath, None),
        "threads": (Threads, None),
    }
    return [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, (annotation, default) in options.items()
    ]


def model_options(fn: F) -> F:
    """Give a command the model flags and every recipe flag; it receives them as one `model: ModelChoice`."""
    signature = inspect.signature(fn, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.name != "model"]
    names = [p.name for p in model_flags()]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        chosen = {name: kwargs.pop(name) for name in names}
        overrides = {name: kwargs.pop(name) for name in RECIPE_FIELDS if name in kwargs}
        recipe = {k: v for k, v in overrides.items() if v is not None}
        path = chosen.pop("model")
        return fn(*args, model=ModelChoice(path, **chosen, recipe_overrides=recipe), **kwargs)

    params = [*kept, *model_flags(), *field_flags(Recipe, "Recipe")]
    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def plain_table(title: str, columns: list[str], rows: list[list[str]]) -> str:
    """A table as plain text, one line a row however wide (a file or pipe gets it whole)."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([title, line(columns), line(["-" * w for w in widths]), *map(line, rows)])


class Command(TyperCommand):
    """Plain help, its options in one section per panel (rich_help_panel), names never cut."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                default = "Arguments" if param.param_type_name == "argument" else "Options"
                panel = getattr(param, "rich_help_panel", None) or default
                sections.setdefault(panel, []).append(record)
        for panel, records in sections.items():
            with formatter.section(panel):
                formatter.write_dl(records)


class Group(TyperGroup):
    """The `qstar` command: every error a user can cause ends in one `error: ...` line (usage errors included)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone = kwargs.pop("standalone_mode", True)
        kwargs["standalone_mode"] = False
        if not standalone:
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **kwargs)
        except exceptions.UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # `qstar` alone: its help
                err.show()
                sys.exit(err.exit_code)
            if err.ctx is not None:
                click.echo(f"{err.ctx.get_usage()}\nTry '{err.ctx.command_path} -h' for help.", err=True)
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except exceptions.ClickException as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)
