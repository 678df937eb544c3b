"""Benchmark: tokens/s of the training loader (parquet read + tokenize + batch) in one process.

    python tests/benchmarks/loader_throughput.py [--megabytes 64] [--passes 5] [--threads 1 4]

Two loaders on the same shards: TokenLoader (one packed stream, what the trainer used before the
data order became world-size invariant) and LaneLoader as rank 0 of 8 at nanochat's d20 step of
256 rows (32 lanes of one row each, micro-batches of 32 rows: what each of 8 GPUs reads).

The target (issue 4): at least 10x what one GPU's trainer consumes at d20 on 8xH100 in nanochat's
reports (~80K tokens/s per GPU), i.e. >= 800K tokens/s per process.

No network: the text is generated, FineWeb-Edu-like in the ways that set a tokenizer's speed.
Words follow a Zipf law over ~200K types (real English function words at the top, pronounceable
made-up words in the tail), sentences of ~20 words with commas, numbers and capitals, paragraphs,
document lengths log-normal around FineWeb-Edu's few thousand characters. A 65,536-token BPE is
trained on the first ~30 MB, as nanochat's tokenizer is on its corpus; the text then encodes at
~4.2 bytes per token (nanochat's tokenizer on FineWeb-Edu: ~4.8), slightly more tokens per byte
than the real thing. Shards and tokenizer are cached in --cache-dir between runs.

Each pass builds a fresh loader (batch 32 x 2048, shuffled row groups, a different seed per pass)
and times --batches batches; the median pass is reported.
"""

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from nanochat.data.corpus import write_shards
from nanochat.data.loader import LaneLoader, TokenLoader
from nanochat.tokenizer import Tokenizer, load_or_train

# The most frequent English words, most frequent first.
FUNCTION_WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no what can more "
    "will other its into do also than them these only some time two may first then could any my like "
    "new such about our over most very after many up out where used made those through because each "
    "people how between well both while during however should number years different must under same "
    "being often world water system school students important example another without health life"
).split()
_ONSETS = "b bl br c ch cl cr d dr f fl fr g gl gr h j k l m n p pl pr qu r s sc sh sk sl sm sn sp st str t th tr v w y z".split()
_NUCLEI = "a e i o u ai ea ee ie oa oo ou".split()
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "nt", "st", "ng", "ck", "rd", "th", "ss", "ll"]
_SUFFIXES = ["", "", "", "", "s", "ed", "ing", "ly", "tion", "ment", "er", "al", "ity", "ness", "ive", "ous"]

BATCH_SIZE, SEQUENCE_LEN = 32, 2048
VOCAB_SIZE = 65_536


def make_vocabulary(seed: int, num_types: int) -> list[str]:
    """FUNCTION_WORDS, then distinct made-up words of one to four syllables, shorter ones first
    (frequent words are short, as in any language)."""
    rng = random.Random(seed)
    made_up = set()
    while len(made_up) < num_types - len(FUNCTION_WORDS):
        syllables = rng.choices([1, 2, 3, 4], weights=[35, 35, 20, 10])[0]
        stem = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(syllables))
        made_up.add(stem + rng.choice(_SUFFIXES))
    return [*FUNCTION_WORDS, *sorted(made_up, key=lambda word: (len(word), word))]


def english_like_documents(num_chars: int, seed: int, num_types: int = 200_000) -> Iterator[str]:
    """Documents of Zipf-distributed words until about num_chars characters have been produced."""
    rng = np.random.default_rng(seed)
    vocabulary = make_vocabulary(seed, num_types)
    capitalized = [word.capitalize() for word in vocabulary]
    ranks = np.arange(1, num_types + 1)
    probabilities = 1.0 / (ranks + 2.7) ** 1.07
    probabilities /= probabilities.sum()
    produced = 0
    while produced < num_chars:
        target = int(rng.lognormal(np.log(3000), 0.8)) + 200
        ids = rng.choice(num_types, size=target // 5 + 50, p=probabilities)
        numbers = iter(rng.integers(0, 2100, size=len(ids)).tolist())
        draws = iter(rng.random(size=len(ids)).tolist())
        paragraphs, sentence, paragraph, length = [], [], [], 0
        sentence_len = int(rng.integers(8, 32))
        for word_id in ids.tolist():
            draw = next(draws)
            if draw < 0.015:
                word = str(next(numbers))
            elif not sentence or draw > 0.96:  # sentence starts and proper nouns
                word = capitalized[word_id]
            else:
                word = vocabulary[word_id]
            if 0.5 < draw < 0.56:
                word += ","
            sentence.append(word)
            if len(sentence) >= sentence_len:
                end = "?" if draw < 0.03 else "."
                paragraph.append(" ".join(sentence) + end)
                length += sum(map(len, sentence)) + len(sentence)
                sentence, sentence_len = [], int(rng.integers(8, 32))
                if len(paragraph) >= 4 or draw > 0.8:
                    paragraphs.append(" ".join(paragraph))
                    paragraph = []
                if length >= target:
                    break
        if paragraph:
            paragraphs.append(" ".join(paragraph))
        document = "\n\n".join(paragraphs)
        produced += len(document)
        yield document


# Row groups of 32 documents: ~450 in 64 MB, more than the 256 lanes of a d20 step, each of which
# reads its own row groups (FineWeb-Edu's shards hold thousands).
DOCS_PER_ROW_GROUP = 32


def prepare(cache_dir: Path, megabytes: int, tokenizer_megabytes: int) -> tuple[list[Path], Tokenizer]:
    data_dir = cache_dir / f"english_like_{megabytes}mb_rg{DOCS_PER_ROW_GROUP}"
    if not data_dir.exists():
        print(f"generating {megabytes} MB of FineWeb-like text into {data_dir} ...", flush=True)
        # Written aside and renamed when complete, so an interrupted run is not taken for the data.
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir))
        write_shards(english_like_documents(megabytes * 10**6, seed=0), tmp / "train", DOCS_PER_ROW_GROUP, 8192)
        os.replace(tmp, data_dir)
    files = sorted((data_dir / "train").glob("shard_*.parquet"))

    class FirstDocuments:
        """The first tokenizer_megabytes of the shards, as a corpus for load_or_train."""

        def iter_documents(self, split):
            budget = tokenizer_megabytes * 10**6
            for path in files:
                for text in pq.read_table(path)["text"].to_pylist():
                    if budget <= 0:
                        return
                    budget -= len(text)
                    yield text

    print(f"tokenizer: vocab {VOCAB_SIZE:,} trained on {tokenizer_megabytes} MB (cached) ...", flush=True)
    tokenizer = load_or_train(
        data_dir / f"tokenizer_{tokenizer_megabytes}mb",
        VOCAB_SIZE,
        FirstDocuments(),
        max_chars=2 * 10**9,
        doc_cap=10_000,
    )
    return files, tokenizer


LANES, RANKS = 256, 8  # d20: 524,288 tokens per step / 2,048 = 256 rows, on 8 GPUs


def make_loader(kind: str, files: list[Path], tokenizer: Tokenizer, seed: int, threads: int):
    if kind == "TokenLoader":
        return TokenLoader(files, tokenizer, BATCH_SIZE, SEQUENCE_LEN, seed=seed, tokenizer_threads=threads)
    per_rank = LANES // RANKS
    return LaneLoader(files, tokenizer, LANES, range(per_rank), BATCH_SIZE, SEQUENCE_LEN, seed, tokenizer_threads=threads)


def time_pass(kind: str, files: list[Path], tokenizer: Tokenizer, seed: int, batches: int, threads: int) -> float:
    start = time.perf_counter()
    loader = make_loader(kind, files, tokenizer, seed, threads)
    for _ in range(batches):
        next(loader)
    return batches * BATCH_SIZE * SEQUENCE_LEN / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=64, help="text generated (cached)")
    parser.add_argument("--tokenizer-megabytes", type=int, default=30, help="text the 65,536-token BPE trains on")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--batches", type=int, default=100, help="batches of 32 x 2048 tokens per pass")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4], help="tokenizer threads to time")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "nanochat-loader-benchmark")
    args = parser.parse_args()

    files, tokenizer = prepare(args.cache_dir, args.megabytes, args.tokenizer_megabytes)
    sample = pq.read_table(files[0])["text"].to_pylist()[:1024]
    nbytes = sum(len(text.encode("utf-8")) for text in sample)
    print(f"text: {nbytes / sum(map(len, tokenizer.encode_batch(sample))):.2f} bytes per token")
    for threads in args.threads:
        rates = {"TokenLoader": [], "LaneLoader": []}
        for seed in range(args.passes):  # interleaved, so load on the machine hits both alike
            for kind in rates:
                rates[kind].append(time_pass(kind, files, tokenizer, seed, args.batches, threads))
        for kind, kind_rates in rates.items():
            print(
                f"{kind} {BATCH_SIZE}x{SEQUENCE_LEN}, tokenizer_threads={threads}: "
                f"{statistics.median(kind_rates) / 1e3:,.0f}K tokens/s per process (median of {args.passes} passes; "
                f"min {min(kind_rates) / 1e3:,.0f}K, max {max(kind_rates) / 1e3:,.0f}K)"
            )


if __name__ == "__main__":
    main()
