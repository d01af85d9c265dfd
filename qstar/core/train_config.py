"""Training settings: one dataclass, readable from YAML or TOML, overridden by flags, saved with the run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from qstar.core.checkpoint import EXTRA_PREFIXES
from qstar.core.dtypes import check_dtype
from qstar.core.fields import check_fields, setting
from qstar.core.lora import FINE_TUNE_TYPES, LINEAR_KEYS, LoraConfig
from qstar.core.recipe import Recipe, make_recipe
from qstar.weights import DEFAULT_MODEL, default_preset


@dataclass
class TrainConfig:
    backend: str = "auto"
    """auto (mlx on Apple silicon when installed, else torch), torch or mlx."""
    model: str = DEFAULT_MODEL
    """Checkpoint directory or hub id (default: the toy model shipped in weights/, docs/TOY.md)."""
    data: str = "synthetic"
    """synthetic, a .txt/.jsonl/.parquet file, or a Hugging Face dataset id (streamed)."""
    text_field: str = "text"
    """JSONL/parquet field(s) holding the text; a comma-separated list joins several with newlines."""
    val_data: str | None = None
    """Held-out data (default: a disjoint part of --data)."""
    out: str = setting("runs/qstar", resumable=True)
    """Run directory: checkpoints/, metrics.jsonl, config.json and the `model` link to the newest checkpoint."""
    dtype: str = "float32"
    """Compute dtype; the optimizer keeps float32 master weights for bfloat16/float16."""
    iters: int = setting(400, positive=True, resumable=True)
    """Optimizer steps."""
    batch_size: int = setting(4, positive=True)
    """Sequences per micro-batch (each thinks thoughts_per_position times); per process under torchrun."""
    learning_rate: float = 1e-4
    """Peak learning rate (linear warmup, then linear decay to 0)."""
    head_learning_rate: float | None = None
    """Peak learning rate of the mixing head and the <start>/<end> vectors, on the same schedule (default:
    --learning-rate): a LoRA run's adapters and the few weights that decide how much a thought counts may need
    different speeds."""
    warmup_steps: int = 20
    """Steps of linear warmup."""
    weight_decay: float = 0.001
    """AdamW weight decay of matrices (biases, norms and thought vectors get none)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    max_bad_steps: int = setting(3, positive=True, resumable=True)
    """Steps in a row whose loss or gradient norm is not finite (their updates are skipped) after which training
    stops with an error."""
    grad_accumulation_steps: int = setting(1, positive=True)
    """Micro-batches per optimizer step."""
    max_seq_length: int = setting(32, positive=True)
    """Tokens per sequence."""
    steps_per_report: int = setting(10, positive=True, resumable=True)
    """Steps between training reports."""
    steps_per_eval: int = setting(50, positive=True, resumable=True)
    """Steps between validations (base vs thoughtful NLL on held-out data)."""
    val_batches: int = setting(8, positive=True, resumable=True)
    """Held-out batches per validation."""
    val_batch_size: int | None = setting(None, positive=True)
    """Sequences per held-out batch (default: --batch-size)."""
    save_every: int = setting(100, positive=True, resumable=True)
    """Steps between checkpoints (and one at the end)."""
    keep_checkpoints: int = setting(2, positive=True, resumable=True)
    """Newest checkpoints kept."""
    seed: int = 0
    """Seed of the data order and the thought sampling."""
    threads: int | None = setting(None, positive=True, resumable=True)
    """CPU threads to compute on (default: the framework's own choice)."""
    grad_checkpoint: bool = setting(False, resumable=True)
    """Recompute layer activations in backward instead of storing them (less memory, more time)."""
    step_mode: str | None = setting(None, resumable=True)
    """How a step scores the thoughts it samples: one-pass (sampling inside the differentiable graph) or two-pass
    (sample without gradient, then one differentiable pass); the same numbers. Default: the faster where it runs."""
    attention: str = setting("split", resumable=True)
    """torch: split (qstar's split attention) or flex (FlexAttention for the passes over all thought steps, CUDA)."""
    thoughts: bool = True
    """Think (Quiet-STaR); --no-thoughts trains the language model alone on the same data, steps and seed (the
    next-token loss, nothing sampled): a run's no-thought twin, which says what the training does without thinking."""
    compile: bool = setting(False, resumable=True)
    """torch: compile the layers' thought steps with torch.compile (inductor); the first step compiles for minutes,
    later ones run faster (docs/PERFORMANCE.md). mlx always compiles its whole step."""
    distributed: str = "auto"
    """torch under torchrun: fsdp (FSDP2: weights, gradients and optimizer state sharded per decoder layer), hsdp
    (FSDP2 within groups of --shard-size processes, replicated across the groups: shard within a node, replicate
    across nodes) or ddp (every process holds the whole model); auto: fsdp for full fine-tuning, ddp for adapters.
    mlx: data parallel."""
    shard_size: int | None = setting(None, positive=True)
    """hsdp: processes a shard group spans; default: the processes of one node (torchrun's LOCAL_WORLD_SIZE)."""
    reshard_after_forward: bool = setting(True, resumable=True)
    """fsdp, hsdp: free each layer's gathered weights after each call (least memory; gathered again for every call
    and in backward) or keep them from its first call until its backward (one all-gather per layer and step; the
    whole model's weights in memory during a step, as ZeRO-2)."""
    fine_tune_type: str = "full"
    """full (every weight trains), lora or dora (adapters on the Linear layers of the last --num-layers decoder
    layers; the thought vectors and the mixing head always train)."""
    num_layers: int = 16
    """lora/dora: adapt the last N decoder layers (-1: all)."""
    lora_rank: int = 8
    """lora/dora: the adapters' rank."""
    lora_scale: float = 20.0
    """lora/dora: the update is scale * x @ lora_a @ lora_b (mlx-lm's convention, not alpha / rank)."""
    lora_dropout: float = 0.0
    """lora/dora: dropout on the adapters' input."""
    lora_keys: str | None = None
    """lora/dora: comma-separated Linear layers of a decoder layer to adapt (default: all seven)."""
    adapter_path: str | None = None
    """lora/dora: start from this adapter (a directory an adapter run wrote) instead of fresh adapters."""
    train_only: str | None = None
    """Comma-separated parameter-name prefixes that train; every other weight stays frozen (default: all train).
    `mixing_head` trains the mixing head alone, so the thoughts stay the pretrained model's (an ablation)."""
    recipe: str = "auto"
    """Recipe preset (default, paper, toy or bridge); auto: the recipe --model records (a qstar checkpoint or adapter,
    an authors' checkpoint), else toy for the shipped model and default for any other. Recipe fields given as flags
    change it."""
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    model_recipe: dict[str, Any] | None = None
    """The recipe --model records, read when the run starts (with_model_recipe): the run's config.json keeps it, so
    that a resumed run starts from the same recipe; `recipe` "checkpoint" means this one."""
    tensorboard: bool = setting(False, resumable=True)
    """Also log to TensorBoard (needs tensorboard)."""
    wandb: bool = setting(False, resumable=True)
    """Also log to Weights & Biases (needs wandb)."""

    def __post_init__(self) -> None:
        check_fields(self)
        self.dtype = check_dtype(self.dtype)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("positive") and value is not None and value < 1:
                raise ValueError(f"--{f.name.replace('_', '-')} must be >= 1, got {value}")
        if self.head_learning_rate is not None and self.head_learning_rate <= 0:
            raise ValueError(f"--head-learning-rate must be > 0, got {self.head_learning_rate}")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("--learning-rate must be > 0 and --warmup-steps, --weight-decay, --max-grad-norm >= 0")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"--attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"--distributed must be one of {', '.join(DISTRIBUTED)}, got {self.distributed!r}")
        if self.shard_size is not None and self.distributed != "hsdp":
            raise ValueError("--shard-size sizes the shard groups of --distributed hsdp: pass that too, or drop it")
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise ValueError(
                f"--fine-tune-type must be one of {', '.join(FINE_TUNE_TYPES)}, got {self.fine_tune_type!r}"
            )
        if self.fine_tune_type == "full" and self.adapter_path is not None:
            raise ValueError("--adapter-path starts from an adapter: pass --fine-tune-type lora or dora too")
        self.lora_config()  # checks the adapter settings
        self.trained_prefixes()
        if self.recipe == CHECKPOINT and self.model_recipe is None:
            raise ValueError(
                "recipe 'checkpoint' needs the model_recipe a run's config.json records: pass --recipe auto"
            )
        recipe = self.make_recipe()
        self.recipe_overrides = {k: getattr(recipe, k) for k in self.recipe_overrides}  # as validated: 2e0 -> 2.0
        if self.recipe != "auto" and self.max_seq_length < recipe.min_seq_len():  # auto: once the recipe is known
            raise ValueError(
                f"--max-seq-length {self.max_seq_length} is shorter than lookahead={recipe.lookahead} needs "
                f"({recipe.min_seq_len()} tokens)"
            )

    def with_model_recipe(self, saved: dict[str, Any] | None) -> TrainConfig:
        """This configuration with `saved`, the recipe --model records (None: none), resolved: `auto` starts from
        the checkpoint's recipe where it has one, else from the preset auto picks; a preset named stays."""
        recipe = self.recipe
        if recipe == "auto":
            recipe = CHECKPOINT if saved is not None else default_preset(self.model)
        return replace(self, recipe=recipe, model_recipe=saved)

    def recipe_name(self) -> str:
        """The preset the recipe starts from, or "checkpoint"; `auto` not yet resolved (with_model_recipe) counts as
        the preset it falls back to: toy for the shipped model (docs/TOY.md), else default."""
        if self.recipe != "auto":
            return self.recipe
        return default_preset(self.model)

    def base_recipe(self) -> Recipe:
        """The recipe the run starts from, before the recipe flags."""
        return make_recipe(self.model_recipe if self.recipe == CHECKPOINT else self.recipe_name())

    def make_recipe(self) -> Recipe:
        return make_recipe(self.base_recipe(), **self.recipe_overrides)

    def trained_prefixes(self) -> tuple[str, ...]:
        """--train-only as a tuple of parameter-name prefixes."""
        prefixes = tuple(p.strip() for p in (self.train_only or "").split(",") if p.strip())
        if self.train_only is not None and not prefixes:
            raise ValueError("--train-only names no parameters: pass prefixes such as mixing_head or thought.")
        return prefixes

    def lr_scale(self, name: str) -> float:
        """The factor on the scheduled learning rate of parameter `name`: --head-learning-rate / --learning-rate for
        the mixing head and the thought vectors, else 1."""
        if self.head_learning_rate is None or not name.startswith(EXTRA_PREFIXES):
            return 1.0
        return self.head_learning_rate / self.learning_rate

    def lora_config(self) -> LoraConfig | None:
        """The adapters of a lora/dora run (None for full fine-tuning)."""
        if self.fine_tune_type == "full":
            return None
        keys = [k.strip() for k in self.lora_keys.split(",")] if self.lora_keys else list(LINEAR_KEYS)
        return LoraConfig(
            self.fine_tune_type, self.num_layers, self.lora_rank, self.lora_scale, self.lora_dropout, keys
        )

    def sharded(self) -> bool:
        """Whether several torch processes shard the model (FSDP2, HSDP) rather than replicate it (DDP)."""
        return self.distributed in SHARDED or (self.distributed == "auto" and self.fine_tune_type == "full")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CHECKPOINT = "checkpoint"
"""The resolved `recipe` of a run that starts from the recipe its --model records (TrainConfig.model_recipe)."""
ATTENTIONS = ("split", "flex")
DISTRIBUTED = ("auto", "ddp", "fsdp", "hsdp")
SHARDED = ("fsdp", "hsdp")
"""The --distributed values under which FSDP2 shards the model (hsdp: within groups, replicated across them)."""

RESUMABLE = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("resumable"))
"""The settings --resume may change: the length of the run (--iters extends it; the learning-rate schedule follows),
reporting, saving and logging, and switches that leave the mathematics as it is. Every other one is the run's own."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML, TOML or JSON file; recipe fields may sit at the top level or under recipe_overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
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
    except (UnicodeDecodeError, ValueError, ImportError) as err:  # JSON, TOML and YAML errors are ValueErrors
        raise ValueError(f"config file {path} cannot be read: {str(err).splitlines()[0]}") from None
    except Exception as err:  # yaml.YAMLError
        raise ValueError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, not a {type(raw).__name__}")
    return {k.replace("-", "_"): v for k, v in raw.items()}


def merge_settings(file_settings: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """One flat dict of settings: a file's (its recipe_overrides and mlx-lm's lora_parameters block lifted to the top),
    then flags on top (flags left at None do not override)."""
    lifted = {k: v for k, v in file_settings.items() if k not in ("recipe_overrides", "lora_parameters")}
    overrides = file_settings.get("recipe_overrides") or {}
    lora = file_settings.get("lora_parameters") or {}
    if not isinstance(overrides, dict) or not isinstance(lora, dict):
        raise ValueError("recipe_overrides and lora_parameters must be mappings")
    lora = {f"lora_{k}": ",".join(v) if k == "keys" and isinstance(v, list) else v for k, v in lora.items()}
    return {**lifted, **lora, **overrides, **{k: v for k, v in flags.items() if v is not None}}


def resolve_config(settings: dict[str, Any]) -> TrainConfig:
    """The configuration of flat `settings` (merge_settings); unknown names are errors."""
    train_names = {f.name for f in fields(TrainConfig)} - {"recipe_overrides"}
    recipe_names = {f.name for f in fields(Recipe)}
    unknown = sorted(set(settings) - train_names - recipe_names)
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}")
    overrides = {k: v for k, v in settings.items() if k in recipe_names}
    return TrainConfig(**{k: v for k, v in settings.items() if k in train_names}, recipe_overrides=overrides)


def value_of(cfg: TrainConfig, name: str) -> Any:
    """The value of a training setting or (for recipe fields) of the recipe it resolves to."""
    return getattr(cfg, name) if name in {f.name for f in fields(TrainConfig)} else getattr(cfg.make_recipe(), name)


def resume_config(saved: dict[str, Any], settings: dict[str, Any], out: Path) -> TrainConfig:
    """The configuration of a resumed run: the checkpoint's own (`saved`, the TrainConfig dict it was written with),
    with the RESUMABLE `settings` on top. Any other setting given must agree with the saved one."""
    run = TrainConfig(**saved)
    wanted = resolve_config(merge_settings(saved, settings))
    for name in settings:
        before, after = value_of(run, name), value_of(wanted, name)
        if name in RESUMABLE or before == after:
            continue
        flag = "--" + name.replace("_", "-")
        if name in ("backend", "dtype"):
            advice = (
                f"its training state does not move to another {name}: resume with {flag} {before}, or start a new "
                f"run from its model (--model {out / 'model'} --out NEW_DIR)"
            )
        else:
            allowed = ", ".join("--" + n.replace("_", "-") for n in RESUMABLE)
            advice = f"drop {flag} (on resume only {allowed} may change), or start a new run with another --out"
        raise ValueError(f"--resume: {flag} {after} contradicts the run in {out}, which has {name}={before}: {advice}")
    return wanted
