"""A corpus from the user's own files: a folder (or one file) of .txt, .jsonl or .parquet.

- .txt: one document per file, UTF-8. .jsonl: one JSON object per line with a string "text".
  .parquet: a string column `text`, one document per row. Folders are searched recursively in
  path order; hidden files and folders (.git, .ipynb_checkpoints, ...) are skipped, and files with
  other extensions are skipped and counted.
- The files are converted once into the common shard layout under data_dir, streaming: memory
  holds one document or one row group at a time, never the corpus.
- Validation is data.val_path (same formats) when given, else a held-out fraction of documents,
  each one drawn with the seed; at least one document lands on each side.
- Row groups hold 1024 documents (FineWeb-Edu's) but are made smaller for small splits, so even a
  small validation split has MIN_ROW_GROUPS of them to share among ranks.
- manifest.json, written last, records the settings and every source file's size and mtime: a
  changed folder, changed settings or a killed conversion make the next prepare() convert again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.atomic import atomic_path
from nanochat.data.corpus import (
    SHARD_GLOB,
    SPLITS,
    ParquetCorpus,
    read_manifest,
    text_parquet_problem,
    write_shards,
)
from nanochat.errors import UserError
from nanochat.logs import log

SUFFIXES = (".txt", ".jsonl", ".parquet")
MANIFEST = "manifest.json"
_MANIFEST_FORMAT = 1

DOCS_PER_ROW_GROUP = 1024
MIN_ROW_GROUPS = 32  # more than a node has GPUs, as for the Shakespeare validation split
ROW_GROUPS_PER_SHARD = 64
_PROGRESS_EVERY_S = 10.0


def docs_per_row_group(num_docs: int) -> int:
    """1024, or fewer when that would leave a split of num_docs with under MIN_ROW_GROUPS groups."""
    return max(1, min(DOCS_PER_ROW_GROUP, num_docs // MIN_ROW_GROUPS))


class LocalCorpus(ParquetCorpus):
    """The documents under `path` (and `val_path`), converted into shards under data_dir."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        path: str | os.PathLike,
        val_path: str | os.PathLike | None = None,
        val_fraction: float = 0.05,
        seed: int = 0,
    ):
        super().__init__(data_dir)
        self.path = path
        self.val_path = val_path
        self.val_fraction = val_fraction
        self.seed = seed

    @property
    def manifest_path(self) -> Path:
        return self.data_dir / MANIFEST

    @property
    def settings(self) -> dict:
        """Everything besides the source files that the shards depend on."""
        return {
            "path": str(Path(self.path).expanduser().resolve()),
            "val_path": None if self.val_path is None else str(Path(self.val_path).expanduser().resolve()),
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "docs_per_row_group": DOCS_PER_ROW_GROUP,
            "min_row_groups": MIN_ROW_GROUPS,
            "row_groups_per_shard": ROW_GROUPS_PER_SHARD,
        }

    def prepare(self) -> None:
        self._check_settings()
        sources, skipped = self._find_sources()
        stats = {split: _file_stats(files) for split, files in sources.items()}
        manifest = self._read_manifest()
        if manifest is not None and self._matches(manifest, stats):
            return
        if manifest is not None and (self.data_dir / "tokenizer").is_dir():
            # Not deleted here: the tokenizer belongs to the user's runs, and a few added files
            # hardly change it; a different corpus in the same data_dir does.
            log.info(
                f"local: files or settings changed since the last conversion into {self.data_dir}; the tokenizers "
                f"in {self.data_dir / 'tokenizer'} were trained on the old contents (delete them to retrain)"
            )
        self._convert(sources, stats, skipped)

    def _check_settings(self) -> None:
        if self.path is None or str(self.path) == "":
            raise UserError("data.path is not set; point it at a folder of .txt, .jsonl or .parquet files.")
        if self.val_path is None:
            fraction = self.val_fraction
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
                raise UserError(f"data.val_fraction={fraction!r} must be a number strictly between 0 and 1.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"data.seed={self.seed!r} must be an integer.")

    def _find_sources(self) -> tuple[dict[str, list[Path]], int]:
        """{"train": files, "val": files} ("val" only with val_path) and the number of files skipped.

        data_dir and val_path are excluded from path, so either may sit inside it.
        """
        excluded = [self.data_dir]
        sources, skipped = {}, 0
        if self.val_path is not None:
            sources["val"], skipped = find_source_files(Path(self.val_path).expanduser(), "data.val_path", excluded)
            excluded.append(Path(self.val_path).expanduser())
        sources["train"], skipped_train = find_source_files(Path(self.path).expanduser(), "data.path", excluded)
        return sources, skipped + skipped_train

    def _read_manifest(self) -> dict | None:
        return read_manifest(self.manifest_path, _MANIFEST_FORMAT)

    def _matches(self, manifest: dict, stats: dict) -> bool:
        """True when the manifest's settings and sources are these and exactly its shards exist."""
        if manifest.get("settings") != self.settings or manifest.get("sources") != stats:
            return False
        for split in SPLITS:
            on_disk = {p.name: p.stat().st_size for p in self.split_dir(split).glob(SHARD_GLOB)}
            if on_disk != manifest.get("shards", {}).get(split):
                return False
        return True

    def _convert(self, sources: dict[str, list[Path]], stats: dict, skipped: int) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The manifest goes first and comes back last: it never vouches for half-written shards.
        self.manifest_path.unlink(missing_ok=True)
        # A killed conversion leaves its spool behind; one data_dir converts one corpus at a time.
        for stale in self.data_dir.glob(".convert-*"):
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=self.data_dir, prefix=".convert-") as tmp:
            spools = {split: _Spool(Path(tmp) / f"{split}.parquet") for split in SPLITS}
            progress = _Progress([f for files in sources.values() for f in files])
            try:
                if "val" in sources:
                    for split, files in sources.items():
                        _spool_all(files, spools[split], progress)
                else:
                    self._spool_held_out(sources["train"], spools, progress)
            finally:
                for spool in spools.values():
                    spool.close()
            for split, key, root in (("train", "data.path", self.path), ("val", "data.val_path", self.val_path)):
                if spools[split].count == 0:
                    raise UserError(f"{key}={root} holds no documents: every file in it is empty or blank.")
            shards = {}
            for split, spool in spools.items():
                per_group = docs_per_row_group(spool.count)
                shards[split] = write_shards(
                    spool.documents(), self.split_dir(split), per_group, per_group * ROW_GROUPS_PER_SHARD
                )
        manifest = {
            "format": _MANIFEST_FORMAT,
            "settings": self.settings,
            "sources": stats,
            "documents": {split: spool.count for split, spool in spools.items()},
            "bytes": {split: spool.nbytes for split, spool in spools.items()},
            "shards": {split: {p.name: p.stat().st_size for p in paths} for split, paths in shards.items()},
        }
        with atomic_path(self.manifest_path) as tmp_manifest:
            tmp_manifest.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        skipped_note = f" (skipped {skipped} with other extensions)" if skipped else ""
        log.info(
            f"local: converted {progress.total_files} files{skipped_note}: {spools['train'].count} train docs / "
            f"{spools['val'].count} val docs, {spools['train'].nbytes / 1e6:.2f} MB / "
            f"{spools['val'].nbytes / 1e6:.2f} MB -> {self.data_dir}"
        )

    def _spool_held_out(self, files: list[Path], spools: dict[str, _Spool], progress: _Progress) -> None:
        """Sends each document to val with probability val_fraction, the rest to train.

        The first document waits until the end and joins whichever side is still empty, so a
        small corpus still gets a validation document and a training document.
        """
        rng = random.Random(self.seed)
        first = None
        for file in files:
            for document in read_documents(file):
                if first is None:
                    first = document
                else:
                    spools["val" if rng.random() < self.val_fraction else "train"].add(document)
            progress.file_done(file)
        if first is None:
            return
        if spools["train"].count == 0 and spools["val"].count == 0:
            raise UserError(
                f"data.path={self.path} holds a single document, too few to hold out "
                f"data.val_fraction={self.val_fraction} of it for validation; add documents or set data.val_path."
            )
        spools["val" if spools["val"].count == 0 else "train"].add(first)


def find_source_files(root: Path, key: str, excluded: list[Path]) -> tuple[list[Path], int]:
    """The supported files under root (or root itself) in path order, and how many were skipped.

    Files with other extensions are skipped (a README next to the data is normal), as are hidden
    files and folders, and anything under the excluded directories (data_dir may sit inside root).
    """
    if not root.exists():
        raise UserError(f"{key}={root} does not exist.")
    if root.is_file():
        if root.suffix.lower() not in SUFFIXES:
            raise UserError(f"{key}={root} is not a {', '.join(SUFFIXES)} file.")
        return [root], 0
    excluded = [e.resolve() for e in excluded]
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            resolved = path.resolve()
            if not any(resolved == e or e in resolved.parents for e in excluded):
                found.append(path)
    supported = [p for p in found if p.suffix.lower() in SUFFIXES]
    if not supported:
        raise UserError(f"{key}={root} holds no {', '.join(SUFFIXES)} files (searched recursively).")
    return supported, len(found) - len(supported)


def _spool_all(files: list[Path], spool: _Spool, progress: _Progress) -> None:
    for file in files:
        for document in read_documents(file):
            spool.add(document)
        progress.file_done(file)


def _file_stats(files: list[Path]) -> dict[str, list[int]]:
    """{path: [size, mtime_ns]}: what says a source file changed, without reading it."""
    stats = {}
    for path in files:
        stat = path.stat()
        stats[str(path.resolve())] = [stat.st_size, stat.st_mtime_ns]
    return stats


def read_documents(path: Path) -> Iterator[str]:
    """The non-empty documents of one source file, streamed; UserError naming the file if it is bad."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from _txt_documents(path)
    elif suffix == ".jsonl":
        yield from _jsonl_documents(path)
    elif suffix == ".parquet":
        yield from _parquet_documents(path)


def _txt_documents(path: Path) -> Iterator[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert or remove it.") from None
    if "\x00" in text:
        raise UserError(f"{path} contains NUL bytes, so it is binary data, not text; remove it.")
    # Windows line endings would otherwise cost the tokenizer merges for "\r\n" variants of everything.
    text = text.replace("\r\n", "\n")
    if text.strip():
        yield text


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        line_number = 0
        try:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{path}, line {line_number}: not valid JSON ({e}).") from None
                if not isinstance(record, dict) or "text" not in record:
                    raise UserError(f'{path}, line {line_number}: no "text" field (expected {{"text": "..."}}).')
                text = record["text"]
                if not isinstance(text, str):
                    raise UserError(f'{path}, line {line_number}: "text" is {type(text).__name__}, not a string.')
                if text.strip():
                    yield text
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (after line {line_number}: {e.reason}).") from None


def _parquet_documents(path: Path) -> Iterator[str]:
    problem = text_parquet_problem(path)
    if problem:
        raise UserError(f"{path} {problem}.")
    with pq.ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(batch_size=DOCS_PER_ROW_GROUP, columns=["text"]):
            for text in batch.column(0).to_pylist():
                if text is not None and text.strip():
                    yield text


class _Spool:
    """A temporary parquet file that documents are appended to one by one, then read back in order.

    Counting first is what lets the row group size follow the size of each split.
    """

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self.nbytes = 0
        self._pending: list[str] = []
        self._writer = pq.ParquetWriter(path, pa.schema([("text", pa.string())]), compression="zstd")

    def add(self, document: str) -> None:
        self._pending.append(document)
        self.count += 1
        self.nbytes += len(document.encode("utf-8"))
        if len(self._pending) == DOCS_PER_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.table({"text": self._pending}))
            self._pending = []

    def close(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None

    def documents(self) -> Iterator[str]:
        with pq.ParquetFile(self.path) as parquet:
            for index in range(parquet.num_row_groups):
                yield from parquet.read_row_group(index).column("text").to_pylist()


class _Progress:
    """A line every few seconds while a large folder converts; silent for small ones."""

    def __init__(self, files: list[Path]):
        self.total_files = len(files)
        self.total_bytes = sum(f.stat().st_size for f in files)
        self.done_files = 0
        self.done_bytes = 0
        self._last = time.monotonic()

    def file_done(self, path: Path) -> None:
        self.done_files += 1
        self.done_bytes += path.stat().st_size
        if time.monotonic() - self._last > _PROGRESS_EVERY_S:
            self._last = time.monotonic()
            log.info(
                f"local: converted {self.done_files}/{self.total_files} files, "
                f"{self.done_bytes / 1e6:.0f}/{self.total_bytes / 1e6:.0f} MB"
            )
