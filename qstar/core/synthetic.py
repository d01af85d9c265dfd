"""A synthetic corpus of chained letter functions whose answers need steps the text usually does not show.

The world: each letter of FUNCTIONS names a fixed random permutation of the ten digits (the same in every run,
drawn from a fixed seed). A problem is a starting digit and a chain of 1..MAX_STEPS letters, applied left to right;
a document states the problem and its answer. It comes in two forms, with nothing that tells them apart before
the answer:

    hidden:  6:dhb=0.          (d(6) = 9, h(9) = 5, b(5) = 0)
    worked:  6:dhb=|950_|0.    (the values written out in a field of MAX_STEPS characters, then the answer)

The answer of a hidden document of n >= 2 steps needs n - 1 intermediate values that a single forward pass of a
tiny model cannot hold, and that a thought can: a thought opens with <start>, initialised as `|`, so the model
continues it like a worked document. The field has a fixed width (values left-aligned, `_` after them) so that a
thought of MAX_STEPS tokens ends where the field does whatever the chain length, and <end> (also initialised as
`|`) is followed by the answer as in a worked document; with a field as wide as the chain, a fixed-length thought
runs past the closing bar of short chains and the pretrained model reads no answer after it. Pretraining
(weights/build_default.py) reads both forms, half and half, and learns the tables and the habit of writing the values
out; Quiet-STaR trains on hidden documents only.

Hard tokens: the answer digit (`answer_index`, the character before the closing `.`) is the only character of a
hidden document that thinking can help: the starting digit and the letters are uniform draws, the punctuation is
easy. `hard_mask` marks it (in any text holding documents), so a metric can score the answers apart from all
tokens: training's validation (nll_base_hard, nll_talk_hard), `qstar inspect` and benchmarks/toy_effect.py.

Splits: a problem (start digit + chain) belongs to exactly one of "pretrain", "train" (Quiet-STaR training) and
"validation", by a fixed hash of its text (`split_of`), whatever its form and the seed. So no problem that
validation scores was seen, hidden or worked, by pretraining or by Quiet-STaR training. The splits also draw from
unrelated random streams (`random.Random("<split>:<seed>")`).
"""

from __future__ import annotations

import json
import random
import re
import string
import zlib
from collections.abc import Iterator
from pathlib import Path

FUNCTIONS = string.ascii_lowercase
"""The letters that name functions."""
TABLES = {f: random.Random(f"qstar-letter-functions:{f}").sample(range(10), 10) for f in FUNCTIONS}
"""f -> the permutation of 0..9 it applies: f(x) = TABLES[f][x]."""
LETTERS = string.ascii_lowercase
ALPHABET = string.digits + LETTERS + ":=|_."
"""The tokenizer's first characters after the specials (documents use digits, FUNCTIONS and `:=|_.`)."""
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
VOCAB = (*SPECIAL_TOKENS, *ALPHABET, *sorted(set(string.printable) - set(ALPHABET) - set("\r\x0b\x0c")))
"""The character tokenizer's tokens in id order: <unk>=0, <s>=1 (bos), </s>=2 (eos), <pad>=3, then ALPHABET, then
the rest of printable ASCII (space, tab, newline, capitals, punctuation), so the shipped model can also read
ordinary English text such as GSM8K."""
MAX_STEPS = 4
"""Longest chain, and the width of a worked document's field (the thought length of the default recipe)."""
DEFAULT_DIFFICULTY = (1, 4)
SPLITS = ("pretrain", "train", "validation")
BUCKETS = {"validation": range(0, 1), "train": range(1, 3), "pretrain": range(3, 10)}
"""split -> the buckets of crc32(problem) % 10 it owns: 10% validation, 20% Quiet-STaR training, 70% pretraining."""
PRETRAIN_WORKED = 0.5
"""Share of worked documents in the pretraining split."""
DOCUMENT = re.compile(r"(\d):([a-z]+)=(?:\|(\d+)_*\|)?(\d)\.")


def steps_range(difficulty: int | tuple[int, int]) -> tuple[int, int]:
    """(fewest, most) functions per chain from an exact count or an inclusive range."""
    low, high = (difficulty, difficulty) if isinstance(difficulty, int) else difficulty
    if not 1 <= low <= high <= MAX_STEPS:
        raise ValueError(f"difficulty {difficulty!r}: the number of functions must lie in 1..{MAX_STEPS}, low <= high")
    return low, high


def values(start: int, chain: str) -> list[int]:
    """The value after each function of the chain; the last one is the answer."""
    out = []
    for f in chain:
        start = TABLES[f][start]
        out.append(start)
    return out


def parse(document: str) -> tuple[int, str, bool]:
    """(start digit, chain, worked?) of a document."""
    match = DOCUMENT.fullmatch(document)
    if match is None:
        raise ValueError(f"not a document of this corpus: {document!r}")
    return int(match[1]), match[2], match[3] is not None


def split_of(document: str) -> str:
    """The split a document's problem belongs to (the same for its hidden and worked forms)."""
    start, chain, _ = parse(document)
    bucket = zlib.crc32(f"{start}:{chain}".encode()) % 10
    return next(name for name, owned in BUCKETS.items() if bucket in owned)


def held_out(document: str) -> bool:
    """Whether a document's problem belongs to the validation split."""
    return split_of(document) == "validation"


def render(start: int, chain: str, worked: bool) -> str:
    trace = values(start, chain)
    middle = f"|{''.join(map(str, trace)).ljust(MAX_STEPS, '_')}|" if worked else ""
    return f"{start}:{chain}={middle}{trace[-1]}."


def answer_index(document: str) -> int:
    """Index of the answer character (the one before the closing `.`)."""
    parse(document)
    return len(document) - 2


def hard_mask(text: str) -> list[bool]:
    """Per character of any text: True for the hard tokens, the answer of every document of this corpus in it (a
    single document, or documents joined by any separator); all False for text without one."""
    mask = [False] * len(text)
    for match in DOCUMENT.finditer(text):
        mask[match.end() - 2] = True
    return mask


def intermediates(document: str) -> str:
    """The values a hidden document does not show before its answer, as digits (empty for one function)."""
    start, chain, _ = parse(document)
    return "".join(map(str, values(start, chain)[:-1]))


def problem(rng: random.Random, steps: int, worked: bool = False) -> str:
    """One document: a random start digit and a random chain of `steps` functions (letters may repeat)."""
    return render(rng.randrange(10), "".join(rng.choice(FUNCTIONS) for _ in range(steps)), worked)


def documents(
    seed: int,
    difficulty: int | tuple[int, int] = DEFAULT_DIFFICULTY,
    split: str = "train",
    worked: float | None = None,
) -> Iterator[str]:
    """An endless, seeded stream of documents of one split, chain lengths uniform in `difficulty`. `worked` is the
    share of worked documents (default: PRETRAIN_WORKED for "pretrain", 0 otherwise)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    low, high = steps_range(difficulty)
    share = (PRETRAIN_WORKED if split == "pretrain" else 0.0) if worked is None else worked
    rng = random.Random(f"{split}:{seed}")

    def stream() -> Iterator[str]:
        while True:
            steps = rng.randint(low, high)
            document = problem(rng, steps, rng.random() < share)
            if split_of(document) == split:
                yield document

    return stream()


def generate_documents(
    count: int,
    seed: int,
    difficulty: int | tuple[int, int] = DEFAULT_DIFFICULTY,
    split: str = "train",
    worked: float | None = None,
) -> list[str]:
    """The first `count` documents of `documents(seed, difficulty, split, worked)`."""
    stream = documents(seed, difficulty, split, worked)
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
