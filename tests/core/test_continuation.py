"""A row's text as it grows (core.generate.Continuation): decoded token by token and searched for stop strings only
where one can complete, it ends and cuts exactly where decoding the whole text every token does, its streamed pieces
add up to its text, and a token's work stays bounded however long the row."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest
from helpers import char_tokenizer, require

from qstar.core.generate import MAX_PENDING_TOKENS, Continuation

tokenizers = require("tokenizers")
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

WORDS = ["the", "cat", "é", "naïve", "€5", "日本語", "🙂", "a\nb", "  ", "stop", "ab", "bc", "x"]


class WholeText:
    """The definition the bounded Continuation must keep: the whole text decoded every token, every prefix of every
    stop string tried against its end."""

    def __init__(self, decode: Callable[[list[int]], str], eos: int, stops: Sequence[str], budget: int) -> None:
        self.decode, self.eos, self.stops, self.budget = decode, eos, tuple(s for s in stops if s), budget
        self.tokens: list[int] = []
        self.stop = self.sent = ""

    def add(self, token: int) -> bool:
        self.tokens.append(token)
        if token == self.eos:
            self.stop = "eos"
        elif self.stops and any(s in self.decode(self.tokens) for s in self.stops):
            self.stop = "stop"
        elif len(self.tokens) == self.budget:
            self.stop = "max_tokens"
        return bool(self.stop)

    @property
    def text(self) -> str:
        text = self.decode(self.tokens)
        return text[: min((text.index(s) for s in self.stops if s in text), default=len(text))]

    def delta(self) -> str:
        text = self.text
        if not self.stop:
            text = text.rstrip("\ufffd")
            held = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[: len(text) - held]
        if not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2's scheme, a small vocabulary: characters outside ASCII split into byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["</s>"]
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama-2's scheme: ▁ for spaces, one leading space stripped from a decoded text, byte fallback (<0xE2>)."""
    letters = sorted(set("".join(WORDS).replace(" ", "") + "▁") - set("é€日本語🙂ï"))
    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    vocab |= {c: len(vocab) + i for i, c in enumerate(letters)}
    vocab |= {"▁t": len(vocab), "he": len(vocab) + 1}
    tok = Tokenizer(models.BPE(vocab, [("▁", "t"), ("h", "e")], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


TOKENIZERS = {"characters": char_tokenizer, "byte-level BPE": byte_level_bpe, "SentencePiece-like": sentencepiece_like}


def rows(tokenizer: PreTrainedTokenizerFast, count: int, seed: int) -> list[tuple[list[int], list[str]]]:
    """Token sequences of text a model could write (characters split across tokens included), an EOS between two
    words in some, each with up to four stop strings: pieces of its own text, so that most rows do stop, and some
    that never occur."""
    rng, out = random.Random(seed), []
    for _ in range(count):
        words = [rng.choice(WORDS) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words) + 1), tokenizer.eos_token)
        ids = [i for w in words for i in tokenizer(w, add_special_tokens=False)["input_ids"]]
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        stops = []
        for _ in range(rng.randint(0, 4)):
            if whole and rng.random() < 0.7:
                start = rng.randrange(len(whole))
                stops.append(whole[start : start + rng.randint(1, 5)])
            else:
                stops.append(rng.choice(["zz", "qq", "日本x"]))
        out.append((ids, stops))
    return out


def run(row: Continuation | WholeText, ids: list[int]) -> list[str]:
    """Feed the tokens until the row ends; the pieces handed out along the way."""
    pieces = []
    for token in ids:
        ended = row.add(token, [], None) if isinstance(row, Continuation) else row.add(token)
        pieces.append(row.delta())
        if ended:
            break
    return pieces


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_ends_and_cuts_as_decoding_the_whole_text_every_token(name):
    tokenizer = TOKENIZERS[name]()

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    for ids, stops in rows(tokenizer, 300, seed=len(name)):
        bounded = Continuation(decode, {tokenizer.eos_token_id}, stops, len(ids), False)
        whole = WholeText(decode, tokenizer.eos_token_id, stops, len(ids))
        pieces, reference = run(bounded, ids), run(whole, ids)
        case = (ids, stops)
        assert (bounded.stop, len(bounded.tokens), bounded.text) == (whole.stop, len(whole.tokens), whole.text), case
        assert "".join(pieces) == bounded.text == "".join(reference), case
        shown = ""
        for piece in pieces[:-1]:  # before the end nothing shown starts a stop string
            shown += piece
            assert not any(s in shown for s in bounded.stops), case


def test_several_eos_ids_each_end_the_row():
    tokenizer = char_tokenizer()
    ids = list(tokenizer("abcdef", add_special_tokens=False)["input_ids"])
    for eos in ([ids[2]], [ids[4], ids[2]], [99, ids[3]]):
        row = Continuation(tokenizer.decode, set(eos), [], 100, False)
        run(row, ids)
        assert row.stop == "eos" and len(row.tokens) == min(ids.index(e) for e in eos if e in ids) + 1


def test_a_tokens_work_is_bounded_by_the_longest_stop_string():
    """20,000 tokens against four stop strings of 256 characters that never occur: each token decodes a few tokens,
    never the whole text, and keeps at most 255 characters to search."""
    tokenizer, seen = char_tokenizer(), []

    def decode(ids: list[int]) -> str:
        seen.append(len(ids))
        return tokenizer.decode(ids)

    stops = ["ab" * 128, "ba" * 128, "x" * 256, "é" * 256]
    row = Continuation(decode, set(), stops, 20_000, False)
    rng = random.Random(0)
    letters = list(tokenizer("abc", add_special_tokens=False)["input_ids"])
    for _ in range(20_000):
        row.add(rng.choice(letters), [], None)
        row.delta()
    assert row.stop == "max_tokens" and max(seen) <= 2 * MAX_PENDING_TOKENS
    assert len(row.recent) == 255 and len("".join(row.unsent)) <= 255
    assert row.text == tokenizer.decode(row.tokens)


def test_bytes_that_never_make_a_character_are_taken_after_a_few_tokens():
    """A model that writes stray bytes: the text waits a few tokens for a character's rest, then takes the
    replacement characters, so the window stays bounded; the pieces still add up to the text."""
    tokenizer = sentencepiece_like()
    stray = tokenizer.convert_tokens_to_ids("<0x80>")
    ids = [stray] * 40 + list(tokenizer("the cat", add_special_tokens=False)["input_ids"])
    seen: list[int] = []

    def decode(ids: list[int]) -> str:
        seen.append(len(ids))
        return tokenizer.decode(ids, skip_special_tokens=True)

    row = Continuation(decode, set(), ["cat"], len(ids), False)
    pieces = run(row, ids)
    assert row.stop == "stop" and row.text == "\ufffd" * 40 + " the " and "".join(pieces) == row.text
    assert max(seen) <= 2 * MAX_PENDING_TOKENS


def test_a_row_ending_inside_a_character_keeps_the_characters_before_it():
    """Byte fallback decodes a run of byte tokens that does not end a character into replacement characters, the
    whole run: decoding the whole text would turn "日本" into six of them when the row ends inside 語. Decoded as it
    grows, the text keeps what it showed and adds one for the unfinished character."""
    tokenizer = sentencepiece_like()
    ids = list(tokenizer("日本語", add_special_tokens=False)["input_ids"])[:-1]  # 語's last byte never comes
    row = Continuation(lambda t: tokenizer.decode(t, skip_special_tokens=True), set(), [], len(ids), False)
    pieces = run(row, ids)
    assert row.stop == "max_tokens" and "".join(pieces) == row.text
    assert row.text.startswith("日本") and set(row.text[2:]) == {"\ufffd"}
