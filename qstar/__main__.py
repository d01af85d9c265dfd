"""`python -m qstar ...` is the `qstar` command."""

from qstar.cli.main import app

app()
