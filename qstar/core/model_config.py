"""The models qstar knows, described once: a Hugging Face `config.json` read into one plain description both backends
build from, the weights (names and shapes) that description implies, and the named shapes of the models users train
(what `qstar bench` builds at random and the memory estimate covers).

Handles both places transformers has kept RoPE settings: a top-level `rope_theta`/`rope_scaling`
(checkpoints written before transformers 5) and the `rope_parameters` dict (transformers 5).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "openelm")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
Power = Callable[[float, np.ndarray], np.ndarray]
"""base ** exponents (float32 in and out)."""


@dataclass(frozen=True)
class LayerShape:
    """What may differ between decoder layers (OpenELM scales them layer by layer)."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    max_position_embeddings: int | None = None
    layer_shapes: tuple[LayerShape, ...] = ()
    """Per decoder layer, where layers differ (else every layer has num_heads, num_kv_heads, intermediate_size)."""

    def layer(self, index: int) -> LayerShape:
        """The shape of decoder layer `index`."""
        if self.layer_shapes:
            return self.layer_shapes[index]
        return LayerShape(self.num_heads, self.num_kv_heads, self.intermediate_size)

    def check_length(self, length: int) -> None:
        """Sequences past the sliding window would need its mask, which qstar does not implement."""
        if self.sliding_window is not None and length > self.sliding_window:
            raise ValueError(f"sequence length {length} exceeds the model's sliding window {self.sliding_window}")
        if self.max_position_embeddings is not None and length > self.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds the model's context of {self.max_position_embeddings}")

    @property
    def context(self) -> int | None:
        """The most tokens a sequence may hold (None: no limit known)."""
        limits = [n for n in (self.max_position_embeddings, self.sliding_window) if n is not None]
        return min(limits) if limits else None

    @property
    def fallback_pad_id(self) -> int:
        """Id fed as the teacher-forced token past the end of a sequence (pad, else EOS, else 0)."""
        for value in (self.pad_token_id, self.eos_token_id):
            if value is not None:
                return value
        return 0


def _first_int(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}: qstar supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type == "openelm":
        return parse_openelm(raw)
    rope: dict[str, Any] = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    theta: float = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    if not scaling and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported RoPE type {rope_type!r}: qstar supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    if raw.get("mlp_bias"):
        raise ValueError("unsupported config: mlp_bias=true (no Llama-family checkpoint qstar knows uses it)")
    heads = int(raw["num_attention_heads"])
    sliding = raw.get("sliding_window") if raw.get("use_sliding_window", model_type == "mistral") else None
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=bias or model_type == "qwen2",
        o_bias=bias and model_type != "qwen2",
        qk_norm=model_type == "qwen3",
        rope_scaling={**scaling, "rope_type": rope_type},
        sliding_window=None if sliding is None else int(sliding),
        bos_token_id=_first_int(raw.get("bos_token_id")),
        eos_token_id=_first_int(raw.get("eos_token_id")),
        pad_token_id=_first_int(raw.get("pad_token_id")),
        max_position_embeddings=_first_int(raw.get("max_position_embeddings")),
    )


def make_divisible(value: float, divisor: int) -> int:
    """OpenELM's widths (corenet's make_divisible): the nearest multiple of divisor, at least divisor, and never more
    than 10% below value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def per_layer(raw: dict[str, Any], name: str, layers: int) -> list[float]:
    """A per-layer OpenELM setting: a list of one value a layer, two ends spread linearly over the layers (rounded to
    2 decimals, as the hub's config class spreads them), or one value for every layer."""
    value = raw[name]
    if isinstance(value, int | float):
        return [float(value)] * layers
    if len(value) == 2 and layers != 2:
        return [round(float(v), 2) for v in np.linspace(value[0], value[1], num=layers)]
    if len(value) != layers:
        raise ValueError(f"{name} holds {len(value)} values for {layers} layers: give one a layer")
    return [float(v) for v in value]


def openelm_layers(raw: dict[str, Any]) -> tuple[LayerShape, ...]:
    """OpenELM's layer-wise scaling: each layer's query and KV heads and FFN width. The head lists are read as
    config.json gives them (as mlx-lm does), else computed from qkv_multipliers and num_gqa_groups (as the hub's
    config class does); FFN width = make_divisible(multiplier * model_dim, ffn_dim_divisor)."""
    layers, d, hd = int(raw["num_transformer_layers"]), int(raw["model_dim"]), int(raw["head_dim"])
    groups = int(raw.get("num_gqa_groups", 1))
    if "num_query_heads" in raw:
        heads = [int(h) for h in raw["num_query_heads"]]
        kv = [int(h) for h in raw.get("num_kv_heads", [h // groups for h in heads])]
    else:
        heads = [make_divisible(d * m, hd * groups) // hd for m in per_layer(raw, "qkv_multipliers", layers)]
        kv = [h // groups for h in heads]
    widths = [
        make_divisible(m * d, int(raw.get("ffn_dim_divisor", 256))) for m in per_layer(raw, "ffn_multipliers", layers)
    ]
    if not len(heads) == len(kv) == layers:
        raise ValueError(f"num_query_heads and num_kv_heads need one value for each of the {layers} layers")
    return tuple(LayerShape(h, k, f) for h, k, f in zip(heads, kv, widths, strict=True))


def parse_openelm(raw: dict[str, Any]) -> ModelConfig:
    """Apple's OpenELM: Llama's layers (fused projections are split where checkpoints are read), scaled layer by
    layer, q/k RMSNorm, tied embeddings; RMSNorm eps 1e-6 as mlx-lm takes it (config.json has none)."""
    if not raw.get("ffn_with_glu", True) or raw.get("activation_fn_name", "swish") not in ("swish", "silu"):
        raise ValueError("unsupported OpenELM config: qstar runs its gated SiLU FFN (ffn_with_glu, swish) only")
    if raw.get("normalization_layer_name", "rms_norm") != "rms_norm":
        raise ValueError("unsupported OpenELM config: qstar runs its RMSNorm (normalization_layer_name rms_norm) only")
    shapes = openelm_layers(raw)
    widest = max(shapes, key=lambda s: (s.num_heads, s.intermediate_size))
    return ModelConfig(
        model_type="openelm",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["model_dim"]),
        intermediate_size=max(s.intermediate_size for s in shapes),
        num_layers=len(shapes),
        num_heads=widest.num_heads,
        num_kv_heads=widest.num_kv_heads,
        head_dim=int(raw["head_dim"]),
        rms_norm_eps=1e-6,
        rope_theta=float(raw.get("rope_freq_constant", 10000.0)),
        tie_word_embeddings=bool(raw.get("share_input_output_layers", True)),
        qkv_bias=False,
        o_bias=False,
        qk_norm=bool(raw.get("normalize_qk_projections", True)),
        rope_scaling={"rope_type": "default"},
        bos_token_id=_first_int(raw.get("bos_token_id")),
        eos_token_id=_first_int(raw.get("eos_token_id")),
        pad_token_id=_first_int(raw.get("pad_token_id")),
        max_position_embeddings=_first_int(raw.get("max_context_length")),
        layer_shapes=shapes,
    )


def read_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Parse `path/config.json`; returns the description and the raw dict (kept to write it back)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: pass a checkpoint directory that contains config.json")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}): repair it or download the checkpoint again") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} holds a JSON {type(raw).__name__}, not an object of settings: repair it")
    try:
        return parse_config(raw), raw
    except KeyError as err:
        raise ValueError(
            f"{file} has no {err} setting, which a {raw.get('model_type')} model needs: repair it"
        ) from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from None


def float32_power(base: float, exponents: np.ndarray) -> np.ndarray:
    """base ** exponents in float32, as numpy computes it."""
    return (np.float32(base) ** exponents.astype(np.float32)).astype(np.float32)


def inverse_frequencies(cfg: ModelConfig, power: Power = float32_power) -> np.ndarray:
    """RoPE inverse frequencies in float32, computed as transformers does (scaling included). `power` is the float32
    pow of the framework whose reference to follow: torch's and numpy's differ in the last bit for some head sizes
    (head_dim 12 at rope_theta 1e6, say), and transformers computes it with torch's."""
    dim = cfg.head_dim
    exponents = (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)).astype(np.float32)
    inv = (1.0 / power(cfg.rope_theta, exponents)).astype(np.float32)
    kind = cfg.rope_scaling["rope_type"]
    if kind == "linear":
        inv = (inv / np.float32(cfg.rope_scaling["factor"])).astype(np.float32)
    elif kind == "llama3":
        s = cfg.rope_scaling
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_angles(cfg: ModelConfig, positions: np.ndarray, power: Power = float32_power) -> np.ndarray:
    """Angles (..., head_dim) in float32 for integer positions, halves duplicated (rotate-half convention)."""
    freqs = positions.astype(np.float32)[..., None] * inverse_frequencies(cfg, power)
    return np.concatenate([freqs, freqs], axis=-1)


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the base model under its Hugging Face name, with its shape (what a checkpoint holds; the
    Quiet-STaR extras are checkpoint.init_extras')."""
    d, hd = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_layers):
        dims = cfg.layer(i)
        layer, q, kv = f"model.layers.{i}.", dims.num_heads * hd, dims.num_kv_heads * hd
        attention = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q)}
        for name, shape in attention.items():
            shapes[f"{layer}self_attn.{name}.weight"] = shape
            if cfg.qkv_bias and name != "o_proj" or cfg.o_bias and name == "o_proj":
                shapes[f"{layer}self_attn.{name}.bias"] = (shape[0],)
        if cfg.qk_norm:
            shapes[f"{layer}self_attn.q_norm.weight"] = shapes[f"{layer}self_attn.k_norm.weight"] = (hd,)
        f = dims.intermediate_size
        mlp = {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
        shapes |= {f"{layer}mlp.{name}.weight": shape for name, shape in mlp.items()}
        shapes[f"{layer}input_layernorm.weight"] = shapes[f"{layer}post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def is_linear(name: str) -> bool:
    """Whether a weight is a decoder layer's Linear weight (what LoRA adapts and quantization packs)."""
    return ".layers." in name and name.endswith("proj.weight")


SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)
SHAPES: dict[str, dict[str, Any]] = {
    name: dict(zip(SHAPE_FIELDS, row, strict=True))
    for name, *row in [
        ("small", "llama", 4096, 256, 704, 4, 4, 2, False),
        ("proxy-24", "qwen2", 512, 64, 128, 24, 2, 1, True),
        ("Qwen2.5-0.5B", "qwen2", 151936, 896, 4864, 24, 14, 2, True),
        ("Qwen2.5-1.5B", "qwen2", 151936, 1536, 8960, 28, 12, 2, True),
        ("Qwen2.5-7B", "qwen2", 152064, 3584, 18944, 28, 28, 4, False),
        ("Mistral-7B", "mistral", 32000, 4096, 14336, 32, 32, 8, False),
    ]
}
SHAPES["OpenELM-270M"] = dict(
    model_type="openelm",
    vocab_size=32000,
    model_dim=1280,
    head_dim=64,
    num_transformer_layers=16,
    num_gqa_groups=4,
    num_query_heads=[12] * 5 + [16] * 7 + [20] * 4,
    num_kv_heads=[3] * 5 + [4] * 7 + [5] * 4,
    qkv_multipliers=[0.5, 1.0],
    ffn_multipliers=[round(float(m), 2) for m in np.linspace(0.5, 4.0, 16)],
    ffn_dim_divisor=256,
    max_context_length=2048,
    rope_freq_constant=10000,
    normalize_qk_projections=True,
    share_input_output_layers=True,
    bos_token_id=1,
    eos_token_id=2,
)
"""Named model shapes as their config.json fields: `small` (a CPU benchmark's Llama), `proxy-24` (Qwen2-0.5B's 24
layers at width 64: a real model's operator count at a CPU's cost), and the published shapes of the models the
README's memory table covers (OpenELM-270M as apple/OpenELM-270M's config.json gives it)."""
SHAPE_DEFAULTS = {"max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}
"""What a named shape's config.json gets besides (the model family's defaults)."""


def shape_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The config.json fields of a named shape, with single fields changed."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}: choose one of {', '.join(SHAPES)}")
    return {**SHAPE_DEFAULTS, **SHAPES[name], **overrides}
