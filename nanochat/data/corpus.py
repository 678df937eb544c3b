"""The on-disk format every corpus shares, and a base class for corpora stored in it.

A corpus is a directory with train/ and val/ subdirectories of parquet shards named
shard_00000.parquet, shard_00001.parquet, ...: one string column `text`, one document per row,
row groups of 1024 documents (FineWeb-Edu's layout). The row group is the unit of reading,
shuffling and distributing across ranks, so nothing ever loads a whole shard.

Every file is written under a temporary name in its final directory and renamed into place, so
a killed writer never leaves a truncated shard that a later run would take as valid.
"""

from __future__ import annotations

import abc
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.atomic import atomic_path
from nanochat.errors import UserError

SPLITS = ("train", "val")
SHARD_GLOB = "shard_*.parquet"
_SCHEMA = pa.schema([("text", pa.string())])


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def write_shards(
    documents: Iterable[str],
    out_dir: str | os.PathLike,
    docs_per_row_group: int = 1024,
    docs_per_shard: int = 64 * 1024,
) -> list[Path]:
    """Streams documents into out_dir/shard_*.parquet and returns the shard paths in order.

    Memory holds one row group at a time. out_dir ends up holding exactly these shards: stale
    shard files from an earlier, larger write are removed, so it never mixes two versions.
    """
    if docs_per_row_group < 1 or docs_per_shard < 1 or docs_per_shard % docs_per_row_group != 0:
        raise ValueError(
            f"docs_per_shard={docs_per_shard} must be a positive multiple of docs_per_row_group={docs_per_row_group}"
        )
    out_dir = Path(out_dir)
    row_groups = _chunks(documents, docs_per_row_group)
    pending = next(row_groups, None)
    shards: list[Path] = []
    while pending is not None:
        path = out_dir / shard_name(len(shards))
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, _SCHEMA, compression="zstd") as writer:
            for _ in range(docs_per_shard // docs_per_row_group):
                if pending is None:
                    break
                writer.write_table(pa.table({"text": pending}, schema=_SCHEMA), row_group_size=len(pending))
                pending = next(row_groups, None)
        shards.append(path)
    for stale in set(out_dir.glob(SHARD_GLOB)) - set(shards):
        stale.unlink()
    return shards


def text_parquet_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot serve as a text shard ("is not a readable parquet file (...)"), or None.

    Reads only the footer, so checking a directory of multi-GB shards is quick.
    """
    try:
        with pq.ParquetFile(path) as parquet:
            schema = parquet.schema_arrow
    except (OSError, pa.ArrowException) as e:
        return f"is not a readable parquet file ({str(e).strip()})".replace("\n", " ")
    index = schema.get_field_index("text")
    text_type = schema.field(index).type if index >= 0 else None
    if text_type is None or not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        return f"has no string column `text` (its columns: {', '.join(schema.names) or 'none'})"
    return None


class ParquetCorpus(abc.ABC):
    """A corpus stored as <data_dir>/{train,val}/shard_*.parquet; subclasses know how to make it."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir).expanduser()

    @abc.abstractmethod
    def prepare(self) -> None:
        """Makes sure the shards exist (download, convert, ...); cheap when they already do."""

    def split_dir(self, split: str) -> Path:
        if split not in SPLITS:
            raise UserError(f"Data split {split!r} is not one of {', '.join(SPLITS)}.")
        return self.data_dir / split

    def files(self, split: str) -> list[Path]:
        """The split's shards in name order."""
        directory = self.split_dir(split)
        found = sorted(directory.glob(SHARD_GLOB))
        if not found:
            raise UserError(f"No {SHARD_GLOB} files in {directory}; prepare the corpus first.")
        return found

    def compression_baselines(self) -> dict[str, float]:
        """Bits per byte of general-purpose compressors on the validation text, where known.

        Reference points printed next to a model's val bpb; most corpora have none precomputed.
        """
        return {}

    def iter_documents(self, split: str) -> Iterator[str]:
        """Every document of the split in file order, read one row group at a time."""
        for path in self.files(split):
            with pq.ParquetFile(path) as parquet:
                for index in range(parquet.num_row_groups):
                    yield from parquet.read_row_group(index, columns=["text"]).column("text").to_pylist()


def read_manifest(path: Path, format_version: int) -> dict | None:
    """A corpus's JSON manifest, or None when it is missing, unreadable or of another format
    (any of which means: prepare the shards again)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == format_version else None
