"""Rebuild weights/arith-llama: a tiny Llama pretrained on qstar's synthetic multi-step arithmetic corpus.

    python weights/build_default.py            # about 4 minutes on 2 idle CPU cores

The model never sees the hidden intermediate values (see qstar/core/synthetic.py), so predicting the answer of a
multi-step problem is where a thought can help. Pretraining uses transformers' own LlamaForCausalLM (the reference
implementation), then saves a plain Hugging Face checkpoint with a character tokenizer; `qstar train` adds the
thought tokens and the mixing head on load.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qstar.core.data import BlockStream, open_documents
from qstar.core.synthetic import VOCAB, char_tokenizer_files

HERE = Path(__file__).resolve().parent
SHAPE: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def build(out: Path, steps: int, batch_size: int, seq_len: int, lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    config = LlamaConfig(vocab_size=len(VOCAB), bos_token_id=1, eos_token_id=2, pad_token_id=3, **SHAPE)
    model = LlamaForCausalLM(config)
    tokenizer_dir = char_tokenizer_files(out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream = BlockStream(
        lambda s: open_documents("synthetic", seed=s, part="train"),
        lambda text: tokenizer(text)["input_ids"],
        seq_len,
        batch_size,
        seed,
        2,
        3,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    tic = time.time()
    for step in range(steps):
        ids, mask = next(stream)
        x = torch.from_numpy(ids)
        labels = x.masked_fill(~torch.from_numpy(mask), -100)
        attention = None if mask.all() else torch.from_numpy(mask).long()
        loss = model(x, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - tic:.0f}s", flush=True)
    model.save_pretrained(out)
    raw = json.loads((out / "config.json").read_text())
    raw["rope_theta"] = SHAPE["rope_theta"]  # also at the top level, where mlx-lm reads it
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    (out / "generation_config.json").unlink(missing_ok=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "arith-llama")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.out, args.steps, args.batch_size, args.seq_len, args.lr, args.seed)
