"""Parameter-efficient training: LoRA and DoRA adapters in mlx-lm's format, the same on both backends.

An adapter directory holds `adapter_config.json` (mlx-lm's keys: fine_tune_type, num_layers, lora_parameters with
rank, scale, dropout and keys) and `adapters.safetensors`: for every wrapped Linear `<path>.lora_a` (in, r) and
`<path>.lora_b` (r, out) (and DoRA's magnitude `<path>.m` (out,)), y = linear(x) + scale * (x @ lora_a) @ lora_b, plus
qstar's thought vectors and mixing head, which always train: a thinking model is nothing without them (the forks that
froze them trained nothing that thinks). lora_a starts uniform in +-1/sqrt(in) from a numpy generator seeded by the
layer's name, lora_b at zero: both backends start from the same adapter, and the model starts as the base.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qstar.core.checkpoint import EXTRA_PREFIXES, OPENELM_FUSED, OPENELM_RENAMED
from qstar.core.fields import check_fields

FINE_TUNE_TYPES = ("full", "lora", "dora")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
LINEAR_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
"""The Linear layers of a decoder layer, mlx-lm's default keys for the Llama family."""
FUSED_KEYS = OPENELM_FUSED | {name: (internal,) for name, internal in OPENELM_RENAMED.items() if "proj" in name}
"""OpenELM's names of its projections, as --lora-keys takes them: a fused one adapts each of its parts."""
QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)
QUANTIZE_GROUPS = (32, 64, 128)
"""What MLX's affine quantization takes (QLoRA: `qstar convert --quantize`)."""
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


@dataclass
class LoraConfig:
    fine_tune_type: str = "lora"
    """lora or dora."""
    num_layers: int = 16
    """Wrap the last N decoder layers (-1: all of them)."""
    rank: int = 8
    scale: float = 20.0
    """mlx-lm's convention: the update is scale * x @ lora_a @ lora_b (not alpha / rank)."""
    dropout: float = 0.0
    keys: list[str] = field(default_factory=lambda: list(LINEAR_KEYS))
    """The Linear layers of a decoder layer to wrap."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.fine_tune_type not in FINE_TUNE_TYPES[1:]:
            raise ValueError(f"--fine-tune-type {self.fine_tune_type!r}: adapters are lora or dora")
        if self.num_layers == 0 or self.num_layers < -1:
            raise ValueError(f"--num-layers {self.num_layers}: wrap the last N >= 1 decoder layers, or -1 for all")
        if self.rank < 1 or self.scale <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("--lora-rank must be >= 1, --lora-scale > 0 and dropout in [0, 1)")
        self.keys = list(dict.fromkeys(k for key in self.keys for k in FUSED_KEYS.get(key, (key,))))
        unknown = sorted(set(self.keys) - set(LINEAR_KEYS))
        if unknown:
            raise ValueError(f"--lora-keys {unknown}: choose among {', '.join([*LINEAR_KEYS, *FUSED_KEYS])}")

    def layers(self, num_layers: int) -> range:
        """The indices of the wrapped decoder layers: the last num_layers (mlx-lm's slicing, -1 all)."""
        first = 0 if self.num_layers < 0 else max(num_layers - self.num_layers, 0)
        return range(first, num_layers)

    def targets(self, num_layers: int) -> list[str]:
        """Module paths of the Linear layers to wrap ("model.layers.3.self_attn.q_proj", ...)."""
        return [f"model.layers.{i}.{key}" for i in self.layers(num_layers) for key in self.keys]

    def to_file(self) -> dict[str, Any]:
        """adapter_config.json, in mlx-lm's layout."""
        params = {"rank": self.rank, "scale": self.scale, "dropout": self.dropout, "keys": list(self.keys)}
        return {"fine_tune_type": self.fine_tune_type, "num_layers": self.num_layers, "lora_parameters": params}

    @classmethod
    def from_file(cls, directory: Path) -> LoraConfig:
        file = directory / CONFIG_FILE
        raw = read_adapter_config(directory)
        params = raw.get("lora_parameters") or {}
        try:
            return cls(
                raw.get("fine_tune_type", "lora"),
                raw.get("num_layers", 16),
                params.get("rank", 8),
                params.get("scale", 20.0),
                params.get("dropout", 0.0),
                list(params.get("keys") or LINEAR_KEYS),
            )
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None


def is_adapter(path: str | Path) -> bool:
    """Whether `path` is an adapter directory (adapter_config.json, no model config of its own)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and not (path / "config.json").is_file()


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """adapter_config.json: mlx-lm's keys, plus what qstar records (base_model, the recipe)."""
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: --adapter-path names a directory an adapter run wrote")
    try:
        raw = json.loads(file.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}): the adapter is damaged") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object: the adapter is damaged")
    return raw


def initial_lora_a(name: str, in_features: int, rank: int) -> np.ndarray:
    """lora_a (in, r) uniform in +-1/sqrt(in) from a generator seeded by the layer's path: the same on every backend."""
    bound = 1.0 / np.sqrt(in_features)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return rng.uniform(-bound, bound, size=(in_features, rank))


def trainable(name: str) -> bool:
    """Whether a parameter trains in an adapter run: the adapters, the thought vectors and the mixing head."""
    return name.startswith(EXTRA_PREFIXES) or name.rsplit(".", 1)[-1] in ADAPTER_LEAVES


def fused_weight(weight: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, m: np.ndarray | None) -> np.ndarray:
    """The Linear weight (out, in) that computes what the adapter does: W + scale * b.T @ a.T, for DoRA then scaled row
    by row to the magnitude m."""
    adapted = weight + scale * b.T @ a.T
    if m is None:
        return adapted
    return (m / np.linalg.norm(adapted, axis=1))[:, None] * adapted
