"""Peak memory of one training step per device, estimated term by term from the model's shape: what `qstar bench
--memory` prints and the README's table of what fits where (benchmarks/memory_table.py), checked against steps
measured on a CPU.

Shapes: B sequences per device, L tokens, R = B*P thought rows, S = L streams, n = k + A + 1 thought steps, D hidden,
F MLP width, H/h query/key-value heads of width d, V vocabulary, N decoder layers, b bytes per compute element.
"""

from __future__ import annotations

from dataclasses import dataclass

from qstar.core.hf_config import ModelConfig, parse_config

GIB = 2**30
FINE_TUNES = ("full", "lora", "qlora")
LORA_KEYS = 7
"""Linear layers a default LoRA adapts in each decoder layer (q, k, v, o, gate, up, down)."""
MLX_CHECKPOINT_FACTOR = 1.6
"""MLX's recomputed step keeps more for backward than torch's: measured 1.4-1.6x this model's activations on a CPU
(benchmarks/memory_table.py), about 1.0x without checkpointing."""
LAYERS_GATHERED = 2
"""FSDP2 units a rank holds whole at once with resharding after each call: the running one and the prefetched."""


MODELS = {
    name: parse_config(raw)
    for name, raw in {
        "Qwen2.5-0.5B": dict(
            model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
        ),
        "Qwen2.5-1.5B": dict(
            model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
        ),
        "Qwen2.5-7B": dict(
            model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
        ),
        "Mistral-7B": dict(
            model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
        ),
    }.items()
}  # fmt: skip
"""The published shapes (their config.json's fields) of the models the README's table covers."""


@dataclass(frozen=True)
class Step:
    """What one training step runs: the shape of its batch and recipe, and how it trains."""

    batch: int = 1
    seq_len: int = 256
    thought_tokens: int = 12
    lookahead: int = 4
    thoughts_per_position: int = 2
    dtype_bytes: int = 2
    fine_tune: str = "full"
    """full, lora, or qlora (LoRA on a quantized base, MLX)."""
    devices: int = 1
    """Processes of a torchrun run: full fine-tuning shards over them (FSDP2), adapters replicate (DDP)."""
    grad_checkpoint: bool = True
    step_mode: str = "two-pass"
    lora_rank: int = 8
    lora_layers: int = 16
    q_bits: int = 4
    q_group_size: int = 64
    backend: str = "torch"


def linear_parameters(c: ModelConfig) -> int:
    """The weights of a decoder layer's Linear layers (what quantization and LoRA touch)."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size


def layer_parameters(c: ModelConfig) -> int:
    """A decoder layer's: its Linear weights, q/k/v biases where the model has them, two norms."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return linear_parameters(c) + (q + 2 * kv if c.qkv_bias else 0) + 2 * c.hidden_size


def extra_parameters(c: ModelConfig) -> int:
    """Quiet-STaR's own: the mixing head (2D -> D -> D -> 1) and the <start>/<end> vectors; always trained."""
    d = c.hidden_size
    return 2 * d * d + d + d * d + d + d + 2 * d


def embedding_parameters(c: ModelConfig) -> int:
    """The input embeddings and the LM head unless tied."""
    return (1 if c.tie_word_embeddings else 2) * c.vocab_size * c.hidden_size


def outer_parameters(c: ModelConfig) -> int:
    """Everything outside the decoder layers: embeddings, the LM head unless tied, the final norm, the extras."""
    return embedding_parameters(c) + c.hidden_size + extra_parameters(c)


def lora_parameters(c: ModelConfig, step: Step) -> int:
    q, kv, d, i = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]  # (in, out) of each adapted Linear
    layers = c.num_layers if step.lora_layers < 0 else min(step.lora_layers, c.num_layers)
    return layers * step.lora_rank * sum(a + b for a, b in shapes[:LORA_KEYS])


def estimate(c: ModelConfig, step: Step) -> dict[str, float]:
    """Bytes per device of each term at the step's peak (the backward of the thought pass)."""
    if step.fine_tune not in FINE_TUNES:
        raise ValueError(f"fine-tune type must be one of {', '.join(FINE_TUNES)}, got {step.fine_tune!r}")
    b, n_dev = step.dtype_bytes, step.devices
    layers, outer = c.num_layers * layer_parameters(c), outer_parameters(c)
    total = layers + outer
    half = b < 4
    terms: dict[str, float] = {}
    if step.fine_tune == "full":
        trained = total
        if n_dev > 1:  # FSDP2: float32 shards are the master weights; the root unit and two layers gathered
            terms["weights (gathered)"] = b * (outer + LAYERS_GATHERED * layer_parameters(c))
            terms["master weights (float32 shards)"] = 4 * total / n_dev
            terms["gradients (float32 shards)"] = 4 * total / n_dev + 4 * layer_parameters(c)
        else:
            terms["weights"] = b * total
            if half:
                terms["master weights (float32)"] = 4 * total
            terms["gradients"] = b * total
        terms["AdamW moments (float32)"] = 8 * trained / n_dev
        return with_master_gradients(terms | activations(c, step), trained if half and n_dev == 1 else 0)
    trained = lora_parameters(c, step) + extra_parameters(c)
    if step.fine_tune == "qlora":
        per_weight = step.q_bits / 8 + 2 * b / step.q_group_size  # packed bits, a scale and a bias a group
        quantized = c.num_layers * linear_parameters(c) + embedding_parameters(c)
        terms["weights (quantized)"] = per_weight * quantized + b * (total - quantized - extra_parameters(c))
        terms["weights (quantized)"] += 4 * extra_parameters(c)  # the mixing head and thought vectors stay float32
    else:
        terms["weights"] = b * total
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
    b, k, A, P = step.dtype_bytes, step.thought_tokens, step.lookahead, step.thoughts_per_position
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
    factor = MLX_CHECKPOINT_FACTOR if step.backend == "mlx" and step.grad_checkpoint else 1.0
    return {f"activations: {name}": factor * value for name, value in kept.items()}


CAPACITIES_GB = {"80 GB GPU": 80.0, "141 GB GPU": 141.0, "64 GB Mac": 48.0}
"""What a step may use of each device: the GPUs' memory; of a 64 GB Mac, the 75% macOS lets its GPU wire by default
(sysctl iogpu.wired_limit_mb raises it)."""


def fitting(total_bytes: float, step: Step) -> list[str]:
    """The devices of CAPACITIES_GB a step of this peak fits (a Mac where MLX runs it: not sharded)."""
    sharded = step.devices > 1 and step.fine_tune == "full"
    return [n for n, gb in CAPACITIES_GB.items() if total_bytes <= gb * 1e9 and not (sharded and "Mac" in n)]
