"""FineWeb-style test shards whose every row group tokenizes to exactly the same number of tokens.

Why: the loader strides (file, row group) pairs across ranks. With world_size W, rank r reads
pairs order[r], order[r + W], ... of the epoch's shuffled order, and that order depends only on
seed + epoch, never on W. A rank's token stream is BOS + document tokens for each document, back
to back; a batch takes the next B*T + 1 tokens (inputs [:-1], targets [1:]) and the stream
advances by B*T. So if every row group holds one document that encodes to exactly b*T - 1 tokens
(b*T with its BOS):

- one process with device_batch_size 2b reads the rows [order[0] | order[1]], [order[2] | order[3]], ...
- two processes with device_batch_size b read rank 0: order[0], order[2], ...; rank 1: order[1], order[3], ...

i.e. the same rows in every optimizer step, only split across ranks. The last target of each
b-row block is the next row group's BOS in both cases, and every BOS is the same id. Keep the
number of train row groups a multiple of the world size (for two ranks: even) if a run goes past
an epoch, and the validation row groups too: then the validation loader (shuffle=False,
loop=False) gives every rank, and the single process, the same number of batches (num_val / W - 1),
with the same rows.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.data.corpus import shard_name
from nanochat.tokenizer import tokenizer_path

# The token count is not monotone in the slice length (appending a character can re-merge the
# tail), so a bisection only finds where the count crosses the target; the ends around that point
# are then scanned one by one, from _SCAN_BACK characters before it until the count has exceeded the
# target at _OVERSHOOT_SLACK ends.
_SCAN_BACK = 16
_OVERSHOOT_SLACK = 8


def exact_token_document(tokenizer, source_text: str, start: int, num_tokens: int) -> tuple[str, int] | None:
    """(source_text[start:end], end) for an end at which the slice encodes to exactly num_tokens
    tokens, or None if no end near where the count crosses num_tokens gives it (or the text runs out)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens} must be positive")

    def count(end: int) -> int:
        return len(tokenizer.encode(source_text[start:end]))

    # Gallop to an end whose slice reaches the target, then bisect down to where the count crosses it.
    lo, hi = start, min(start + num_tokens, len(source_text))
    while count(hi) < num_tokens:
        if hi == len(source_text):
            return None
        lo, hi = hi, min(start + 2 * (hi - start), len(source_text))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < num_tokens else (lo, mid)
    over = 0
    for end in range(max(start + 1, hi - _SCAN_BACK), len(source_text) + 1):
        tokens = count(end)
        if tokens == num_tokens:
            return source_text[start:end], end
        over += tokens > num_tokens
        if over > _OVERSHOOT_SLACK:
            break
    return None


def exact_token_documents(tokenizer, source_text: str, num_tokens: int, count: int, seed: int = 0) -> list[str]:
    """count distinct, non-overlapping slices of source_text that each encode to exactly num_tokens tokens.

    Slices are taken one after another from an offset chosen by seed (wrapping around the text once),
    each a few characters after the previous one; an offset where no end gives the exact count is
    skipped. Raises ValueError if the text cannot supply that many.
    """
    rng = random.Random(seed)
    origin = rng.randrange(len(source_text)) if source_text else 0
    # Rotate the text so that the seed's offset comes first; the join keeps words from fusing.
    text = source_text[origin:] + "\n" + source_text[:origin]
    documents: list[str] = []
    position = 0
    while len(documents) < count:
        if position >= len(text):
            raise ValueError(
                f"source_text ({len(source_text):,} characters) yields only {len(documents)} of the {count} "
                f"non-overlapping slices of exactly {num_tokens} tokens that were asked for"
            )
        found = exact_token_document(tokenizer, text, position, num_tokens)
        if found is None:
            position += 1
            continue
        document, end = found
        documents.append(document)
        position = end + rng.randint(1, 16)
    return documents


def _write_shard(documents: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"text": pa.array(documents, type=pa.string())})
    pq.write_table(table, path, row_group_size=1)  # one document per row group


def publish_token_exact_shards(
    data_dir: Path,
    tokenizer,
    tokens_per_row_group: int,
    num_train: int,
    num_val: int,
    source_text: str,
    seed: int = 0,
    row_groups_per_train_shard: int = 1,
) -> list[str]:
    """Writes a data=fineweb_edu data_dir whose every row group is one document of exactly
    tokens_per_row_group tokens, BOS included (see the module docstring), and returns the train.py
    overrides that run on it.

    Layout: <data_dir>/train/shard_00000.parquet .. shard_<num_train - 1>.parquet, each with
    row_groups_per_train_shard one-document row groups; <data_dir>/val/shard_<num_train>.parquet with
    num_val one-document row groups; and the tokenizer at <data_dir>/tokenizer/tokenizer_<vocab>.json,
    where load_or_train finds it (tokenizer.directory is ${data.data_dir}/tokenizer), so training
    reuses it instead of training a new one. To compare W processes of device_batch_size b with one
    of W*b, pass tokens_per_row_group = b * model.sequence_len, and keep num_val and (if the run
    goes past an epoch) num_train * row_groups_per_train_shard multiples of W.
    """
    if tokens_per_row_group < 2:
        raise ValueError(f"tokens_per_row_group={tokens_per_row_group} must leave room for BOS and a token")
    if num_train < 1 or num_val < 1 or row_groups_per_train_shard < 1:
        raise ValueError(
            f"num_train={num_train}, num_val={num_val} and row_groups_per_train_shard={row_groups_per_train_shard} "
            "must be positive"
        )
    data_dir = Path(data_dir)
    num_train_docs = num_train * row_groups_per_train_shard
    documents = exact_token_documents(
        tokenizer, source_text, tokens_per_row_group - 1, num_train_docs + num_val, seed=seed
    )
    for index in range(num_train):
        shard = documents[index * row_groups_per_train_shard : (index + 1) * row_groups_per_train_shard]
        _write_shard(shard, data_dir / "train" / shard_name(index))
    _write_shard(documents[num_train_docs:], data_dir / "val" / shard_name(num_train))
    tokenizer.save(tokenizer_path(data_dir / "tokenizer", tokenizer.vocab_size))
    return [
        "data=fineweb_edu",
        f"data.data_dir={data_dir}",
        f"data.num_shards={num_train}",
        f"data.total_shards={num_train + 1}",
        f"data.val_shard={num_train}",
        f"tokenizer.vocab_size={tokenizer.vocab_size}",
    ]
