"""GGUF checkpoints (llama.cpp's format) as a conversion source, through transformers' own GGUF loader.

transformers dequantizes a GGUF file into an ordinary float model (`from_pretrained(dir, gguf_file=...)`, which needs
the `gguf` package) but refuses to `save_pretrained` it, so qstar writes the Hugging Face directory itself: config.json
(without the quantization note), model.safetensors, the tokenizer and generation_config.json. `qstar convert` then
reads that directory as any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qstar.core.extras import require_extra


def gguf_to_hf(directory: Path, gguf_file: str, out: Path) -> Path:
    """Write the dequantized float32 model of directory/gguf_file as a Hugging Face checkpoint directory `out`."""
    for package in ("gguf", "accelerate"):  # transformers needs both; say so before it does, less clearly
        require_extra(package, "gguf", "reading GGUF")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # qstar convert shows its own status
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]  # also at the top level, where mlx-lm reads it
    tensors = model.state_dict()
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # the same memory as the embedding; safetensors stores it once
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    return out
