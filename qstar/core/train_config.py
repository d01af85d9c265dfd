"""Training settings: one dataclass, readable from YAML or TOML, overridden by flags, saved with the run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qstar.core.recipe import Recipe, make_recipe
from qstar.weights import DEFAULT_MODEL


@dataclass
class TrainConfig:
    backend: str = "auto"
    """auto (mlx on Apple silicon when installed, else torch), torch or mlx."""
    model: str = DEFAULT_MODEL
    """Checkpoint directory or hub id (default: the small arithmetic model shipped in weights/)."""
    data: str = "synthetic"
    """synthetic, a .txt/.jsonl/.parquet file, or a Hugging Face dataset id (streamed)."""
    text_field: str = "text"
    """JSONL/parquet field(s) holding the text; a comma-separated list joins several with newlines."""
    val_data: str | None = None
    """Held-out data (default: a disjoint part of --data)."""
    out: str = "runs/qstar"
    """Run directory: checkpoints/, metrics.jsonl, config.json and the `model` link to the newest checkpoint."""
    dtype: str = "float32"
    """Compute dtype; the optimizer keeps float32 master weights for bfloat16/float16."""
    iters: int = 200
    """Optimizer steps."""
    batch_size: int = 4
    """Sequences per micro-batch (each thinks thoughts_per_position times)."""
    learning_rate: float = 1e-4
    """Peak learning rate (linear warmup, then linear decay to 0)."""
    warmup_steps: int = 20
    """Steps of linear warmup."""
    weight_decay: float = 0.001
    """AdamW weight decay of matrices (biases, norms and thought vectors get none)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    grad_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    max_seq_length: int = 32
    """Tokens per sequence."""
    steps_per_report: int = 10
    """Steps between training reports."""
    steps_per_eval: int = 50
    """Steps between validations (base vs thoughtful NLL on held-out data)."""
    val_batches: int = 8
    """Held-out batches per validation."""
    save_every: int = 100
    """Steps between checkpoints (and one at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept."""
    seed: int = 0
    """Seed of the data order and the thought sampling."""
    grad_checkpoint: bool = False
    """Recompute layer activations in backward instead of storing them (less memory, more time)."""
    compile: bool = False
    """torch: compile the layers' thought steps with torch.compile (inductor); the first step compiles for minutes,
    later ones run faster (docs/PERFORMANCE.md). mlx always compiles its whole step."""
    recipe: str = "default"
    """Recipe preset (default or paper); recipe fields given as flags override it."""
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    tensorboard: bool = False
    """Also log to TensorBoard (needs tensorboard)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs wandb)."""

    def __post_init__(self) -> None:
        positive = [
            "iters",
            "batch_size",
            "grad_accumulation_steps",
            "max_seq_length",
            "steps_per_report",
            "steps_per_eval",
            "val_batches",
            "save_every",
            "keep_checkpoints",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("--learning-rate must be > 0 and --warmup-steps, --weight-decay, --max-grad-norm >= 0")
        recipe = self.make_recipe()
        if self.max_seq_length < recipe.min_seq_len():
            raise ValueError(
                f"--max-seq-length {self.max_seq_length} is shorter than lookahead={recipe.lookahead} needs "
                f"({recipe.min_seq_len()} tokens)"
            )

    def make_recipe(self) -> Recipe:
        return make_recipe(self.recipe, **self.recipe_overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML, TOML or JSON file; recipe fields may sit at the top level or under recipe_overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        raw = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        raw = json.loads(text)
    else:
        raise ValueError(f"config file {path}: use .yaml, .yml, .toml or .json")
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    return {k.replace("-", "_"): v for k, v in raw.items()}


def resolve_config(file_settings: dict[str, Any], flags: dict[str, Any]) -> TrainConfig:
    """File settings, then flags on top (flags left at None do not override). Unknown names are errors."""
    train_names = {f.name for f in fields(TrainConfig)}
    recipe_names = {f.name for f in fields(Recipe)}
    merged: dict[str, Any] = {}
    overrides: dict[str, Any] = dict(file_settings.get("recipe_overrides") or {})
    for source in (file_settings, {k: v for k, v in flags.items() if v is not None}):
        for name, value in source.items():
            if name == "recipe_overrides":
                continue
            if name in recipe_names:
                overrides[name] = value
            elif name in train_names:
                merged[name] = value
            else:
                raise ValueError(f"unknown setting {name!r}")
    return TrainConfig(**merged, recipe_overrides=overrides)
