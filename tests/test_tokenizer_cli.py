"""`python -m nanochat.tokenizer`: retrains where training looks, reports compression; vocab checks."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from configs import compose

from nanochat.assemble import check
from nanochat.data.local import LocalCorpus
from nanochat.errors import UserError
from nanochat.tokenizer import Tokenizer, check_vocab_matches, compression, tokenizer_path, train_and_save

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a king queen speaks loves hears sees night day sword crown grief honour fortune storm".split()


def tokenizer_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "nanochat.tokenizer", *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def txt_folder(tmp_path) -> Path:
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(60):
        words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(80 + i)]
        (folder / f"{i:03d}.txt").write_text(" ".join(words) + ".\n", encoding="utf-8")
    return folder


def test_cli_trains_saves_where_training_looks_and_reports_compression(txt_folder, tmp_path):
    data_dir = tmp_path / "data"
    overrides = ["data=local", f"data.path={txt_folder}", f"data.data_dir={data_dir}", "tokenizer.vocab_size=300"]
    result = tokenizer_cli(*overrides, "tokenizer.max_chars=100000", "tokenizer.doc_cap=500", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = tokenizer_path(data_dir / "tokenizer", 300)
    tokenizer = Tokenizer.load(saved)
    assert tokenizer.vocab_size == 300
    assert re.search(r"trained tokenizer in \d+\.\ds: vocab_size=300", result.stdout)

    reported = re.search(r"compression on the validation split: ([\d.]+) bytes per token", result.stdout)
    corpus = LocalCorpus(data_dir, txt_folder)
    nbytes, ntokens = compression(tokenizer, corpus.iter_documents("val"))
    assert float(reported.group(1)) == pytest.approx(nbytes / ntokens, abs=1e-3)
    assert nbytes / ntokens > 1.5  # merges learned: better than one token per byte

    # Unlike a training run, the command line always retrains (here: other caps, another tokenizer).
    first_fingerprint = tokenizer.fingerprint()
    result = tokenizer_cli(*overrides, "tokenizer.doc_cap=50", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "trained tokenizer" in result.stdout
    assert Tokenizer.load(saved).fingerprint() != first_fingerprint
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # replaced atomically, no leftovers


def test_cli_bad_config_is_one_sentence(tmp_path):
    result = tokenizer_cli("data=local", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: data.path needs a value (it is ??? in the YAML): set data.path=<value>."
    ]


def test_compression_counts_utf8_bytes_and_no_specials(shakespeare_tokenizer):
    texts = ["naïve café", "plain text " * 5]
    nbytes, ntokens = compression(shakespeare_tokenizer, texts, batch_size=1)
    assert nbytes == sum(len(t.encode("utf-8")) for t in texts)
    assert ntokens == sum(len(shakespeare_tokenizer.encode(t)) for t in texts)


def test_model_vocab_must_match_the_tokenizer(shakespeare_tokenizer):
    check_vocab_matches(shakespeare_tokenizer.vocab_size, 512)
    with pytest.raises(UserError) as error:
        check_vocab_matches(shakespeare_tokenizer.vocab_size, 65536)
    assert str(error.value) == (
        "model.vocab_size=65536 differs from tokenizer.vocab_size=512; "
        "leave model.vocab_size at its default, which follows the tokenizer."
    )


@pytest.mark.parametrize("key, value", [("max_chars", 0), ("doc_cap", -1)])
def test_caps_must_be_positive(tmp_path, key, value):
    caps = {"max_chars": 1000, "doc_cap": 100, key: value}
    with pytest.raises(UserError, match=rf"^{key}={value} must be a positive integer.$"):
        train_and_save(tmp_path, 300, corpus=None, **caps)
    with pytest.raises(UserError, match=rf"^tokenizer.{key}={value} must be a positive integer.$"):
        check(compose(f"tokenizer.{key}={value}"))
