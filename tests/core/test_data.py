"""Document sources and the block stream: every format, clear errors, determinism, exact resume."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from helpers import require, shared_file

from qstar.core import synthetic
from qstar.core.data import BlockStream, TokenCache, is_held_out, is_hub_spec, open_documents

CHARS = {c: i for i, c in enumerate(synthetic.VOCAB)}
EOS, PAD = 2, 3


def encode(text: str) -> list[int]:
    return [CHARS[c] for c in text]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nsecond line\n\n\n  \nsecond doc\r\n\nthird\n")
    assert list(open_documents(str(path))) == ["first line\nsecond line", "second doc", "third"]


def test_jsonl_reads_one_field_or_several(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "q": "1+1?", "a": "2"}, {"text": " ", "q": "x", "a": None}])
    assert list(open_documents(str(path))) == ["a"]  # blank texts are skipped
    assert list(open_documents(str(path), text_field="q, a")) == ["1+1?\n2", "x"]


def test_gsm8k_train_file_reads_as_question_and_answer():
    path = shared_file("data/gsm8k/train.jsonl")
    texts = list(open_documents(str(path), text_field="question,answer"))
    first = json.loads(path.open().readline())
    assert len(texts) == 7473 and texts[0] == first["question"] + "\n" + first["answer"]
    with pytest.raises(ValueError, match=r"no field 'text' \(fields: question, answer\)"):
        next(open_documents(str(path)))


def test_parquet(tmp_path):
    require("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["a1", "a2"]}), path)
    assert list(open_documents(str(path), text_field="question,answer")) == ["q1\na1", "q2\na2"]
    with pytest.raises(ValueError, match="no column 'text'"):
        open_documents(str(path))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(
        ImportError, match=r"reading \.parquet needs pyarrow, which is not installed: pip install 'qstar-lm\[data\]'"
    ):
        open_documents(str(tmp_path / "d.parquet"))


def test_synthetic_specs():
    assert list(islice(open_documents("synthetic", seed=7), 20)) == synthetic.generate_documents(20, seed=7)
    assert list(islice(open_documents("synthetic:3", seed=1), 5)) == synthetic.generate_documents(5, 1, 3)
    assert list(islice(open_documents("synthetic:2-4", part="validation"), 5)) == synthetic.generate_documents(
        5, 0, (2, 4), split="validation"
    )
    for bad in ("synthetic:x", "synthetic:4-2"):
        with pytest.raises(ValueError, match="functions"):
            open_documents(bad)


def fake_datasets(monkeypatch, load_dataset) -> None:
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hub_dataset_is_streamed(monkeypatch, online):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]

    fake_datasets(monkeypatch, load_dataset)
    assert list(open_documents("openai/gsm8k:main", text_field="question,answer")) == ["q1\na1", "q2\na2"]
    assert list(open_documents("owner/name", text_field="answer")) == ["a1", "a2"]
    assert calls == [("openai/gsm8k", "main", "train", True), ("owner/name", None, "train", True)]


def test_hub_dataset_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'qstar-lm\[data\]', or pass a local \.txt"):
        open_documents("openai/gsm8k")


def test_a_failing_hub_client_says_what_to_pass_instead(monkeypatch, online):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(RuntimeError, match=r"could not stream .*ConnectionError.*offline.*\.jsonl.*'synthetic'"):
        open_documents("openai/gsm8k:main")


def test_offline_with_the_real_datasets_package(monkeypatch):
    datasets = require("datasets")
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"\(HF_HUB_OFFLINE is set\): pass a local \.txt"):
        open_documents("qstar-tests/no-such-dataset")


def test_an_unreachable_hub_fails_at_once(monkeypatch):
    """One probe of the Hub's host, instead of the clients' half-minute of retries (simulated: no network here)."""
    import time

    import qstar.core.hub

    def unreachable(address, timeout):
        assert timeout <= 3
        raise OSError(101, "Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(qstar.core.hub.socket, "create_connection", unreachable)
    tic = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"huggingface\.co is unreachable: Network is unreachable\): pass a local"):
        open_documents("someone/corpus")
    assert time.perf_counter() - tic < 1


def test_bad_specs_say_what_to_pass(tmp_path):
    (tmp_path / "d.csv").write_text("text\nhello\n")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    (tmp_path / "list.jsonl").write_text('["text"]\n')
    expected = [
        (str(tmp_path / "missing.jsonl"), FileNotFoundError, "does not exist: pass a .txt"),
        ("data/missing.txt", FileNotFoundError, "does not exist"),
        ("no-such-thing", FileNotFoundError, "Hugging Face dataset id"),
        (str(tmp_path), ValueError, "is not a file"),
        (str(tmp_path / "d.csv"), ValueError, "unsupported file type '.csv'"),
    ]
    for spec, error, message in expected:
        with pytest.raises(error, match=message):
            open_documents(spec)
    reading = [
        ("blank.txt", "no usable text"),
        ("empty.jsonl", "no usable text"),
        ("bad.jsonl", ":2: not valid JSON"),
        ("list.jsonl", ":1: expected a JSON object"),
    ]
    for name, message in reading:
        with pytest.raises(ValueError, match=message):
            list(open_documents(str(tmp_path / name)))
    with pytest.raises(ValueError, match="unknown part"):
        open_documents("synthetic", part="test")
    with pytest.raises(ValueError, match="empty name"):
        open_documents(str(tmp_path / "bad.jsonl"), text_field="question,")


def test_train_and_validation_parts_split_one_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i}"} for i in range(2000)])
    everything = list(open_documents(str(path)))
    train = list(open_documents(str(path), part="train", held_out=0.1))
    validation = list(open_documents(str(path), part="validation", held_out=0.1))
    assert sorted(train + validation) == sorted(everything) and not set(train) & set(validation)
    assert 150 < len(validation) < 250 and all(is_held_out(t, 0.1) for t in validation)
    tiny = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "only one"}])
    part = "train" if is_held_out("only one", 0.1) else "validation"
    with pytest.raises(ValueError, match=f"no document of .* falls in the {part} part"):
        list(open_documents(str(tiny), part=part, held_out=0.1))


def rows(stream: BlockStream, count: int) -> list[tuple[list[int], int]]:
    """(ids, valid length) of the next `count` batches' rows."""
    out = []
    for _ in range(count):
        ids, mask = next(stream)
        assert ids.dtype == np.int64 and mask.dtype == bool
        assert ids.shape == mask.shape == (stream.batch_size, stream.seq_len)
        for row, valid in zip(ids, mask, strict=True):
            n = int(valid.sum())
            assert valid[:n].all() and (row[n:] == PAD).all()  # right-padded
            out.append((row.tolist(), n))
    return out


def stream_of(texts: list[str], seed: int = 0, batch_size: int = 2, seen: list[int] | None = None, **kwargs):
    def factory(epoch_seed: int) -> list[str]:
        if seen is not None:
            seen.append(epoch_seed)
        return texts

    return BlockStream(factory, encode, seq_len=8, batch_size=batch_size, seed=seed, eos_id=EOS, pad_id=PAD, **kwargs)


def test_short_documents_are_packed_and_the_epoch_end_padded():
    seeds: list[int] = []
    stream = stream_of(["ab", "cde", "f"], batch_size=1, seen=seeds)
    a, b, c, d, e, f = encode("abcdef")
    packed = [a, b, EOS, c, d, e, EOS, f]
    assert rows(stream, 3) == [(packed, 8), ([EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD], 1), (packed, 8)]
    assert len(seeds) == 2 and seeds[0] != seeds[1]  # a new epoch seed for the second pass


def test_long_documents_give_one_random_window():
    text = "0123456789abcdefghij"  # 20 tokens, seq_len 8
    stream = stream_of([text, "1234567z"], batch_size=2)
    starts = []
    for row, n in rows(stream, 30):
        assert n == 8
        decoded = "".join(synthetic.VOCAB[i] for i in row)
        if decoded != "1234567z":  # a document of exactly seq_len tokens is itself the window
            starts.append(text.index(decoded))
    assert len(starts) == 30 and len(set(starts)) > 5 and set(starts) <= set(range(13))
    assert rows(stream_of([text, "1234567z"]), 30) == rows(stream_of([text, "1234567z"]), 30)
    assert rows(stream_of([text]), 10) != rows(stream_of([text], seed=1), 10)


def test_sequence_length_check():
    with pytest.raises(ValueError, match=r"max-seq-length 8 is shorter than thought\+lookahead needs \(10\)"):
        stream_of(["a"], min_len=10)
    with pytest.raises(ValueError, match="batch_size"):
        stream_of(["a"], batch_size=0)


def mixed_texts() -> list[str]:
    """Short pieces to pack (up to 7 characters) and documents longer than seq_len 8."""
    pieces = "x=84 s=x+53 p=s*7 a=p-51 v=a+93 v=1. h=70 w=h+78 x=w*5 x=40. l=36 q=l*6 c=q-99 u=c*6 p=u+c p=19.".split()
    return pieces + ["0123456789" * (1 + i % 3) for i in range(4)]


def resumable(source: str, state: dict | None = None, batch_size: int = 3) -> BlockStream:
    if source == "synthetic":  # endless, seq_len 32: both packed and windowed rows
        return BlockStream(
            lambda s: open_documents("synthetic", seed=s), encode, 32, batch_size, 5, EOS, PAD, state=state
        )
    return stream_of(mixed_texts(), seed=5, batch_size=batch_size, shuffle_buffer=16, state=state)


@pytest.mark.parametrize("source", ["synthetic", "file-shuffled"])
def test_resume_yields_what_an_uninterrupted_run_would(source):
    stream = resumable(source)
    first = rows(stream, 5)
    state = json.loads(json.dumps(stream.state()))
    rest = rows(stream, 3)
    assert state["pending"]  # saved in the middle of packing
    assert first + rest == rows(resumable(source), 8)  # deterministic
    assert rows(resumable(source, state), 3) == rest
    resumed = resumable(source)
    resumed.restore(state)
    assert rows(resumed, 3) == rest
    assert rows(resumable(source, state, batch_size=1), 9) == rest  # rows do not depend on the batch size
    if source != "synthetic":
        assert (state["epoch"], stream.state()["epoch"]) == (0, 1)  # the resumed rows cross the end of an epoch


def test_restore_refuses_a_state_it_cannot_continue():
    stream = stream_of(mixed_texts(), seed=1)
    rows(stream, 4)
    state = stream.state()
    with pytest.raises(ValueError, match="saved with seed=1"):
        stream_of(mixed_texts(), seed=2, state=state)
    with pytest.raises(ValueError, match="fewer than the"):
        next(stream_of(mixed_texts()[:3], seed=1, state=state))


def test_a_source_without_tokens_is_an_error():
    stream = BlockStream(lambda s: ["abc"], lambda t: [], 8, 1, 0, EOS, PAD)
    with pytest.raises(ValueError, match="gave no tokens"):
        next(stream)


def test_token_cache_serves_re_reads_without_the_source(tmp_path):
    texts = [f"document {i} " * (i + 1) for i in range(6)]
    opened = []

    def source() -> Iterator[str]:
        opened.append(1)
        return iter(texts)

    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    cache = TokenCache(tmp_path / "cache")
    first = cache.documents(source, encode)
    assert [next(first) for _ in range(3)] == [encode(t) for t in texts[:3]]  # a run that stopped after 3
    first.close()
    assert len(TokenCache(tmp_path / "cache")) == 3
    assert list(TokenCache(tmp_path / "cache").documents(source, encode)) == [encode(t) for t in texts]
    assert len(opened) == 2
    with open(tmp_path / "cache" / "tokens.bin", "ab") as f:  # a kill mid-append: half a document, half an end
        f.write(b"\x01\x02\x03")
    with open(tmp_path / "cache" / "ends.bin", "ab") as f:
        f.write(b"\x05")
    again = TokenCache(tmp_path / "cache")
    assert list(again.documents(source, encode)) == [encode(t) for t in texts]
    assert len(opened) == 2  # read to its end once: later epochs never open the source


def test_only_hub_ids_are_cached(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}")
    assert is_hub_spec("open-web-math/open-web-math") and is_hub_spec("allenai/c4:en")
    assert not is_hub_spec("synthetic") and not is_hub_spec(str(tmp_path / "a.jsonl"))
    assert not is_hub_spec("missing/file.jsonl")
