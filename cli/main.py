"""The `qstar` command: one typer app, one small module per subcommand."""

from __future__ import annotations

import typer

from qstar.cli import bench, convert, evaluate, generate, inspect_text, train

app = typer.Typer(
    name="qstar",
    help="Quiet-STaR: train language models to think before each token (PyTorch or MLX).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("convert")(convert.convert)
app.command("train")(train.train)
app.command("generate")(generate.generate)
app.command("eval")(evaluate.evaluate)
app.command("inspect")(inspect_text.inspect_text)
app.command("bench")(bench.bench)


@app.callback()
def main() -> None:
    """Quiet-STaR: train language models to think before each token (PyTorch or MLX)."""


if __name__ == "__main__":
    app()
