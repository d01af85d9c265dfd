"""Checkpoint formats: recognise what a directory holds, map names, initialise the thought extras, save atomically.

Three inputs are understood:
- a qstar checkpoint: `config.json` with a `qstar` section, base weights under their Hugging Face names
  in `model*.safetensors` (transformers and mlx-lm still load them), the extras in `qstar.safetensors`;
- an authors' (ezelikman/quiet-star) checkpoint: `start_embedding`, `end_embedding`, `talk_head.0.*`
  beside the Mistral weights;
- a plain Hugging Face checkpoint: the extras are created on load (see `init_extras`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qstar.core.dtypes import DTYPES
from qstar.core.model_config import ModelConfig, read_config
from qstar.core.recipe import PRESETS, Recipe, make_recipe

START_TOKEN = "<|startthought|>"
END_TOKEN = "<|endthought|>"
EXTRAS_FILE = "qstar.safetensors"
EXTRA_PREFIXES = ("thought.", "mixing_head.")
"""Names of the parameters qstar adds to a base model (the thought vectors, the mixing head): qstar.safetensors."""
FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
GENERATION_CONFIG = "generation_config.json"
"""What transformers' generate reads beside the weights; qstar takes its eos ids and keeps it in every save."""
MAX_SHARD_BYTES = 4 << 30
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers some checkpoints carry that the model recomputes."""


@dataclass
class CheckpointInfo:
    path: Path
    kind: str
    """"qstar", "authors" or "hf"."""
    config: ModelConfig
    raw_config: dict[str, Any]
    weight_files: list[Path]
    start_id: int
    end_id: int
    saved_recipe: dict[str, Any] | None = None
    tokenizer: Any = None
    generation_config: dict[str, Any] = field(default_factory=dict)
    """generation_config.json ({} without one)."""

    @property
    def eos_ids(self) -> frozenset[int]:
        """The ids that end generation: the tokenizer's EOS and generation_config.json's (one id or a list)."""
        ids = self.generation_config.get("eos_token_id")
        listed = [] if ids is None else ids if isinstance(ids, list) else [ids]
        own = None if self.tokenizer is None else self.tokenizer.eos_token_id
        return frozenset(listed if own is None else [*listed, own])

    def token_ids(self, text: str) -> list[int]:
        """Ids of `text` without special tokens; empty when the checkpoint has no tokenizer."""
        return [] if self.tokenizer is None else list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def source_dtype(path: Path) -> str:
    """The dtype a checkpoint declares in config.json ("dtype" or "torch_dtype"), float32 when unknown."""
    _, raw = read_config(path)
    declared = str(raw.get("dtype") or raw.get("torch_dtype") or "float32").replace("torch.", "")
    return declared if declared in DTYPES else "float32"


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("model*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise FileNotFoundError(
            f"no model weights in {path}: expected model.safetensors or the shards of model.safetensors.index.json"
            + (f" (missing {', '.join(missing)})" if missing else "")
        )
    return files


def damaged(file: Path, reason: object) -> ValueError:
    return ValueError(
        f"{file} is damaged or incomplete ({str(reason).splitlines()[0][:160]}): download or convert the checkpoint "
        "again"
    )


def safetensors_names(files: list[Path]) -> set[str]:
    """The tensor names in the headers of safetensors files (without reading the tensors)."""
    names: set[str] = set()
    for f in files:
        with open(f, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = handle.read(size)
        try:
            if len(header) != size:
                raise ValueError(f"the header says {size} bytes, the file holds {len(header)}")
            names.update(k for k in json.loads(header) if k != "__metadata__")
        except ValueError as err:  # truncated or not a safetensors file at all
            raise damaged(f, err) from None
    return names


def load_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer with the two thought tokens added, or None when it ships no tokenizer files."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES[:3]):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    missing = [t for t in (START_TOKEN, END_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return tokenizer


def inspect(path: str | Path) -> CheckpointInfo:
    """Recognise a local checkpoint directory and everything needed to load it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: pass a checkpoint directory (config.json + *.safetensors)")
    config, raw = read_config(path)
    files = weight_files(path)
    tokenizer = load_tokenizer(path)
    generation = read_generation_config(path)
    if "qstar" in raw:
        start_id, end_id, recipe = qstar_section(path, raw["qstar"])
        return CheckpointInfo(path, "qstar", config, raw, files, start_id, end_id, recipe, tokenizer, generation)
    names = safetensors_names(files)
    if "start_embedding" in names or any(n.startswith("talk_head.") for n in names):
        ref = path / "quietstar_reference.json"
        settings = json.loads(ref.read_text()) if ref.is_file() else {}
        if tokenizer is not None:
            default_start, default_end = tokenizer.convert_tokens_to_ids([START_TOKEN, END_TOKEN])
        else:
            default_start, default_end = config.vocab_size - 2, config.vocab_size - 1
        start_id, end_id = settings.get("start_token_id", default_start), settings.get("end_token_id", default_end)
        recipe = authors_recipe({**raw, **settings})
        return CheckpointInfo(path, "authors", config, raw, files, start_id, end_id, recipe, tokenizer, generation)
    if tokenizer is not None:
        start_id, end_id = tokenizer.convert_tokens_to_ids([START_TOKEN, END_TOKEN])
    else:
        start_id, end_id = config.vocab_size, config.vocab_size + 1
    return CheckpointInfo(path, "hf", config, raw, files, start_id, end_id, None, tokenizer, generation)


def read_generation_config(path: Path) -> dict[str, Any]:
    """generation_config.json, read once at load ({} without one); its eos_token_id must be an id or a list of ids."""
    file = path / GENERATION_CONFIG
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}): repair or remove it") from None
    eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
    listed = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not isinstance(raw, dict) or not all(type(i) is int and i >= 0 for i in listed):
        raise ValueError(f"{file}: eos_token_id must be a token id or a list of token ids, got {eos!r}: repair it")
    return raw


def qstar_section(path: Path, section: Any) -> tuple[int, int, dict[str, Any] | None]:
    """The thought token ids and the recipe config.json's qstar section records, checked."""
    version = section.get("format_version") if isinstance(section, dict) else None
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise ValueError(
            f"{path / 'config.json'}: qstar checkpoint format version {version}, but this qstar reads version "
            f"{FORMAT_VERSION}: "
            + ("upgrade qstar (pip install -U qstar-lm)" if newer else "convert the checkpoint again (qstar convert)")
        )
    if not (path / EXTRAS_FILE).is_file():
        raise FileNotFoundError(f"{path / EXTRAS_FILE} missing: the qstar checkpoint is incomplete")
    lacking = [k for k in ("start_token_id", "end_token_id") if not isinstance(section.get(k), int)]
    if lacking:
        raise ValueError(f"{path / 'config.json'}: the qstar section has no {lacking[0]}: convert the checkpoint again")
    return section["start_token_id"], section["end_token_id"], section.get("recipe")


AUTHORS_SETTINGS = {
    "n_ahead_talk": "lookahead",
    "n_passes": "thoughts_per_position",
    "reinforce_temperature": "policy_temperature",
    "policy_loss_beta": "policy_weight",
    "original_loss_weight": "base_loss_weight",
    "remove_negative_rewards": "clamp_negative_advantage",
    "embedding_scale": "embedding_scale",
}
"""The authors' names of the recipe fields they record directly."""


def authors_recipe(settings: dict[str, Any]) -> dict[str, Any]:
    """The recipe of an authors' checkpoint: the `paper` preset with what its config.json (or quietstar_reference.json)
    records. Their n_ahead counts the base step, <start> and <end> besides the thought tokens (thought_tokens =
    n_ahead - 3); a released config records only max_thoughts = n_ahead + n_ahead_talk + 1 (n_ahead_talk 4 in their
    training script when it is not recorded). A setting of the wrong type is left to the preset."""
    recipe = dict(PRESETS["paper"])
    recipe.update({field: settings[name] for name, field in AUTHORS_SETTINGS.items() if name in settings})
    if isinstance(settings.get("n_ahead"), int):
        recipe["thought_tokens"] = settings["n_ahead"] - 3
    elif isinstance(settings.get("max_thoughts"), int):
        recipe["thought_tokens"] = settings["max_thoughts"] - recipe["lookahead"] - 1 - 3
    try:
        return make_recipe(recipe).to_dict()
    except ValueError:
        return dict(PRESETS["paper"])


def check_weights(info: CheckpointInfo, expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]]) -> None:
    """One clear error when the weights on disk are not those config.json describes (names, then shapes)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{info.path}: weights do not match config.json (model_type {info.config.model_type}); "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if got[name] != shape:
            raise ValueError(f"{info.path}: {name} has shape {got[name]}, config.json implies {shape}")


AUTHORS_EXTRAS = {"start_embedding": "thought.start", "end_embedding": "thought.end"}
OPENELM_RENAMED = {
    "attn.out_proj": "self_attn.o_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "ffn.proj_2": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
OPENELM_FUSED = {
    "attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "ffn.proj_1": ("mlp.gate_proj", "mlp.up_proj"),
}
"""An OpenELM layer's modules under qstar's (Hugging Face Llama) names: its fused projections hold their parts' rows
in this order (q | k | v, gate | up), whatever the leaf (weight; a quantized base's scales and biases)."""
OPENELM_OUTER = {"transformer.token_embeddings": "model.embed_tokens", "transformer.norm": "model.norm"}


def part_rows(cfg: ModelConfig, index: int, fused: str) -> list[int]:
    """How many rows each part of a fused projection of layer `index` holds."""
    shape = cfg.layer(index)
    if fused == "attn.qkv_proj":
        return [shape.num_heads * cfg.head_dim, shape.num_kv_heads * cfg.head_dim, shape.num_kv_heads * cfg.head_dim]
    return [shape.intermediate_size, shape.intermediate_size]


def openelm_modules(cfg: ModelConfig) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """OpenELM module path -> qstar's, renamed and fused, over every layer."""
    renamed, fused = dict(OPENELM_OUTER), dict[str, tuple[str, ...]]()
    for i in range(cfg.num_layers):
        layer, ours = f"transformer.layers.{i}.", f"model.layers.{i}."
        renamed |= {layer + name: ours + internal for name, internal in OPENELM_RENAMED.items()}
        fused |= {layer + name: tuple(ours + p for p in parts) for name, parts in OPENELM_FUSED.items()}
    return renamed, fused


def qstar_names(cfg: ModelConfig, tensors: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's base weights under qstar's names: OpenELM's renamed and its fused projections split by rows
    (any other family's are qstar's already)."""
    if cfg.model_type != "openelm":
        return tensors
    renamed, fused = openelm_modules(cfg)
    out: dict[str, Any] = {}
    for name, value in tensors.items():
        module, leaf = name.rsplit(".", 1)
        if module in fused:
            ends = np.cumsum([0, *part_rows(cfg, int(module.split(".")[2]), module.split(".", 3)[3])])
            out |= {f"{p}.{leaf}": value[a:b] for p, a, b in zip(fused[module], ends[:-1], ends[1:], strict=True)}
        else:
            out[f"{renamed.get(module, module)}.{leaf}"] = value
    return out


def source_names(cfg: ModelConfig, tensors: dict[str, Any], concat: Callable[[list[Any]], Any]) -> dict[str, Any]:
    """The inverse of qstar_names: base weights under the checkpoint family's own names (OpenELM's projections fused
    again with `concat` along the rows), so that its own loaders (mlx-lm's) read what qstar writes."""
    if cfg.model_type != "openelm":
        return tensors
    renamed, fused = openelm_modules(cfg)
    back = {ours: theirs for theirs, ours in renamed.items()}
    parts = {p: (theirs, i) for theirs, ours in fused.items() for i, p in enumerate(ours)}
    out: dict[str, Any] = {}
    pieces: dict[str, dict[int, Any]] = {}
    for name, value in tensors.items():
        module, leaf = name.rsplit(".", 1)
        if module in parts:
            theirs, i = parts[module]
            pieces.setdefault(f"{theirs}.{leaf}", {})[i] = value
        else:
            out[f"{back.get(module, module)}.{leaf}"] = value
    return out | {name: concat([got[i] for i in sorted(got)]) for name, got in pieces.items()}


def source_name(kind: str, name: str) -> tuple[str, int | None]:
    """Checkpoint name of an internal parameter, and the row it occupies there (None: the whole tensor)."""
    if kind == "authors":
        for src, dst in AUTHORS_EXTRAS.items():
            if name == dst:
                return src, 0
        if name.startswith("mixing_head."):
            return "talk_head.0." + name[len("mixing_head.") :], None
    return name, None


def internal_weights(kind: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """Rename an authors' state dict to qstar's names (row 0 of start/end_embedding is the used vector)."""
    if kind != "authors":
        return tensors
    out = {}
    for name, value in tensors.items():
        if name in AUTHORS_EXTRAS:
            out[AUTHORS_EXTRAS[name]] = value[0]
        elif name.startswith("talk_head.0."):
            out["mixing_head." + name[len("talk_head.0.") :]] = value
        else:
            out[name] = value
    return out


def source_gradients(
    kind: str, grads: dict[str, np.ndarray], source_shapes: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Gradients under the names and shapes of the loaded checkpoint (rows it does not use get 0)."""
    out: dict[str, np.ndarray] = {}
    for name, grad in grads.items():
        src, row = source_name(kind, name)
        if row is None:
            out[src] = grad
        else:
            full = np.zeros(source_shapes.get(src, (row + 1, *grad.shape)), dtype=grad.dtype)
            full[row] = grad
            out[src] = full
    return out


def model_tensors(
    info: CheckpointInfo,
    recipe: Recipe,
    read_file: Callable[[Path], dict[str, Any]],
    embedding_rows: Callable[[Any, list[int]], np.ndarray],
    from_numpy: Callable[[np.ndarray], Any],
    expected: dict[str, tuple[int, ...]],
) -> dict[str, Any]:
    """Every tensor the model of `info` loads, under qstar's names, checked against the `expected` shapes: the base
    weights, plus the thought extras (read from a qstar or authors' checkpoint, created for a plain HF one).

    The backend supplies its safetensors reader, `embedding_rows(embedding, ids)` (those rows as float64 numpy; all
    rows when ids is empty) and `from_numpy`."""
    tensors: dict[str, Any] = {}
    for file in [*info.weight_files, *([info.path / EXTRAS_FILE] if info.kind == "qstar" else [])]:
        try:
            tensors.update(read_file(file))
        except Exception as err:  # the frameworks' safetensors errors have no common type
            raise damaged(file, err) from None
    tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    if info.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    tensors = qstar_names(info.config, internal_weights(info.kind, tensors))
    if info.kind == "hf":
        rows = embedding_rows(tensors["model.embed_tokens.weight"], info.token_ids(recipe.init_token))
        extras = init_extras(rows, info.config.hidden_size, recipe.embedding_scale)
        tensors.update({k: from_numpy(v) for k, v in extras.items()})
    check_weights(info, expected, {k: tuple(v.shape) for k, v in tensors.items()})
    return tensors


def init_extras(embed_rows: np.ndarray, hidden: int, embedding_scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh thought extras for a plain HF checkpoint.

    <start> and <end> both start at the mean embedding of `embed_rows` (the init_token's rows, or every row
    when there is no tokenizer), divided by embedding_scale since the input vector is scale * parameter.
    The mixing head's hidden layers get PyTorch's default Linear init from a fixed seed; its last layer is
    zero, so the mixing weight starts at 0 and the model starts exactly as the base LM ("hidden" mixing).
    """
    rng = np.random.default_rng(seed)
    vector = embed_rows.astype(np.float64).mean(axis=0) / embedding_scale

    def uniform(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, size=shape)

    return {
        "thought.start": vector.copy(),
        "thought.end": vector.copy(),
        "mixing_head.0.weight": uniform((hidden, 2 * hidden), 2 * hidden),
        "mixing_head.0.bias": uniform((hidden,), 2 * hidden),
        "mixing_head.2.weight": uniform((hidden, hidden), hidden),
        "mixing_head.2.bias": uniform((hidden,), hidden),
        "mixing_head.4.weight": np.zeros((1, hidden)),
    }


def plan_shards(sizes: dict[str, int], max_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most max_bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(directory: Path, shards: list[list[str]], total_bytes: int) -> None:
    if len(shards) == 1:
        return
    files = shard_file_names(len(shards))
    weight_map = {name: files[i] for i, names in enumerate(shards) for name in names}
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def qstar_config(info: CheckpointInfo, recipe: dict[str, Any], dtype: str) -> dict[str, Any]:
    """config.json of a saved qstar checkpoint: the base config as loaded, plus the qstar section."""
    raw = {k: v for k, v in info.raw_config.items() if k != "qstar"}
    raw["torch_dtype"] = dtype
    raw["dtype"] = dtype
    raw["qstar"] = {
        "format_version": FORMAT_VERSION,
        "start_token_id": int(info.start_id),
        "end_token_id": int(info.end_id),
        "recipe": recipe,
        "source": str(info.path),
    }
    return raw


def save_generation_files(info: CheckpointInfo, directory: Path) -> None:
    """What generation reads beside the weights: the tokenizer and generation_config.json."""
    if info.tokenizer is not None:
        info.tokenizer.save_pretrained(str(directory))
    if info.generation_config:
        (directory / GENERATION_CONFIG).write_text(json.dumps(info.generation_config, indent=2))
