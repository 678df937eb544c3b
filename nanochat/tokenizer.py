"""GPT-4-style byte-level BPE: trained with rustbpe, encoded and decoded with tiktoken.

- The split pattern is GPT-4's with numbers split into runs of 1-2 digits (nanochat's choice; it
  spends fewer merges on numbers at small vocab sizes).
- vocab_size counts everything: 256 byte tokens, the learned merges, then the special tokens,
  which take the last ids. <|bos|> starts every document; the others are reserved for chat
  fine-tuning so that a pretrained model's vocabulary already has them.
- Ordinary text is always encoded as text: a document that contains the characters "<|bos|>"
  does not produce the BOS id. Special ids only come from encode_special / prepend_bos.
- On disk the tokenizer is plain JSON (split pattern, base64 token bytes -> rank, special tokens),
  never a pickle, so a tokenizer file from anywhere is safe to open.

Training normally happens on a run's first start (load_or_train). To retrain ahead of time, e.g.
nanochat's 65,536-token tokenizer on 2B characters, with the keys train.py uses:

    python -m nanochat.tokenizer data=fineweb_edu tokenizer.vocab_size=65536 tokenizer.max_chars=2000000000
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import rustbpe
import tiktoken
import torch

from nanochat.atomic import atomic_path
from nanochat.errors import InvalidArgument, UserError
from nanochat.logs import log

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]
BOS = "<|bos|>"

# A vocab_size must exceed this (the byte alphabet plus the specials) to leave room for a merge.
RESERVED_TOKENS = 256 + len(SPECIAL_TOKENS)

_FILE_FORMAT = "nanochat-hydra-tokenizer/1"


class Tokenizer:
    """A trained BPE vocabulary plus the special tokens, wrapping a tiktoken Encoding for speed."""

    def __init__(self, pattern: str, mergeable_ranks: dict[bytes, int]):
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        offset = len(mergeable_ranks)
        self.special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            name="nanochat-hydra",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.bos_id = self.special_tokens[BOS]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learns vocab_size - len(SPECIAL_TOKENS) byte-level BPE tokens from texts."""
        _check_vocab_size(vocab_size)
        n_ordinary = vocab_size - len(SPECIAL_TOKENS)
        bpe = rustbpe.Tokenizer()
        # rustbpe logs every percent of its merge loop at INFO; one summary line is printed instead.
        rustbpe_logger = logging.getLogger("rustbpe")
        previous_level = rustbpe_logger.level
        rustbpe_logger.setLevel(logging.WARNING)
        try:
            bpe.train_from_iterator(iter(texts), n_ordinary, pattern=SPLIT_PATTERN)
        finally:
            rustbpe_logger.setLevel(previous_level)
        ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        if len(ranks) < n_ordinary:
            # rustbpe stops early when no pair is left to merge; a smaller vocab than configured
            # would silently disagree with the model's embedding size.
            raise UserError(
                f"tokenizer.vocab_size={vocab_size} is too large for the training text: BPE ran out "
                f"of pairs to merge at {len(ranks) + len(SPECIAL_TOKENS)} tokens."
            )
        return cls(bpe.get_pattern(), ranks)

    @property
    def vocab_size(self) -> int:
        return len(self.mergeable_ranks) + len(self.special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], prepend_bos: bool = False, num_threads: int = 8) -> list[list[int]]:
        """Encodes many documents in parallel threads; optionally starts each with <|bos|>."""
        batch = self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)
        if prepend_bos:
            batch = [[self.bos_id, *ids] for ids in batch]
        return batch

    def decode(self, ids) -> str:
        """Text of a token sequence (list, tuple or 1-D tensor); invalid UTF-8 becomes U+FFFD."""
        return self.encoding.decode(_as_list(ids))

    def decode_bytes(self, ids) -> bytes:
        return self.encoding.decode_bytes(_as_list(ids))

    def encode_special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise KeyError(f"{name!r} is not a special token; known: {', '.join(SPECIAL_TOKENS)}")
        return self.special_tokens[name]

    def token_bytes(self) -> torch.Tensor:
        """int32 [vocab_size]: UTF-8 bytes each token decodes to (0 for special tokens).

        Bits per byte divides summed target losses by these counts, so specials (BOS) never add
        bytes; a token that is a fragment of a multi-byte character counts its own bytes.
        """
        counts = [0] * self.vocab_size
        for token, rank in self.mergeable_ranks.items():
            counts[rank] = len(token)
        return torch.tensor(counts, dtype=torch.int32)

    def fingerprint(self) -> str:
        """Short hash of everything that determines the encoding (pattern, merges, specials)."""
        data = self._to_dict()
        del data["format"]  # a new file format with the same vocabulary is the same tokenizer
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def _to_dict(self) -> dict:
        ranks = sorted(self.mergeable_ranks.items(), key=lambda item: item[1])
        return {
            "format": _FILE_FORMAT,
            "pattern": self.pattern,
            "mergeable_ranks": {base64.b64encode(token).decode("ascii"): rank for token, rank in ranks},
            "special_tokens": self.special_tokens,
        }

    def to_json(self) -> str:
        """The tokenizer as plain data (merge ranks and special tokens), never a pickle."""
        return json.dumps(self._to_dict())

    def save(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer as JSON, atomically: a killed process leaves no partial file."""
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["format"] != _FILE_FORMAT:
                raise ValueError(f"unknown format {data['format']!r}")
            ranks = {base64.b64decode(t, validate=True): rank for t, rank in data["mergeable_ranks"].items()}
            if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
                raise ValueError("mergeable ranks are not 0..n-1 with n >= 256")
            tokenizer = cls(data["pattern"], ranks)
            if tokenizer.special_tokens != data["special_tokens"]:
                raise ValueError("special tokens differ from this version's SPECIAL_TOKENS")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"Tokenizer file {path} is not a valid tokenizer ({e}); delete it to retrain.") from e
        return tokenizer


def _as_list(ids) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= RESERVED_TOKENS:
        raise InvalidArgument(
            f"{{vocab_size}} must be an integer above {RESERVED_TOKENS} "
            f"(256 byte tokens plus {len(SPECIAL_TOKENS)} special tokens).",
            vocab_size=vocab_size,
        )


def _check_caps(max_chars: int, doc_cap: int) -> None:
    for name, value in (("max_chars", max_chars), ("doc_cap", doc_cap)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InvalidArgument(f"{{{name}}} must be a positive integer.", **{name: value})


def _capped(documents: Iterable[str], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Crops each document to doc_cap characters and stops once max_chars have been yielded."""
    budget = max_chars
    for doc in documents:
        if budget <= 0:
            return
        doc = doc[: min(doc_cap, budget)]
        budget -= len(doc)
        yield doc


def tokenizer_path(directory: str | os.PathLike, vocab_size: int) -> Path:
    """Where a tokenizer of this size for this corpus lives: training finds it there."""
    return Path(directory) / f"tokenizer_{vocab_size}.json"


def train_and_save(directory: str | os.PathLike, vocab_size: int, corpus, max_chars: int, doc_cap: int) -> Tokenizer:
    """Trains on the corpus's train split and writes tokenizer_path(), replacing any file there.

    corpus must be prepared (any object with iter_documents("train")). Capping documents keeps a
    few huge documents from dominating the pair statistics.
    """
    _check_vocab_size(vocab_size)
    _check_caps(max_chars, doc_cap)
    path = tokenizer_path(directory, vocab_size)
    t0 = time.perf_counter()
    tokenizer = Tokenizer.train(_capped(corpus.iter_documents("train"), max_chars, doc_cap), vocab_size)
    tokenizer.save(path)
    log.info(f"trained tokenizer in {time.perf_counter() - t0:.1f}s: vocab_size={vocab_size} -> {path}")
    return tokenizer


def load_or_train(directory: str | os.PathLike, vocab_size: int, corpus, max_chars: int, doc_cap: int) -> Tokenizer:
    """Loads tokenizer_path(directory, vocab_size), or trains and saves it (see train_and_save)."""
    _check_vocab_size(vocab_size)
    path = tokenizer_path(directory, vocab_size)
    if path.exists():
        tokenizer = Tokenizer.load(path)
        if tokenizer.vocab_size != vocab_size:
            raise UserError(
                f"Tokenizer file {path} has vocab_size {tokenizer.vocab_size}, not {vocab_size}; delete it to retrain."
            )
        return tokenizer
    return train_and_save(directory, vocab_size, corpus, max_chars, doc_cap)


class TokenizerSpec:
    """The `tokenizer` config node: which tokenizer a run uses. Building it only checks the
    arguments; load_or_train(corpus) finds tokenizer_<vocab_size>.json under `directory`, or
    trains it there on the corpus's train split first (see train_and_save)."""

    def __init__(self, vocab_size: int, directory: str, max_chars: int, doc_cap: int):
        _check_vocab_size(vocab_size)
        _check_caps(max_chars, doc_cap)
        self.vocab_size = vocab_size
        self.directory = Path(directory).expanduser()
        self.max_chars = max_chars
        self.doc_cap = doc_cap

    def load_or_train(self, corpus) -> Tokenizer:
        return load_or_train(self.directory, self.vocab_size, corpus, self.max_chars, self.doc_cap)

    def train(self, corpus) -> Tokenizer:
        """Train afresh, replacing the file load_or_train would find."""
        return train_and_save(self.directory, self.vocab_size, corpus, self.max_chars, self.doc_cap)


def check_vocab_matches(tokenizer_vocab_size: int, model_vocab_size: int) -> None:
    """Refuse a model whose embedding rows do not correspond one to one with the tokenizer's ids."""
    if model_vocab_size != tokenizer_vocab_size:
        raise UserError(
            f"model.vocab_size={model_vocab_size} differs from tokenizer.vocab_size={tokenizer_vocab_size}; "
            "leave model.vocab_size at its default, which follows the tokenizer."
        )


def compression(tokenizer: Tokenizer, documents: Iterable[str], batch_size: int = 1024) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) of the documents, encoded as ordinary text without BOS or specials."""
    nbytes = ntokens = 0
    iterator = iter(documents)
    while batch := list(itertools.islice(iterator, batch_size)):
        nbytes += sum(len(text.encode("utf-8")) for text in batch)
        ntokens += sum(map(len, tokenizer.encode_batch(batch)))
    return nbytes, ntokens


# Validation text the command line measures compression on: enough for three significant digits,
# a few seconds of encoding even when the validation split is a whole 250M-character shard.
EVAL_CHARS = 10_000_000


def main(cfg) -> None:
    """python -m nanochat.tokenizer [overrides]: retrain the tokenizer that `python train.py` with
    the same overrides would use, overwrite its file, and print its compression on validation text."""
    from nanochat.assemble import check  # the command line composes Hydra configs; the library does not

    components = check(cfg)
    corpus = components.data
    corpus.prepare()
    tokenizer = components.tokenizer.train(corpus)
    nbytes, ntokens = compression(tokenizer, _capped(corpus.iter_documents("val"), EVAL_CHARS, EVAL_CHARS))
    print(
        f"compression on the validation split: {nbytes / ntokens:.3f} bytes per token "
        f"({nbytes:,} bytes, {ntokens:,} tokens)"
    )


if __name__ == "__main__":
    from nanochat.config import run_cli

    run_cli(main)
