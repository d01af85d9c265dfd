"""Training text: open a document source, cut it into fixed-length token blocks, deterministically and resumably.

`open_documents(spec)` reads a local .txt (documents separated by blank lines), .jsonl or .parquet file,
`synthetic[:difficulty]` (qstar.core.synthetic), or streams a Hugging Face dataset `owner/name[:config]`.
`BlockStream` turns those documents into (batch_size, seq_len) batches the way the paper does.

Validation data never overlaps the training data:
- a separate source (e.g. GSM8K's test.jsonl) is the plainest way: open it with part="all";
- from one source, part="train" and part="validation" split it by a hash of each document's text (`is_held_out`,
  a fraction `held_out` of the documents), so the split is the same on every read, needs no document count, and
  identical duplicates always land on the same side;
- `synthetic` and `bridge` have their own disjoint splits by problem (qstar.core.synthetic, qstar.core.bridge);
  part="all" and "train" both give the training split there (`bridge:pretrain`: the split of the plain fine-tune,
  half its documents worked).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qstar.core import bridge, synthetic
from qstar.core.extras import require_extra
from qstar.core.hub import looks_like_hub_id, require_hub

FILE_TYPES = (".txt", ".jsonl", ".parquet")
DATA_SUFFIXES = (*FILE_TYPES, ".json", ".csv", ".tsv", ".arrow", ".gz", ".zst", ".bz2", ".xz")
"""Suffixes that mark a spec as a file name, never a hub id."""
PARTS = ("all", "train", "validation")
HELD_OUT = 0.01
WHAT_TO_PASS = (
    "pass a .txt (documents separated by blank lines), .jsonl or .parquet file, 'synthetic' (or 'synthetic:N', "
    "'synthetic:LOW-HIGH' functions per chain), 'bridge' (or 'bridge:pretrain'), or a Hugging Face dataset id "
    "(owner/name or owner/name:config)"
)
STATE_VERSION = 1


@dataclass
class Batch:
    """What a training or validation step reads: rows of token ids, which are real, and which are hard."""

    ids: np.ndarray
    """(B, L) int64."""
    mask: np.ndarray
    """(B, L) bool, right-padded."""
    hard: np.ndarray | None = None
    """(B, L) bool: the hard tokens (e.g. the answers of the synthetic corpus), when the data marks them."""


def is_held_out(text: str, fraction: float = HELD_OUT) -> bool:
    """Whether a document belongs to the validation part: a fixed hash of its text, so every read agrees."""
    return zlib.crc32(text.encode("utf-8")) % 10000 < round(fraction * 10000)


def open_documents(
    spec: str, text_field: str = "text", seed: int = 0, part: str = "all", held_out: float = HELD_OUT
) -> Iterator[str]:
    """The non-empty documents of a source, in its order (see the module docstring for `spec` and `part`).

    text_field names the field of a .jsonl/.parquet/hub record; "question,answer" joins several with a newline.
    seed only seeds `synthetic`, which is endless; everything else is read once, in order (BlockStream shuffles).
    The spec is checked here; what a file holds is checked while reading.
    """
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose one of {PARTS}")
    if not 0 <= held_out <= 1:
        raise ValueError(f"held_out must lie in [0, 1], got {held_out}")
    if is_synthetic(spec):
        split = "validation" if part == "validation" else "train"
        return synthetic.documents(seed, synthetic_difficulty(spec), split)
    if is_bridge(spec):
        return bridge.documents(seed, "validation" if part == "validation" else bridge_split(spec))
    fields = [f.strip() for f in text_field.split(",")]
    if not all(fields):
        raise ValueError(f"text_field {text_field!r} has an empty name: name a field, or several joined by commas")
    path = Path(spec).expanduser()
    if path.is_file():
        texts = file_texts(path, fields)
    elif path.exists():
        raise ValueError(f"{spec} is not a file: {WHAT_TO_PASS}")
    elif path.suffix.lower() in DATA_SUFFIXES or not looks_like_hub_id(spec.split(":")[0]):
        raise FileNotFoundError(f"{spec} does not exist: {WHAT_TO_PASS}")
    else:
        texts = hub_texts(spec, fields)
    return selected(texts, spec, part, held_out)


def is_synthetic(spec: str) -> bool:
    """Whether `spec` names the synthetic corpus (`synthetic`, `synthetic:N`, `synthetic:LOW-HIGH`)."""
    return spec == "synthetic" or spec.startswith("synthetic:")


def is_bridge(spec: str) -> bool:
    """Whether `spec` names the bridge world (`bridge`, `bridge:pretrain`)."""
    return spec == "bridge" or spec.startswith("bridge:")


def bridge_split(spec: str) -> str:
    """`bridge` -> the Quiet-STaR training split (hidden documents), `bridge:pretrain` -> the plain fine-tune's."""
    _, _, name = spec.partition(":")
    if name not in ("", "pretrain"):
        raise ValueError(f"{spec}: write bridge (Quiet-STaR's problems) or bridge:pretrain (the plain fine-tune's)")
    return name or "train"


def is_hub_spec(spec: str) -> bool:
    """Whether open_documents would stream `spec` from the Hugging Face Hub."""
    path = Path(spec).expanduser()
    return not (
        is_synthetic(spec) or is_bridge(spec) or path.exists() or path.suffix.lower() in DATA_SUFFIXES
    ) and looks_like_hub_id(spec.split(":")[0])


FINAL_ANSWER = re.compile(r"####\s*(\S[^\n]*?)\s*$", re.M)
"""GSM8K's final answer, after `####` at the end of its line (the worked solutions close with it)."""


def hard_mask(text: str) -> list[bool]:
    """Per character of any text: True for its hard tokens, the answers of the synthetic corpus's and the bridge
    world's documents and GSM8K's final answers (after `####`); all False for text without any."""
    mask = [a or b for a, b in zip(synthetic.hard_mask(text), bridge.hard_mask(text), strict=True)]
    for match in FINAL_ANSWER.finditer(text):
        mask[match.start(1) : match.end(1)] = [True] * (match.end(1) - match.start(1))
    return mask


def synthetic_difficulty(spec: str) -> tuple[int, int]:
    """`synthetic` -> the default range, `synthetic:3` -> (3, 3), `synthetic:1-4` -> (1, 4)."""
    _, _, text = spec.partition(":")
    if not text:
        return synthetic.DEFAULT_DIFFICULTY
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if match is None:
        raise ValueError(f"{spec}: write synthetic:N or synthetic:LOW-HIGH (functions per chain)")
    low = int(match[1])
    return synthetic.steps_range((low, int(match[2] or low)))


def selected(texts: Iterator[str], spec: str, part: str, held_out: float) -> Iterator[str]:
    """The non-blank texts of `part`; reading none at all is an error, so an empty source cannot spin forever."""
    count = usable = 0
    for text in texts:
        usable += bool(text.strip())
        if text.strip() and (part == "all" or is_held_out(text, held_out) == (part == "validation")):
            count += 1
            yield text
    if usable == 0:
        raise ValueError(f"{spec} has no usable text (no non-blank documents): {WHAT_TO_PASS}")
    if count == 0:
        raise ValueError(
            f"no document of {spec} falls in the {part} part ({held_out:.0%} of the documents are held out for "
            "validation): pass a larger source, or a separate validation file with --val-data"
        )


def file_texts(path: Path, fields: list[str]) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return txt_documents(path)
    if suffix == ".jsonl":
        return (record_text(record, fields, where) for record, where in object_records(path))
    if suffix == ".parquet":
        return parquet_texts(path, fields)
    raise ValueError(f"{path}: unsupported file type {suffix or '(none)'!r}: {WHAT_TO_PASS}")


class DataError(ValueError):
    """A data file or dataset that cannot be read as expected; the message names the file and line."""


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file; one clear error for anything else (a binary file, another encoding)."""
    with open(path, encoding="utf-8") as handle:
        try:
            yield from handle
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} cannot be decoded): pass a text file, "
                "or convert it to UTF-8"
            ) from None


def txt_documents(path: Path) -> Iterator[str]:
    lines: list[str] = []
    for line in text_lines(path):
        if line.strip():
            lines.append(line.rstrip("\r\n"))
        elif lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


def jsonl_records(path: Path) -> Iterator[tuple[Any, str]]:
    """(record, "file:line") for every non-blank line of a JSONL file."""
    if path.is_dir():
        raise DataError(f"{path} is a directory: pass a JSONL file (one JSON object a line)")
    for number, line in enumerate(text_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg}); expected one JSON object a line") from None
        yield record, f"{path}:{number}"


def object_records(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    for record, where in jsonl_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield record, where


def record_text(record: dict[str, Any], fields: list[str], where: str) -> str:
    """The named fields of one record joined by newlines (missing values count as empty)."""
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(
            f"{where} has no field {', '.join(map(repr, missing))} (fields: {', '.join(map(str, record))}): "
            "pass --text-field (text_field in Python) naming one of them, or several joined by commas"
        )
    return "\n".join(str(record[f]) for f in fields if record[f] is not None)


def parquet_texts(path: Path, fields: list[str]) -> Iterator[str]:
    pq = require_extra("pyarrow.parquet", "data", "reading .parquet")
    table = pq.ParquetFile(path)
    names = table.schema_arrow.names
    missing = [f for f in fields if f not in names]
    if missing:
        raise ValueError(
            f"{path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(names)}): "
            "pass --text-field (text_field in Python) naming one of them, or several joined by commas"
        )

    def texts() -> Iterator[str]:
        for batch in table.iter_batches(columns=fields):
            for record in batch.to_pylist():
                yield record_text(record, fields, str(path))

    return texts()


def hub_texts(spec: str, fields: list[str]) -> Iterator[str]:
    """Stream the train split of `owner/name[:config]` with the `datasets` package."""
    instead = "pass a local .txt, .jsonl or .parquet file, or 'synthetic'"
    datasets = require_extra("datasets", "data", f"streaming the Hugging Face dataset {spec}", instead)
    name, _, config = spec.partition(":")
    require_hub(f"stream the dataset {spec}", "pass a local .txt, .jsonl or .parquet file, or 'synthetic', instead")
    try:
        records = iter(datasets.load_dataset(name, config or None, split="train", streaming=True))
        first = next(records, None)
    except Exception as err:  # offline, unreachable, missing or gated: one message that says what to do
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        raise RuntimeError(
            f"could not stream the dataset {spec} from the Hugging Face Hub ({reason}); if you are offline, "
            "pass a local .txt, .jsonl or .parquet file, or 'synthetic', instead"
        ) from None

    def texts() -> Iterator[str]:
        if first is not None:
            yield record_text(first, fields, spec)
        for record in records:
            yield record_text(record, fields, spec)

    return texts()


def shuffled(items: Iterator[str], size: int, rng: np.random.Generator) -> Iterator[str]:
    """A streaming shuffle: each item waits in a buffer of `size` and leaves at a random time."""
    buffer: list[str] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


class BlockStream:
    """Endless (input_ids, attention_mask) batches of shape (batch_size, seq_len): int64 ids, right-padded bool mask.

    Each document is encoded once. As in the paper, one of seq_len tokens or more gives one window of seq_len
    tokens at a random start; shorter ones are packed back to back, each followed by eos_id, and cut into
    seq_len blocks (a document may continue in the next block). A finite source that runs out ends its epoch:
    what is left of the packing is padded with pad_id (mask False) into one last row, and the next epoch
    opens the source again with a new seed.

    documents_factory(epoch_seed) must give the same documents for the same seed: the stream's position is
    (epoch, documents taken, tokens waiting to be packed), the window starts and the shuffle are keyed by
    (seed, epoch, document), so `state()` is small and JSON-serialisable, and a stream restored from it
    (`state=` or `restore`) yields exactly the rows an uninterrupted one would, even with another batch size.
    Restoring re-reads, without encoding, the documents of the current epoch taken so far.
    """

    def __init__(
        self,
        documents_factory: Callable[[int], Iterable[Any]],
        encode: Callable[[Any], list[int]],
        seq_len: int,
        batch_size: int,
        seed: int,
        eos_id: int,
        pad_id: int,
        min_len: int = 1,
        shuffle_buffer: int = 0,
        state: dict[str, Any] | None = None,
        mark: Callable[[Any], list[bool]] | None = None,
    ) -> None:
        """min_len: the shortest seq_len the caller can use (Recipe.min_seq_len()); shuffle_buffer: documents held in
        a seeded streaming shuffle (0 keeps the source's order); mark: per token of encode(document), whether it is
        a hard token; then each batch is (ids, mask, hard) with hard (B, L) bool packed along with the ids (a marked
        stream is for held-out batches: a restored one forgets the marks of the tokens it was holding)."""
        if seq_len < min_len:
            raise ValueError(f"max-seq-length {seq_len} is shorter than thought+lookahead needs ({min_len})")
        checks = [
            (seq_len >= 1, "seq_len must be >= 1"),
            (batch_size >= 1, "batch_size must be >= 1"),
            (seed >= 0, "seed must be >= 0"),
            (shuffle_buffer >= 0, "shuffle_buffer must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.documents_factory = documents_factory
        self.encode = encode
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.shuffle_buffer = shuffle_buffer
        self.mark = mark
        self.pending_hard: list[bool] = []
        self.epoch = 0
        self.documents = 0
        self.pending: list[int] = []
        self.epoch_has_tokens = False
        self.source: Iterator[str] | None = None
        if state is not None:
            self.restore(state)

    def state(self) -> dict[str, Any]:
        """Where the stream stands after the last batch it yielded."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "shuffle_buffer": self.shuffle_buffer,
            "epoch": self.epoch,
            "documents": self.documents,
            "pending": list(self.pending),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()` of a stream over the same source with the same seed, seq_len and shuffle_buffer."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data state version {state.get('version')!r} is not {STATE_VERSION}: it cannot be resumed"
            )
        for key in ("seed", "seq_len", "shuffle_buffer"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"the data state was saved with {key}={state[key]}, this stream has {getattr(self, key)}"
                )
        self.epoch = int(state["epoch"])
        self.documents = int(state["documents"])
        self.pending = [int(t) for t in state["pending"]]
        self.pending_hard = [False] * len(self.pending)
        self.epoch_has_tokens = self.documents > 0
        self.source = None

    def __iter__(self) -> BlockStream:
        return self

    def __next__(self) -> tuple[np.ndarray, ...]:
        ids = np.full((self.batch_size, self.seq_len), self.pad_id, dtype=np.int64)
        mask = np.zeros((self.batch_size, self.seq_len), dtype=bool)
        hard = np.zeros((self.batch_size, self.seq_len), dtype=bool)
        for b in range(self.batch_size):
            row, flags = self.next_row()
            ids[b, : len(row)] = row
            mask[b, : len(row)] = True
            hard[b, : len(row)] = flags
        return (ids, mask) if self.mark is None else (ids, mask, hard)

    def next_row(self) -> tuple[list[int], list[bool]]:
        """seq_len tokens, or fewer for the last row of an epoch, and their hard-token flags."""
        while len(self.pending) < self.seq_len:
            text = self.next_document()
            if text is None:
                row, flags, self.pending, self.pending_hard = self.pending, self.pending_hard, [], []
                self.end_epoch()
                if row:
                    return row, flags
                continue
            tokens = [int(t) for t in self.encode(text)]
            marks = [bool(m) for m in self.mark(text)] if self.mark is not None else [False] * len(tokens)
            if len(marks) != len(tokens):
                raise ValueError(f"mark gave {len(marks)} flags for {len(tokens)} tokens: one per token")
            self.epoch_has_tokens = self.epoch_has_tokens or bool(tokens)
            if len(tokens) >= self.seq_len:
                rng = np.random.default_rng([self.seed, self.epoch, 0, self.documents])
                start = int(rng.integers(len(tokens) - self.seq_len + 1))
                return tokens[start : start + self.seq_len], marks[start : start + self.seq_len]
            if tokens:
                self.pending += [*tokens, self.eos_id]
                self.pending_hard += [*marks, False]
        row, self.pending = self.pending[: self.seq_len], self.pending[self.seq_len :]
        flags, self.pending_hard = self.pending_hard[: self.seq_len], self.pending_hard[self.seq_len :]
        return row, flags

    def next_document(self) -> str | None:
        """The epoch's next document (counted in self.documents), or None when the epoch is over."""
        if self.source is None:
            self.source = self.open_epoch()
        text = next(self.source, None)
        if text is not None:
            self.documents += 1
        return text

    def open_epoch(self) -> Iterator[str]:
        """The current epoch's documents, past the ones already taken."""
        epoch_seed = int(np.random.SeedSequence([self.seed, self.epoch, 2]).generate_state(1)[0])
        source = iter(self.documents_factory(epoch_seed))
        if self.shuffle_buffer:
            source = shuffled(source, self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, 1]))
        for _ in range(self.documents):
            if next(source, None) is None:
                raise ValueError(
                    f"the document source has fewer than the {self.documents} documents the data state says were "
                    f"taken in epoch {self.epoch}: resume with the same data, seed and shuffle buffer"
                )
        return source

    def end_epoch(self) -> None:
        if not self.epoch_has_tokens:
            raise ValueError(f"epoch {self.epoch} of the document source gave no tokens: check the data and encode")
        self.epoch += 1
        self.documents = 0
        self.epoch_has_tokens = False
        self.source = None


class TokenCache:
    """Tokenized documents of a streamed source on local disk, in stream order, so that re-reads (a resumed run,
    a new epoch) cost neither the network nor the tokenizer.

    tokens.bin holds the int32 ids of every document back to back and ends.bin each document's end offset (int64).
    A document counts once its end is written; a run killed mid-append leaves at most a tail that is cut on open.
    `complete` marks a source read to its end, so later epochs never open it again.
    One writer at a time: two runs streaming the same source should use different --out (and so caches).
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.tokens, self.ends, self.complete = directory / "tokens.bin", directory / "ends.bin", directory / "complete"
        for file in (self.tokens, self.ends):
            file.touch()
        with open(self.ends, "r+b") as handle:
            handle.truncate(self.ends.stat().st_size // 8 * 8)
        ends = np.fromfile(self.ends, dtype=np.int64)
        with open(self.tokens, "r+b") as handle:
            handle.truncate(int(ends[-1]) * 4 if len(ends) else 0)

    def __len__(self) -> int:
        return self.ends.stat().st_size // 8

    def documents(self, source: Callable[[], Iterator[str]], encode: Callable[[str], list[int]]) -> Iterator[list[int]]:
        """The cached documents, then the source's next ones (its first len(self) are skipped unread by the
        tokenizer), each encoded and appended as it is yielded."""
        ends = np.fromfile(self.ends, dtype=np.int64)
        tokens = np.memmap(self.tokens, dtype=np.int32, mode="r") if len(ends) else np.zeros(0, np.int32)
        start = 0
        for end in ends:
            yield tokens[start:end].tolist()
            start = int(end)
        if self.complete.exists():
            return
        rest = source()
        for _ in range(len(ends)):
            if next(rest, None) is None:
                return
        with open(self.tokens, "ab") as token_file, open(self.ends, "ab") as end_file:
            for text in rest:
                ids = encode(text)
                token_file.write(np.asarray(ids, np.int32).tobytes())
                token_file.flush()
                start += len(ids)
                end_file.write(np.int64(start).tobytes())
                end_file.flush()
                yield ids
        self.complete.touch()
