"""End to end on real-data paths: a folder of the user's .txt files (`data=local`), and
FineWeb-style shards downloaded from a loopback server when training starts (`data.download=true`)."""

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from configs import TEST_RUN_BASICS
from conftest import fake_editions
from runs import read_metrics, run_train

from nanochat.data.shakespeare import split_documents

pytestmark = pytest.mark.slow

# A 2-layer model for 60 steps with evaluations at 0, 30 and 60: seconds on a CPU.
TINY_RUN = [
    "tokenizer.vocab_size=512", "model.n_layer=2", "model.sequence_len=64", *TEST_RUN_BASICS,
    "trainer.device_batch_size=8", "trainer.total_batch_size=512", "trainer.num_iterations=60",
    "eval.every=30", "eval.tokens=2048", "sample.tokens=8", "logger=none",
]  # fmt: skip


@pytest.fixture(scope="module")
def txt_folder(tmp_path_factory) -> Path:
    """The synthetic plays cut into ~2 KB pieces, one .txt file each, in a folder per work."""
    folder = tmp_path_factory.mktemp("my_corpus")
    for stem, (work, raw) in fake_editions().items():
        (folder / work).mkdir(exist_ok=True)
        text = raw.decode("utf-8", errors="replace")
        for i, document in enumerate(split_documents(text)):
            (folder / work / f"{stem}_{i:03d}.txt").write_text(document, encoding="utf-8")
    return folder


def test_training_on_a_folder_of_txt_files_lowers_the_loss(txt_folder, tmp_path):
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    args = [
        "data=local", f"data.path={txt_folder}", f"data.data_dir={data_dir}",
        *TINY_RUN, f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    result = run_train(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "local: converted" in result.stdout
    assert (data_dir / "tokenizer" / "tokenizer_512.json").exists()

    records = read_metrics(run_dir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    bpbs = [r["val/bpb"] for r in records if "val/bpb" in r]
    assert len(losses) == 60 and len(bpbs) == 3
    assert losses[-1] < losses[0] - 1.0
    assert bpbs[-1] < bpbs[0] - 0.3


@pytest.fixture(scope="module")
def shard_server(tmp_path_factory):
    """A loopback HTTP server publishing the synthetic plays as FineWeb-style shards 0..2 (2 = val)."""
    published = tmp_path_factory.mktemp("published")
    documents = [doc for _, raw in fake_editions().values() for doc in split_documents(raw.decode("utf-8", "replace"))]
    third = len(documents) // 3
    for index in range(3):
        table = pa.table({"text": documents[index * third : (index + 1) * third]})
        pq.write_table(table, published / f"shard_{index:05d}.parquet", row_group_size=16)
    handler = functools.partial(QuietHandler, directory=str(published))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_training_on_shards_downloaded_at_start_lowers_the_loss(shard_server, tmp_path):
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    args = [
        "data=fineweb_edu", f"data.base_url={shard_server}", f"data.data_dir={data_dir}", "data.download=true",
        "data.num_shards=2", "data.total_shards=3", "data.val_shard=2",
        *TINY_RUN, f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    result = run_train(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (data_dir / "train").glob("shard_*.parquet")) == [
        "shard_00000.parquet",
        "shard_00001.parquet",
    ]
    assert [p.name for p in (data_dir / "val").glob("shard_*.parquet")] == ["shard_00002.parquet"]
    records = read_metrics(run_dir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    bpbs = [r["val/bpb"] for r in records if "val/bpb" in r]
    assert losses[-1] < losses[0] - 1.0
    assert bpbs[-1] < bpbs[0] - 0.3
