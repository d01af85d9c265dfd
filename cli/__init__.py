"""The `qstar` command line. This folder installs as the package `qstar.cli` (pyproject.toml's package-dir), so its
modules import as `qstar.cli.train`, ...: one module per subcommand, `main.py` the app, `options.py` what they share."""
