"""A synthetic corpus of multi-step arithmetic whose answers need steps the text does not show.

A document is one problem: a starting value, a chain of operations, then the value of the last variable:

    a=7;b=a+5;c=b*2;c=24.

Only the starting value is written down, so predicting `24` needs `b=12` first: an intermediate result that a
thought can hold and a single forward pass of a tiny model cannot. The difficulty is the number of operations;
with one, the answer is a single visible step away, which is how a tiny model learns the one-step facts during
pretraining. All arithmetic is modulo 100 and `*` only takes 2..9, so every number has at most two digits and
every single step is a small table. A `+` or `-` sometimes takes an earlier variable instead of a constant, so a
hidden value may be needed again later.

Train and validation are disjoint by content, not only by seed: a problem belongs to one split by the hash of its
form with the variables renamed in order of appearance (`held_out`), so neither the same problem nor the same
computation under other names is ever in both. The two splits also draw from unrelated random streams
(`random.Random("train:<seed>")` and `random.Random("validation:<seed>")`).
"""

from __future__ import annotations

import json
import random
import string
import zlib
from collections.abc import Iterator
from pathlib import Path

LETTERS = string.ascii_lowercase
ALPHABET = string.digits + LETTERS + "=+-*;."
"""Every character a document can contain."""
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
VOCAB = (*SPECIAL_TOKENS, *ALPHABET, *sorted(set(string.printable) - set(ALPHABET) - set("\r\x0b\x0c")))
"""The character tokenizer's tokens in id order: <unk>=0, <s>=1 (bos), </s>=2 (eos), <pad>=3, then ALPHABET, then
the rest of printable ASCII (space, tab, newline, capitals, punctuation), so the shipped model can also read
ordinary English text such as GSM8K."""
MODULUS = 100
MAX_STEPS = len(LETTERS) - 1
DEFAULT_DIFFICULTY = (1, 4)
SPLITS = ("train", "validation")
VALIDATION_BUCKETS = 10
"""One problem form in VALIDATION_BUCKETS belongs to the validation split."""
VARIABLE_OPERAND = 0.25
"""Chance that a `+` or `-` takes an earlier variable (when one exists besides the previous one)."""
OPERATIONS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def steps_range(difficulty: int | tuple[int, int]) -> tuple[int, int]:
    """(fewest, most) operations per problem from an exact count or an inclusive range."""
    low, high = (difficulty, difficulty) if isinstance(difficulty, int) else difficulty
    if not 1 <= low <= high <= MAX_STEPS:
        raise ValueError(f"difficulty {difficulty!r}: the number of operations must lie in 1..{MAX_STEPS}, low <= high")
    return low, high


def held_out(document: str) -> bool:
    """Whether a problem belongs to the validation split, decided by its form with the variables renamed a, b, ..."""
    names = "".join(dict.fromkeys(c for c in document if c in LETTERS))
    canonical = document.translate(str.maketrans(names, LETTERS[: len(names)]))
    return zlib.crc32(canonical.encode()) % VALIDATION_BUCKETS == 0


def problem(rng: random.Random, steps: int) -> str:
    """One document: a starting value, `steps` operations on distinct variables, the last variable's value."""
    names = rng.sample(LETTERS, steps + 1)
    values = [rng.randrange(MODULUS)]
    parts = [f"{names[0]}={values[0]}"]
    for i in range(1, steps + 1):
        op = rng.choice("+-*")
        if op == "*":
            operand = str(rng.randint(2, 9))
            value = int(operand)
        elif i >= 2 and rng.random() < VARIABLE_OPERAND:
            j = rng.randrange(i - 1)
            operand, value = names[j], values[j]
        else:
            operand = str(rng.randint(1, MODULUS - 1))
            value = int(operand)
        values.append(OPERATIONS[op](values[-1], value) % MODULUS)
        parts.append(f"{names[i]}={names[i - 1]}{op}{operand}")
    parts.append(f"{names[-1]}={values[-1]}")
    return ";".join(parts) + "."


def documents(seed: int, difficulty: int | tuple[int, int] = DEFAULT_DIFFICULTY, split: str = "train") -> Iterator[str]:
    """An endless, seeded stream of problems of one split (see the module docstring for why they are disjoint)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    low, high = steps_range(difficulty)
    rng = random.Random(f"{split}:{seed}")
    wanted = split == "validation"

    def stream() -> Iterator[str]:
        while True:
            document = problem(rng, rng.randint(low, high))
            if held_out(document) == wanted:
                yield document

    return stream()


def generate_documents(
    count: int, seed: int, difficulty: int | tuple[int, int] = DEFAULT_DIFFICULTY, split: str = "train"
) -> list[str]:
    """The first `count` documents of `documents(seed, difficulty, split)`."""
    stream = documents(seed, difficulty, split)
    return [next(stream) for _ in range(count)]


def char_tokenizer_files(directory: str | Path) -> Path:
    """Write a character-level Hugging Face tokenizer over VOCAB; it prepends <s> and decodes back to the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()  # join characters as they are, without the default spaces
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", VOCAB.index("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    directory = Path(directory)
    fast.save_pretrained(str(directory))
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 writes its own name; 4.x knows this one
    config_file.write_text(json.dumps(config, indent=2))
    return directory
