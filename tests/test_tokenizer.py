"""Tokenizer: exact round trips, special tokens, per-token byte counts, persistence and caching."""

import json
import random

import pytest
import torch

from nanochat.errors import UserError
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, load_or_train

TOY_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "naïve café résumé über straße " * 30,
    "你好世界 你好 世界 " * 30,
    "numbers 12 345 6789 and 2024-01-01 " * 10,
]

TRICKY = [
    "",
    "hello world",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 🙂",
    "CJK 漢字かなカナ한국어",
    "combining e\u0301 a\u030a n\u0303 Z\u0351\u0358",
    "controls \x00\x01\x07\x1b[31m\t\r\n\x7f end",
    "text with <|bos|> and <|user_start|> inside",
    "RTL עברית العربية, zero width \u200b\u200d, BOM \ufeff",
    "   leading and trailing whitespace \n\n\n  ",
    "'s 'll 're n't 1234567890",
]


@pytest.fixture(scope="module")
def toy():
    return Tokenizer.train(iter(TOY_TEXT), 300)


def _random_text(rng: random.Random, n: int) -> str:
    chars = []
    while len(chars) < n:
        codepoint = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0, 0x3000), rng.randrange(0, 0x110000)])
        if not 0xD800 <= codepoint <= 0xDFFF:  # lone surrogates are not encodable text
            chars.append(chr(codepoint))
    return "".join(chars)


def test_round_trips_arbitrary_unicode(toy):
    rng = random.Random(0)
    for text in TRICKY + [_random_text(rng, rng.randrange(1, 200)) for _ in range(200)]:
        ids = toy.encode(text)
        assert toy.decode(ids) == text
        assert all(0 <= i < toy.vocab_size - len(SPECIAL_TOKENS) for i in ids)


def test_special_token_text_is_ordinary_text(toy):
    ids = toy.encode("<|bos|>")
    assert toy.bos_id not in ids and len(ids) > 1
    assert toy.decode(ids) == "<|bos|>"
    assert toy.encode_batch(["a <|bos|> b"])[0] == toy.encode("a <|bos|> b")


def test_special_tokens(toy):
    assert toy.vocab_size == 300
    ids = [toy.encode_special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(300 - len(SPECIAL_TOKENS), 300))
    assert toy.bos_id == toy.encode_special("<|bos|>") == ids[0]
    for name, i in zip(SPECIAL_TOKENS, ids):
        assert toy.decode([i]) == name
    assert toy.decode([toy.bos_id, *toy.encode("hi")]) == "<|bos|>hi"
    with pytest.raises(KeyError):
        toy.encode_special("<|endoftext|>")


def test_encode_batch(toy):
    batch = toy.encode_batch(TRICKY, prepend_bos=True, num_threads=2)
    assert batch == [[toy.bos_id, *toy.encode(t)] for t in TRICKY]
    assert toy.encode_batch(TRICKY) == [toy.encode(t) for t in TRICKY]


def test_token_bytes(toy):
    counts = toy.token_bytes()
    assert counts.dtype == torch.int32 and counts.shape == (toy.vocab_size,)
    specials = {toy.encode_special(name) for name in SPECIAL_TOKENS}
    for i in range(toy.vocab_size):
        expected = 0 if i in specials else len(toy.decode_bytes([i]))
        assert counts[i].item() == expected
    assert counts.max().item() > 3  # merges produced multi-byte tokens ("你好" is 6 bytes)
    # Summed over any encoding, the counts give the text's UTF-8 length: what bpb divides by.
    for text in TRICKY:
        assert counts[toy.encode_batch([text], prepend_bos=True)[0]].sum().item() == len(text.encode("utf-8"))


def test_save_load_identical(toy, tmp_path):
    path = tmp_path / "tok.json"
    toy.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint() == toy.fingerprint()
    assert loaded.vocab_size == toy.vocab_size and loaded.bos_id == toy.bos_id
    assert loaded.mergeable_ranks == toy.mergeable_ranks and loaded.pattern == toy.pattern
    for text in TRICKY:
        assert loaded.encode(text) == toy.encode(text)
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]  # no temporary file left behind
    json.loads(path.read_text())  # plain JSON data, nothing executable


def test_fingerprint_distinguishes_vocabularies(toy):
    other = Tokenizer.train(iter(TOY_TEXT), 301)
    assert other.fingerprint() != toy.fingerprint()
    assert Tokenizer.train(iter(TOY_TEXT), 300).fingerprint() == toy.fingerprint()


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        Tokenizer.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError):
        Tokenizer.load(bad)


class _Docs:
    """Stands in for a corpus: iter_documents("train") over fixed documents."""

    def __init__(self, docs):
        self.docs = docs

    def iter_documents(self, split):
        assert split == "train"
        return iter(self.docs)


CAPS = dict(max_chars=10**6, doc_cap=10**4)


def test_load_or_train_trains_once_then_reuses(tmp_path, monkeypatch, capsys):
    corpus = _Docs(TOY_TEXT)
    first = load_or_train(tmp_path / "tok", 300, corpus, **CAPS)
    assert (tmp_path / "tok" / "tokenizer_300.json").exists()
    assert "trained tokenizer" in capsys.readouterr().out

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the file exists")

    monkeypatch.setattr(Tokenizer, "train", no_training)
    second = load_or_train(tmp_path / "tok", 300, corpus, **CAPS)
    assert second.fingerprint() == first.fingerprint()
    assert capsys.readouterr().out == ""


def test_load_or_train_caps_documents(tmp_path, monkeypatch):
    seen = []

    def capture(texts, vocab_size):
        seen.extend(texts)
        raise RuntimeError("stop after capturing")

    monkeypatch.setattr(Tokenizer, "train", capture)
    with pytest.raises(RuntimeError):
        load_or_train(tmp_path, 300, _Docs(["a" * 50, "b" * 5, "c" * 50, "d" * 50]), max_chars=70, doc_cap=30)
    assert seen == ["a" * 30, "b" * 5, "c" * 30, "d" * 5]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("vocab_size", [0, 265, 100.5, "4096"])
def test_vocab_size_validated(tmp_path, vocab_size):
    with pytest.raises(UserError, match=f"^vocab_size={vocab_size} must be an integer above 265"):
        load_or_train(tmp_path, vocab_size, _Docs(TOY_TEXT), **CAPS)


def test_vocab_too_large_for_text():
    with pytest.raises(UserError, match="tokenizer.vocab_size=5000"):
        Tokenizer.train(iter(["tiny text"]), 5000)
