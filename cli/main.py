"""The `qstar` command: one typer app, one small module per subcommand."""

from __future__ import annotations

from typing import Annotated

import typer

from qstar.cli import bench, convert, evaluate, fuse, generate, inspect_text, serve, train
from qstar.cli.options import Command, Group

app = typer.Typer(
    name="qstar",
    cls=Group,
    help="Quiet-STaR: train language models to think before each token (PyTorch or MLX).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
for name, command in {
    "convert": convert.convert,
    "train": train.train,
    "generate": generate.generate,
    "eval": evaluate.evaluate,
    "inspect": inspect_text.inspect_text,
    "bench": bench.bench,
    "fuse": fuse.fuse,
    "serve": serve.serve,
}.items():
    app.command(name, cls=Command)(command)


def show_version(value: bool) -> None:
    if value:
        from qstar import __version__

        typer.echo(f"qstar {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    """Quiet-STaR: train language models to think before each token (PyTorch or MLX)."""


if __name__ == "__main__":
    app()
