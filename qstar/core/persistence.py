"""What persists a model, written once: whole checkpoints, adapters (LoRA/DoRA) and their fusing, quantization.

`StoredModel` is the part of a model (qstar/core/model.py) that reaches files; a backend supplies its public hooks,
the few things that need the framework: its parameters, tensor files, assignment, freezing, and the adapter,
fuse and quantize layers.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from qstar.core import checkpoint, lora
from qstar.core.checkpoint import CheckpointInfo
from qstar.core.files import atomic_directory
from qstar.core.lora import LoraConfig
from qstar.core.ops import Ops
from qstar.core.recipe import Recipe

Extra = Callable[[Path], None]
"""extra(tmp_dir): adds files (the training state) that appear with a checkpoint in its one atomic rename."""


class StoredModel(ABC):
    """A model's checkpoint, recipe and adapters, and the files it reads and writes."""

    info: CheckpointInfo
    ops: Ops
    recipe: Recipe
    dtype: str
    adapter: LoraConfig | None
    """The adapters' configuration when the model has some (add_adapters, load_adapter)."""
    source: str
    """What the model was loaded from (a directory or hub id): an adapter records it as its base model."""

    # ---- the hooks a backend supplies ----

    @abstractmethod
    def parameters(self) -> dict[str, Any]:
        """Checkpoint name -> backend tensor, every parameter."""

    @abstractmethod
    def write_tensors(self, tensors: dict[str, Any], file: Path) -> None:
        """A safetensors file of backend tensors."""

    @abstractmethod
    def read_tensors(self, file: Path) -> dict[str, Any]:
        """A safetensors file as backend tensors."""

    @staticmethod
    @abstractmethod
    def nbytes(tensor: Any) -> int: ...

    @abstractmethod
    def assign(self, tensors: dict[str, Any]) -> None:
        """Set parameters (checkpoint names) to these values, in their own dtypes."""

    @abstractmethod
    def freeze(self, trainable: Callable[[str], bool]) -> None:
        """Train exactly the parameters whose name `trainable` accepts."""

    @abstractmethod
    def wrap_adapters(self, cfg: LoraConfig) -> None:
        """Wrap the configured Linear layers with adapters (qstar/core/lora.py)."""

    @abstractmethod
    def merge_adapters(self) -> None:
        """Replace every adapted layer by the plain one that computes the same."""

    @abstractmethod
    def quantize_weights(self, bits: int, group_size: int) -> dict[str, Any]:
        """Quantize the base model's layers in place; returns what config.json records of it."""

    def stored_tensors(self) -> dict[str, Any]:
        """What a whole checkpoint stores: the parameters (a backend adds what else its layers keep)."""
        return self.parameters()

    # ---- what they make possible ----

    @property
    def quantization(self) -> dict[str, Any] | None:
        """How the base is quantized (config.json's "quantization": mlx-lm's {"group_size", "bits"}; or
        "quantization_config": a bitsandbytes 4-bit base), else None."""
        raw = self.info.raw_config
        return raw.get("quantization") or raw.get("quantization_config")

    def quantize(self, bits: int, group_size: int) -> None:
        """Quantize the base weights for QLoRA; the thought vectors and mixing head stay."""
        if self.quantization is not None:
            raise ValueError(f"{self.source} is quantized already: convert its float source with --quantize")
        if self.adapter is not None:
            raise ValueError("quantize a model without adapters: fuse them first (qstar fuse)")
        recorded = self.quantize_weights(bits, group_size)
        self.info = replace(self.info, raw_config={**self.info.raw_config, **recorded})

    def add_adapters(self, cfg: LoraConfig) -> None:
        """Wrap the configured Linear layers with fresh adapters; from then on only the adapters, the thought vectors
        and the mixing head train."""
        if self.adapter is not None:
            raise ValueError("this model has adapters already")
        self.wrap_adapters(cfg)
        self.adapter = cfg
        self.freeze(lora.trainable)

    def adapter_tensors(self) -> dict[str, Any]:
        """What an adapter file holds: the adapters, the thought vectors and the mixing head."""
        return {k: v for k, v in self.parameters().items() if lora.trainable(k)}

    def save_adapter(self, path: str | Path, overwrite: bool = False, extra: Extra | None = None) -> Path:
        """Write the adapter directory atomically (adapter_config.json, adapters.safetensors), as save() does."""
        if self.adapter is None:
            raise ValueError("this model has no adapters: save() writes the whole checkpoint")
        config = {
            **self.adapter.to_file(),
            "base_model": self.source,
            "qstar": {"format_version": checkpoint.FORMAT_VERSION, "recipe": self.recipe.to_dict()},
        }
        with atomic_directory(path, overwrite) as tmp:
            self.write_tensors(self.adapter_tensors(), tmp / lora.WEIGHTS_FILE)
            (tmp / lora.CONFIG_FILE).write_text(json.dumps(config, indent=2))
            if extra is not None:
                extra(tmp)
        return Path(path)

    def load_adapter(self, path: str | Path) -> None:
        """Wrap the layers an adapter directory says and load its weights (a directory save_adapter wrote)."""
        path = Path(path)
        self.add_adapters(lora.LoraConfig.from_file(path))
        file = path / lora.WEIGHTS_FILE
        try:
            tensors = self.read_tensors(file)
        except Exception as err:  # missing, truncated: the frameworks' errors have no common type
            raise checkpoint.damaged(file, err) from None
        expected = {k: tuple(v.shape) for k, v in self.adapter_tensors().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
            raise ValueError(
                f"{file} does not fit {self.info.path} (missing {missing[:3]}, unexpected {unexpected[:3]}, or other "
                "shapes): pass the --model the adapter was trained on"
            )
        self.assign(tensors)

    def fuse(self) -> None:
        """Merge the adapters into the weights: a plain model that computes what the adapted one does."""
        if self.adapter is None:
            raise ValueError("this model has no adapters to fuse")
        self.merge_adapters()
        self.adapter = None
        self.freeze(lambda name: True)

    def save(self, path: str | Path, overwrite: bool = False, extra: Extra | None = None) -> Path:
        """Write a qstar checkpoint atomically: base weights (HF names), extras, config, tokenizer."""
        if self.adapter is not None:
            raise ValueError(
                "this model has adapters: fuse() merges them first (qstar fuse), save_adapter() writes them"
            )
        params = self.stored_tensors()
        extras = {k: v for k, v in params.items() if k.startswith(checkpoint.EXTRA_PREFIXES)}
        base = {k: v for k, v in params.items() if k not in extras}
        base = checkpoint.source_names(self.info.config, base, lambda parts: self.ops.concat(parts, axis=0))
        with atomic_directory(path, overwrite) as tmp:
            sizes = {k: self.nbytes(v) for k, v in base.items()}
            shards = checkpoint.plan_shards(sizes, checkpoint.MAX_SHARD_BYTES)
            for name, names in zip(checkpoint.shard_file_names(len(shards)), shards, strict=True):
                self.write_tensors({k: base[k] for k in names}, tmp / name)
            checkpoint.write_index(tmp, shards, sum(sizes.values()))
            self.write_tensors(extras, tmp / checkpoint.EXTRAS_FILE)
            config = checkpoint.qstar_config(self.info, self.recipe.to_dict(), self.dtype)
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            checkpoint.save_generation_files(self.info, tmp)
            if extra is not None:
                extra(tmp)
        return Path(path)

    def save_any(self, path: str | Path, overwrite: bool = False, extra: Extra | None = None) -> Path:
        """What a run's checkpoint holds: the whole model, or an adapter run's adapter."""
        return (self.save if self.adapter is None else self.save_adapter)(path, overwrite, extra)
