"""Rebuild weights/arith-llama: a tiny Llama pretrained on qstar's synthetic letter-function corpus.

    OMP_NUM_THREADS=1 python weights/build_default.py   # about 11 minutes at 1 thread (docs/TOY.md)

Pretraining reads the "pretrain" split of qstar/core/synthetic.py, half hidden documents (`6:dhb=0.`) and half
worked ones (`6:dhb=|950_|0.`), with nothing marking which is which: the model learns the function tables and to
write the intermediate values out, but a single forward pass cannot hold them for a hidden answer, which is where
a thought can help. Pretraining uses transformers' own LlamaForCausalLM (the reference implementation), then saves
a plain Hugging Face checkpoint with a character tokenizer; `qstar train` adds the thought tokens and the mixing
head on load.
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

from qstar.core import synthetic
from qstar.core.data import BlockStream
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


def build(
    out: Path,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int,
    report_every: int = 0,
    weight_decay: float = 0.1,
) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    config = LlamaConfig(vocab_size=len(VOCAB), bos_token_id=1, eos_token_id=2, pad_token_id=3, **SHAPE)
    model = LlamaForCausalLM(config)
    tokenizer_dir = char_tokenizer_files(out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream = BlockStream(
        lambda s: synthetic.documents(s, split="pretrain"),
        lambda text: tokenizer(text)["input_ids"],
        seq_len,
        batch_size,
        seed,
        2,
        3,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
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
        if report_every and (step + 1) % report_every == 0 and step + 1 < steps:
            report(model, tokenizer)
    print(f"pretraining took {time.time() - tic:.0f}s", flush=True)
    report(model, tokenizer)
    model.save_pretrained(out)
    raw = json.loads((out / "config.json").read_text())
    raw["rope_theta"] = SHAPE["rope_theta"]  # also at the top level, where mlx-lm reads it
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    (out / "generation_config.json").unlink(missing_ok=True)


@torch.no_grad()
def report(model: LlamaForCausalLM, tokenizer: Any, count: int = 200) -> None:
    """Held-out (validation split) quality per chain length: NLL of the answer of hidden documents, and greedy
    accuracy of the values of worked documents given the problem (teacher-forced, every value and the answer)."""
    model.eval()
    for steps in range(1, 5):
        hidden = synthetic.generate_documents(count, 99, steps, "validation", worked=0.0)
        worked = synthetic.generate_documents(count, 99, steps, "validation", worked=1.0)
        ids = torch.tensor([tokenizer(d)["input_ids"] for d in hidden])
        logp = model(ids).logits.log_softmax(-1)
        answer = 1 + synthetic.answer_index(hidden[0])
        nll = -logp[torch.arange(len(hidden)), answer - 1, ids[:, answer]].mean()
        bar = -logp[torch.arange(len(hidden)), answer - 1, tokenizer.convert_tokens_to_ids("|")].mean()
        ids = torch.tensor([tokenizer(d)["input_ids"] for d in worked])
        pred = model(ids).logits.argmax(-1)
        first = 1 + worked[0].index("|") + 1  # token index of the first written value
        span = slice(first, first + steps)
        value_acc = (pred[:, first - 1 : first - 1 + steps] == ids[:, span]).float().mean()
        answer = 1 + synthetic.answer_index(worked[0])
        answer_acc = (pred[:, answer - 1] == ids[:, answer]).float().mean()
        print(
            f"chain {steps}: hidden answer NLL {nll:.3f} (NLL of '|' there {bar:.3f}); worked values acc "
            f"{value_acc:.3f}, worked answer acc {answer_acc:.3f}",
            flush=True,
        )
    model.train()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "arith-llama")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--report-every", type=int, default=0, help="also print the held-out report every N steps")
    args = parser.parse_args()
    build(args.out, args.steps, args.batch_size, args.seq_len, args.lr, args.seed, args.report_every, args.weight_decay)
