"""LocalCorpus: every supported format, both ways of getting validation text, re-conversion when the
folder changes, and one sentence naming the file for every kind of bad input."""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.data.loader import TokenLoader
from nanochat.data.local import MIN_ROW_GROUPS, LocalCorpus, docs_per_row_group
from nanochat.errors import UserError


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_parquet(path: Path, columns: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=2)


def write_txt_folder(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    docs = [f"document number {i}: " + "words and more words " * (i % 7 + 1) for i in range(count)]
    for i, doc in enumerate(docs):
        (folder / f"{i:04d}.txt").write_text(doc, encoding="utf-8")
    return docs


def documents(corpus: LocalCorpus) -> dict[str, list[str]]:
    return {split: list(corpus.iter_documents(split)) for split in ("train", "val")}


def all_documents(corpus: LocalCorpus) -> list[str]:
    return [doc for split in ("train", "val") for doc in corpus.iter_documents(split)]


def prepare_error(tmp_path: Path, path, **kwargs) -> str:
    with pytest.raises(UserError) as error:
        LocalCorpus(tmp_path / "data", path, **kwargs).prepare()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_reads_txt_jsonl_and_parquet_recursively(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes("\ufeffline one\r\nline two\r\n".encode())
    write_jsonl(src / "nested" / "b.jsonl", [{"text": "json one", "id": 1}, {"text": "json two"}])
    with open(src / "nested" / "b.jsonl", "a") as f:
        f.write("\n")  # a trailing blank line is not a record
    write_parquet(src / "nested" / "deeper" / "c.parquet", {"text": ["pq one", None, "pq two", " "], "n": [1, 2, 3, 4]})
    (src / "README.md").write_text("not data")
    (src / ".git").mkdir()
    (src / ".git" / "notes.txt").write_text("hidden, not data")
    (src / "empty.txt").write_text("\n\n")
    val = tmp_path / "val"
    write_jsonl(val / "v.jsonl", [{"text": "held out"}])

    corpus = LocalCorpus(tmp_path / "data", src, val_path=val)
    corpus.prepare()
    docs = documents(corpus)
    assert docs["train"] == ["line one\nline two\n", "json one", "json two", "pq one", "pq two"]
    assert docs["val"] == ["held out"]
    assert corpus.compression_baselines() == {}


def test_a_single_file_is_a_corpus(tmp_path):
    write_jsonl(tmp_path / "all.jsonl", [{"text": f"record {i}"} for i in range(10)])
    corpus = LocalCorpus(tmp_path / "data", tmp_path / "all.jsonl", val_fraction=0.3)
    corpus.prepare()
    docs = documents(corpus)
    assert sorted(docs["train"] + docs["val"]) == sorted(f"record {i}" for i in range(10))


def test_held_out_fraction_is_a_seeded_disjoint_split(tmp_path):
    all_docs = write_txt_folder(tmp_path / "src", 400)
    splits = {}
    for seed in (0, 0, 1):
        data_dir = tmp_path / f"data{len(splits)}"
        corpus = LocalCorpus(data_dir, tmp_path / "src", val_fraction=0.2, seed=seed)
        corpus.prepare()
        splits[len(splits)] = documents(corpus)
    first, again, other = splits.values()
    assert sorted(first["train"] + first["val"]) == sorted(all_docs)
    assert not set(first["train"]) & set(first["val"])
    assert 50 <= len(first["val"]) <= 110  # ~80 expected
    assert first == again
    assert set(other["val"]) != set(first["val"])


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_two_documents_always_give_one_train_and_one_val(tmp_path, fraction):
    docs = write_txt_folder(tmp_path / "src", 2)
    corpus = LocalCorpus(tmp_path / "data", tmp_path / "src", val_fraction=fraction)
    corpus.prepare()
    split = documents(corpus)
    assert len(split["train"]) == len(split["val"]) == 1
    assert sorted(split["train"] + split["val"]) == sorted(docs)


def test_small_splits_get_enough_row_groups_for_the_ranks(tmp_path):
    write_txt_folder(tmp_path / "src", 300)
    corpus = LocalCorpus(tmp_path / "data", tmp_path / "src", val_fraction=0.1)
    corpus.prepare()
    for split in ("train", "val"):
        count = len(list(corpus.iter_documents(split)))
        groups = sum(pq.ParquetFile(f).num_row_groups for f in corpus.files(split))
        assert groups >= min(count, MIN_ROW_GROUPS)
    assert docs_per_row_group(10) == 1 and docs_per_row_group(10**7) == 1024


def test_the_loader_reads_a_converted_corpus(tmp_path, shakespeare_tokenizer):
    write_txt_folder(tmp_path / "src", 50)
    corpus = LocalCorpus(tmp_path / "data", tmp_path / "src")
    corpus.prepare()
    inputs, targets = next(TokenLoader(corpus.files("train"), shakespeare_tokenizer, 2, 16))
    assert inputs.shape == targets.shape == (2, 16)


def test_prepare_is_a_no_op_until_the_folder_changes(tmp_path, capsys):
    src = tmp_path / "src"
    write_txt_folder(src, 20)
    corpus = LocalCorpus(tmp_path / "data", src, val_fraction=0.2)
    corpus.prepare()
    assert "local: converted 20 files" in capsys.readouterr().out
    shard = corpus.files("train")[0]
    before = shard.stat().st_mtime_ns

    corpus.prepare()
    assert capsys.readouterr().out == "" and shard.stat().st_mtime_ns == before

    (src / "new.txt").write_text("a brand new document")
    corpus.prepare()
    assert "local: converted 21 files" in capsys.readouterr().out
    assert "a brand new document" in all_documents(corpus)

    os.utime(src / "0000.txt", ns=(0, 0))
    (src / "0000.txt").write_text("edited in place")
    os.utime(src / "0000.txt", ns=(1, 1))  # a new mtime even on a coarse-grained filesystem
    corpus.prepare()
    assert "edited in place" in all_documents(corpus)

    (src / "new.txt").unlink()
    corpus.prepare()
    assert "a brand new document" not in all_documents(corpus)


def test_changed_settings_reconvert(tmp_path, capsys):
    write_txt_folder(tmp_path / "src", 40)
    LocalCorpus(tmp_path / "data", tmp_path / "src", seed=0).prepare()
    capsys.readouterr()
    corpus = LocalCorpus(tmp_path / "data", tmp_path / "src", seed=1)
    corpus.prepare()
    assert "local: converted" in capsys.readouterr().out
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["settings"]["seed"] == 1


def test_a_killed_conversion_is_redone(tmp_path, capsys):
    write_txt_folder(tmp_path / "src", 10)
    corpus = LocalCorpus(tmp_path / "data", tmp_path / "src")
    corpus.prepare()
    corpus.files("train")[0].write_bytes(b"half a shard")  # no manifest update: as if killed mid-write
    capsys.readouterr()
    corpus.prepare()
    assert "local: converted" in capsys.readouterr().out
    assert len(all_documents(corpus)) == 10


def test_data_dir_and_val_path_inside_the_folder_are_not_training_data(tmp_path):
    src = tmp_path / "src"
    train_docs = write_txt_folder(src, 10)
    write_jsonl(src / "val" / "v.jsonl", [{"text": "validation only"}])
    corpus = LocalCorpus(src / "converted", src, val_path=src / "val")
    corpus.prepare()
    (src / "another.txt").write_text("one more")  # forces a second conversion, now with shards inside src
    corpus.prepare()
    docs = documents(corpus)
    assert sorted(docs["train"]) == sorted(train_docs + ["one more"])
    assert docs["val"] == ["validation only"]


def test_missing_path(tmp_path):
    assert prepare_error(tmp_path, tmp_path / "nope") == f"data.path={tmp_path / 'nope'} does not exist."


def test_missing_val_path(tmp_path):
    write_txt_folder(tmp_path / "src", 3)
    message = prepare_error(tmp_path, tmp_path / "src", val_path=tmp_path / "v")
    assert message == f"data.val_path={tmp_path / 'v'} does not exist."


def test_unset_path(tmp_path):
    message = prepare_error(tmp_path, None)
    assert message == "data.path is not set; point it at a folder of .txt, .jsonl or .parquet files."


@pytest.mark.parametrize("contents", [[], ["notes.md", "data.csv", ".hidden.txt"]])
def test_folder_without_supported_files(tmp_path, contents):
    src = tmp_path / "src"
    src.mkdir()
    for name in contents:
        (src / name).write_text("text")
    message = prepare_error(tmp_path, src)
    assert message == f"data.path={src} holds no .txt, .jsonl, .parquet files (searched recursively)."


def test_folder_of_blank_files(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("   \n")
    write_jsonl(tmp_path / "src" / "b.jsonl", [{"text": ""}])
    message = prepare_error(tmp_path, tmp_path / "src")
    assert message == f"data.path={tmp_path / 'src'} holds no documents: every file in it is empty or blank."


def test_single_document_cannot_be_split(tmp_path):
    (tmp_path / "one.txt").write_text("all there is")
    message = prepare_error(tmp_path, tmp_path / "one.txt")
    assert message.startswith(f"data.path={tmp_path / 'one.txt'} holds a single document, too few to hold out")
    assert message.endswith("add documents or set data.val_path.")


def test_unsupported_single_file(tmp_path):
    (tmp_path / "corpus.csv").write_text("text\nhello\n")
    message = prepare_error(tmp_path, tmp_path / "corpus.csv")
    assert message == f"data.path={tmp_path / 'corpus.csv'} is not a .txt, .jsonl, .parquet file."


def test_parquet_without_text_column(tmp_path):
    write_parquet(tmp_path / "src" / "x.parquet", {"content": ["a"], "id": [1]})
    message = prepare_error(tmp_path, tmp_path / "src")
    assert message == f"{tmp_path / 'src' / 'x.parquet'} has no string column `text` (its columns: content, id)."


def test_garbled_parquet(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.parquet").write_bytes(b"PAR1 but not really")
    message = prepare_error(tmp_path, tmp_path / "src")
    assert message.startswith(f"{tmp_path / 'src' / 'x.parquet'} is not a readable parquet file (")


def test_jsonl_line_without_text(tmp_path):
    write_jsonl(tmp_path / "src" / "x.jsonl", [{"text": "fine"}, {"content": "no text key"}])
    message = prepare_error(tmp_path, tmp_path / "src")
    assert message == f'{tmp_path / "src" / "x.jsonl"}, line 2: no "text" field (expected {{"text": "..."}}).'


def test_jsonl_line_that_is_not_json(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.jsonl").write_text('{"text": "fine"}\n\n{"text": "cut off\n')
    message = prepare_error(tmp_path, tmp_path / "src")
    assert message.startswith(f"{tmp_path / 'src' / 'x.jsonl'}, line 3: not valid JSON (")


def test_jsonl_text_that_is_not_a_string(tmp_path):
    write_jsonl(tmp_path / "src" / "x.jsonl", [{"text": ["a", "list"]}])
    message = prepare_error(tmp_path, tmp_path / "src")
    assert message == f'{tmp_path / "src" / "x.jsonl"}, line 1: "text" is list, not a string.'


def test_txt_that_is_not_utf8(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "latin1.txt").write_bytes("café".encode("latin-1"))
    message = prepare_error(tmp_path, tmp_path / "src")
    assert message.startswith(f"{tmp_path / 'src' / 'latin1.txt'} is not UTF-8 text (byte 3: ")


def test_txt_that_is_binary(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "image.txt").write_bytes(b"\x00\x01\x02 binary")
    message = prepare_error(tmp_path, tmp_path / "src")
    assert message == f"{tmp_path / 'src' / 'image.txt'} contains NUL bytes, so it is binary data, not text; remove it."


@pytest.mark.parametrize("fraction", [0, 1, 1.5, "0.1"])
def test_val_fraction_out_of_range(tmp_path, fraction):
    write_txt_folder(tmp_path / "src", 3)
    message = prepare_error(tmp_path, tmp_path / "src", val_fraction=fraction)
    assert message == f"data.val_fraction={fraction!r} must be a number strictly between 0 and 1."
