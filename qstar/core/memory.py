"""Peak memory of one training step per device, estimated term by term from the model's shape: what `qstar bench
--memory` prints and the README's table of what fits where (benchmarks/memory_table.py), checked against steps
measured on a CPU.

Shapes: B sequences per device, L tokens, R = B*P thought rows, S = L streams, n = k + A + 1 thought steps, D hidden,
F MLP width, H/h query/key-value heads of width d, V vocabulary, N decoder layers, b bytes per compute element.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from qstar.core.dtypes import DTYPE_BYTES
from qstar.core.lora import LoraConfig
from qstar.core.model_config import SHAPES, ModelConfig, is_linear, parse_config, shape_config, weight_shapes
from qstar.core.recipe import Recipe, make_recipe

FINE_TUNES = ("full", "lora", "qlora")
RECOMPUTED_ACTIVATIONS = {"mlx": 1.6}
"""What a backend's step with --grad-checkpoint keeps for backward against this model's activations, where it is not
1: MLX's recomputed step keeps 1.4-1.6x torch's, measured on a CPU (benchmarks/memory_table.py), about 1.0x without
checkpointing."""


@dataclass(frozen=True)
class QuantizedLayout:
    """How a backend stores a QLoRA base: bytes a quantized weight, and whether the embeddings are quantized too."""

    bytes_per_weight: Callable[[Step, int], float]
    embeddings: bool


QUANTIZED = {
    # MLX's affine quantization (mlx-lm): q_bits packed, a scale and a bias of the compute dtype a group; Linear and
    # Embedding layers.
    "mlx": QuantizedLayout(lambda s, b: s.q_bits / 8 + 2 * b / s.q_group_size, embeddings=True),
    # bitsandbytes' NF4 with double quantization: 4 bits, an 8-bit absmax a block of 64, a float32 one per 256 of
    # those; decoder Linear layers only (torch_backend/quantize.py).
    "torch": QuantizedLayout(lambda s, b: 0.5 + 1 / 64 + 4 / (64 * 256), embeddings=False),
}
LAYERS_GATHERED = 2
"""FSDP2 units a rank holds whole at once with resharding after each call: the running one and the prefetched."""
TABLE_MODELS = ("OpenELM-270M", "Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B", "Mistral-7B")
"""The named shapes (model_config.SHAPES) of the README's table."""
MODELS = {name: parse_config(shape_config(name)) for name in SHAPES}


@dataclass(frozen=True)
class Step:
    """What one training step runs: the shape of its batch and recipe, and how it trains."""

    batch: int = 1
    seq_len: int = 256
    recipe: Recipe = field(default_factory=lambda: make_recipe(thought_tokens=12))
    dtype: str = "bfloat16"
    fine_tune: str = "full"
    """full, lora, or qlora (LoRA on a quantized base)."""
    devices: int = 1
    """Processes of a torchrun run: full fine-tuning shards over them (FSDP2), adapters replicate (DDP)."""
    grad_checkpoint: bool = True
    step_mode: str = "two-pass"
    adapters: LoraConfig = field(default_factory=LoraConfig)
    """lora/qlora: the adapters (mlx-lm's defaults: rank 8 on the seven Linear layers of the last 16 layers)."""
    q_bits: int = 4
    q_group_size: int = 64
    backend: str = "torch"


@dataclass(frozen=True)
class Counts:
    """Parameters of a model, by where they sit: decoder layers (their Linear weights apart), everything else, and
    the Quiet-STaR extras."""

    layers: int
    linear: int
    largest_layer: int
    outer: int
    """Embeddings, the LM head unless tied, the final norm, the extras."""
    embeddings: int
    extras: int

    @property
    def total(self) -> int:
        return self.layers + self.outer


def counts(c: ModelConfig) -> Counts:
    """The model's parameter counts, from the weights its config implies (model_config.weight_shapes)."""
    shapes = weight_shapes(c)
    size = {name: math.prod(shape) for name, shape in shapes.items()}
    per_layer = [sum(v for k, v in size.items() if k.startswith(f"model.layers.{i}.")) for i in range(c.num_layers)]
    embeddings = size["model.embed_tokens.weight"] + size.get("lm_head.weight", 0)
    d = c.hidden_size
    extras = 2 * d * d + d + d * d + d + d + 2 * d  # the mixing head (2D -> D -> D -> 1) and <start>/<end>
    return Counts(
        layers=sum(per_layer),
        linear=sum(v for k, v in size.items() if is_linear(k)),
        largest_layer=max(per_layer),
        outer=sum(size.values()) - sum(per_layer) + extras,
        embeddings=embeddings,
        extras=extras,
    )


def lora_parameters(c: ModelConfig, adapters: LoraConfig) -> int:
    """The adapters' parameters: rank * (in + out) for each adapted Linear layer."""
    wrapped = set(adapters.targets(c.num_layers))
    return sum(
        adapters.rank * (shape[0] + shape[1])
        for name, shape in weight_shapes(c).items()
        if name.removesuffix(".weight") in wrapped
    )


def estimate(c: ModelConfig, step: Step) -> dict[str, float]:
    """Bytes per device of each term at the step's peak (the backward of the thought pass)."""
    if step.fine_tune not in FINE_TUNES:
        raise ValueError(f"fine-tune type must be one of {', '.join(FINE_TUNES)}, got {step.fine_tune!r}")
    b, n_dev, n = DTYPE_BYTES[step.dtype], step.devices, counts(c)
    half = b < 4
    terms: dict[str, float] = {}
    if step.fine_tune == "full":
        if n_dev > 1:  # FSDP2: float32 shards are the master weights; the root unit and two layers gathered
            terms["weights (gathered)"] = b * (n.outer + LAYERS_GATHERED * n.largest_layer)
            terms["master weights (float32 shards)"] = 4 * n.total / n_dev
            terms["gradients (float32 shards)"] = 4 * n.total / n_dev + 4 * n.largest_layer
        else:
            terms["weights"] = b * n.total
            if half:
                terms["master weights (float32)"] = 4 * n.total
            terms["gradients"] = b * n.total
        terms["AdamW moments (float32)"] = 8 * n.total / n_dev
        return with_master_gradients(terms | activations(c, step), n.total if half and n_dev == 1 else 0)
    trained = lora_parameters(c, step.adapters) + n.extras
    if step.fine_tune == "qlora":
        layout = QUANTIZED[step.backend]
        quantized = n.linear + (n.embeddings if layout.embeddings else 0)
        per_weight = layout.bytes_per_weight(step, b)
        terms["weights (quantized)"] = per_weight * quantized + b * (n.total - quantized - n.extras)
        terms["weights (quantized)"] += 4 * n.extras  # the mixing head and thought vectors stay float32
    else:
        terms["weights"] = b * n.total
    terms["adapters, mixing head, thought vectors"] = (4 if half else 0) * trained  # their float32 master copy
    terms["gradients"] = b * trained
    terms["AdamW moments (float32)"] = 8 * trained
    return with_master_gradients(terms | activations(c, step), trained if half else 0)


def with_master_gradients(terms: dict[str, float], parameters: int) -> dict[str, float]:
    """A half-precision step copies its gradients to float32 for the master weights after backward, freeing each
    half one as it goes and the activations already freed: the peak is the larger of the two moments."""
    if parameters == 0:
        return terms
    during = terms["gradients"] + sum(v for k, v in terms.items() if k.startswith("activations"))
    extra = max(4 * parameters - during, 0.0)
    return terms | {"float32 gradient copies, beyond backward's peak": extra} if extra else terms


def activations(c: ModelConfig, step: Step) -> dict[str, float]:
    """What the forward keeps for backward, and the backward's working set of one recomputed layer."""
    r, b = step.recipe, DTYPE_BYTES[step.dtype]
    k, A, P = r.thought_tokens, r.lookahead, r.thoughts_per_position
    B, L, N, V = step.batch, step.seq_len, c.num_layers, c.vocab_size
    D, F, H, kv = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads * c.head_dim
    R, n = B * P, k + A + 1
    thought, base = R * n * L, B * L  # tokens through the layers, with gradient
    # A layer's activations per token: its two norms' inputs and outputs, q and its rotation, attention output, o_proj
    # input and the residual (8 D), keys/values and their rotation (3 kv), the MLP's four F-wide tensors, and the
    # split attention's scores and probabilities over the base keys and own steps.
    per_token = 8 * D + 3 * kv + 4 * F + 2 * H * (L + n)
    kept = {
        "base keys/values": N * 2 * base * kv * b,
        "final hidden states": 2 * (thought + base) * D * b,
        "mixing head": R * A * L * 5 * D * b,
        # log-softmax outputs and, in backward, their gradients: thought tokens; lookahead and base in float32
        "logits": 2 * (R * k * L * b + R * A * L * 4 + base * 4) * V,
    }
    if step.step_mode == "one-pass":  # the sampling steps' own keys/values, one chunk a step
        kept["thought keys/values"] = N * 2 * R * k * L * kv * b
    if step.grad_checkpoint:
        kept["layer inputs (checkpoints)"] = N * (thought + base) * D * b
        kept["one layer recomputed"] = thought * per_token * b  # in backward, one layer at a time
    else:
        kept["layer activations"] = N * (thought + base) * per_token * b
    factor = RECOMPUTED_ACTIVATIONS.get(step.backend, 1.0) if step.grad_checkpoint else 1.0
    return {f"activations: {name}": factor * value for name, value in kept.items()}


CAPACITIES_GB = {"24 GB GPU": 20.0, "80 GB GPU": 80.0, "141 GB GPU": 141.0, "64 GB Mac": 48.0}
"""What a step may use of each device: of a 24 GB card, 20 GB (its CUDA context takes about 1 GB, the caching
allocator's fragmentation a few more: a LoRA step estimated at 21.4 GB does not fit one in practice); the large GPUs'
memory, where the same few GB are lost in the margin; of a 64 GB Mac, the 75% macOS lets its GPU wire by default
(sysctl iogpu.wired_limit_mb raises it)."""


def fitting(total_bytes: float, step: Step) -> list[str]:
    """The devices of CAPACITIES_GB a step of this peak fits (a Mac where MLX runs it: not sharded)."""
    sharded = step.devices > 1 and step.fine_tune == "full"
    return [n for n, gb in CAPACITIES_GB.items() if total_bytes <= gb * 1e9 and not (sharded and "Mac" in n)]
