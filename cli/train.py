"""`qstar train`: every training setting and recipe field is a flag; flags override --config FILE."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer

from qstar.cli.errors import user_errors
from qstar.cli.options import field_flags
from qstar.core.recipe import Recipe
from qstar.core.train_config import (
    RESUMABLE,
    TrainConfig,
    merge_settings,
    read_config_file,
    resolve_config,
    resume_config,
)


@user_errors
def train(config: Optional[Path] = None, resume: bool = False, overwrite: bool = False, **flags: Any) -> None:  # noqa: UP045
    """Train a model to think before each token (Quiet-STaR).

    With no arguments: the shipped toy model on fresh synthetic data (README: how long)."""
    from qstar.core import backend, trainer
    from qstar.core.distributed import launched_rank
    from qstar.core.rundir import saved_config

    settings = merge_settings(read_config_file(config) if config is not None else {}, flags)
    if "backend" in settings:
        settings["backend"] = backend.available(settings["backend"])  # the resolved name is saved with the run
    if resume:
        out = Path(settings.get("out") or TrainConfig.out)
        cfg = resume_config(saved_config(out), settings, out)
    else:
        cfg = resolve_config(settings)
    cfg = replace(cfg, backend=backend.available(cfg.backend))
    out = trainer.train(cfg, backend.get(cfg.backend), resume=resume, overwrite=overwrite)
    if launched_rank() == 0:  # one line from torchrun or mlx.launch too
        typer.echo(f"done: {out / 'model'}")


train.__signature__ = inspect.Signature(
    [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[Path],  # noqa: UP045
            default=typer.Option(None, "--config", help="YAML, TOML or JSON file of settings"),
        ),
        inspect.Parameter(
            "resume",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(
                False,
                "--resume",
                help="Continue the run in --out from its newest complete checkpoint, with its own settings; only "
                + ", ".join("--" + n.replace("_", "-") for n in RESUMABLE)
                + " may change",
            ),
        ),
        inspect.Parameter(
            "overwrite",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(False, "--overwrite", help="Remove an earlier run's files from --out first"),
        ),
        *field_flags(TrainConfig, "Training", skip=("recipe_overrides", "model_recipe")),
        *field_flags(Recipe, "Recipe"),
    ]
)
