"""HubShardCorpus: exactly the first num_shards shards, and one sentence for every way they can be wrong.

The downloader itself is tested in test_download.py; here it is replaced by a fake that writes
shards, so these tests never open a socket.
"""

import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from nanochat.data.corpus import shard_name
from nanochat.data.hub import HubShardCorpus
from nanochat.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BASE_URL = "http://127.0.0.1:9/dataset"
TOTAL, VAL = 10, 9


def write_shard(path: Path, index: int, table: pa.Table | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = [f"document {d} of shard {index}" for d in range(5)]
    pq.write_table(table if table is not None else pa.table({"text": texts}), path, row_group_size=2)


def make_corpus(data_dir: Path, num_shards: int = 3, download: bool = False, name="fineweb_edu") -> HubShardCorpus:
    return HubShardCorpus(data_dir, BASE_URL, num_shards, TOTAL, VAL, download=download, name=name)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """Train shards 0..4 and the validation shard 9 on disk, as a download of 5 shards leaves them."""
    for index in range(5):
        write_shard(tmp_path / "train" / shard_name(index), index)
    write_shard(tmp_path / "val" / shard_name(VAL), VAL)
    return tmp_path


@pytest.fixture
def fake_downloader(monkeypatch):
    """Replaces nanochat.data.download with a module whose download_corpus writes the shards."""
    calls = []

    def download_corpus(base_url, data_dir, num_shards, total_shards, val_shard, workers=8):
        calls.append((base_url, Path(data_dir), num_shards, total_shards, val_shard))
        for index in range(num_shards):
            write_shard(Path(data_dir) / "train" / shard_name(index), index)
        write_shard(Path(data_dir) / "val" / shard_name(val_shard), val_shard)

    module = types.ModuleType("nanochat.data.download")
    module.download_corpus = download_corpus
    monkeypatch.setitem(sys.modules, "nanochat.data.download", module)
    return calls


def test_files_are_the_first_num_shards_not_everything_on_disk(data_dir):
    corpus = make_corpus(data_dir, num_shards=3)
    corpus.prepare()
    assert corpus.files("train") == [data_dir / "train" / shard_name(i) for i in range(3)]
    assert corpus.files("val") == [data_dir / "val" / shard_name(VAL)]
    assert {doc.split()[-1] for doc in corpus.iter_documents("train")} == {"0", "1", "2"}


def test_prepare_does_not_download_what_is_there(data_dir, fake_downloader):
    make_corpus(data_dir, num_shards=5, download=True).prepare()
    assert fake_downloader == []


def test_missing_shards_without_download_name_the_command(data_dir):
    with pytest.raises(UserError) as error:
        make_corpus(data_dir, num_shards=7).prepare()
    assert str(error.value) == (
        f"2 of the 8 shards this run needs are missing (first: {data_dir / 'train' / 'shard_00005.parquet'}); "
        f"run: python -m nanochat.data.download data=fineweb_edu data.num_shards=7 data.data_dir={data_dir}, "
        "or set data.download=true."
    )


def test_missing_shards_outside_hydra_name_the_function(tmp_path):
    with pytest.raises(UserError, match=r"fetch them with nanochat\.data\.download\.download_corpus\("):
        make_corpus(tmp_path, name=None).prepare()


def test_missing_shards_with_download_are_fetched(tmp_path, fake_downloader):
    corpus = make_corpus(tmp_path, num_shards=4, download=True)
    corpus.prepare()
    assert fake_downloader == [(BASE_URL, tmp_path, 4, TOTAL, VAL)]
    assert all(path.exists() for path in corpus.files("train") + corpus.files("val"))


def test_a_download_that_leaves_shards_missing_is_reported(tmp_path, monkeypatch):
    module = types.ModuleType("nanochat.data.download")
    module.download_corpus = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "nanochat.data.download", module)
    with pytest.raises(UserError, match="4 of the 4 shards this run needs are missing"):
        make_corpus(tmp_path, download=True).prepare()


def test_a_shard_that_is_not_parquet_is_named(data_dir):
    bad = data_dir / "train" / shard_name(1)
    bad.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(UserError) as error:
        make_corpus(data_dir).prepare()
    message = str(error.value)
    assert message.startswith(f"Shard {bad} is not a readable parquet file (")
    assert message.endswith(
        f"; delete it and run: python -m nanochat.data.download data=fineweb_edu data.num_shards=3 "
        f"data.data_dir={data_dir}, or set data.download=true."
    )
    assert "\n" not in message


def test_a_shard_without_text_column_is_named(data_dir):
    bad = data_dir / "val" / shard_name(VAL)
    write_shard(bad, VAL, pa.table({"content": ["a", "b"], "id": [1, 2]}))
    with pytest.raises(UserError, match=rf"^Shard {bad} has no string column `text` \(its columns: content, id\);"):
        make_corpus(data_dir).prepare()


def test_a_broken_shard_is_fetched_again_with_download(data_dir, fake_downloader):
    (data_dir / "train" / shard_name(2)).write_bytes(b"truncated")
    make_corpus(data_dir, download=True).prepare()
    assert len(fake_downloader) == 1


def test_a_bad_shard_the_download_keeps_serving_points_at_base_url(data_dir, monkeypatch):
    write_shard(data_dir / "train" / shard_name(0), 0, pa.table({"body": ["x"]}))
    module = types.ModuleType("nanochat.data.download")
    module.download_corpus = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "nanochat.data.download", module)
    with pytest.raises(UserError, match=r"has no string column `text` \(its columns: body\); check data.base_url\.$"):
        make_corpus(data_dir, download=True).prepare()


@pytest.mark.parametrize("num_shards", [0, 10, 1823])
def test_num_shards_beyond_the_dataset_is_refused(tmp_path, num_shards):
    with pytest.raises(UserError) as error:
        make_corpus(tmp_path, num_shards=num_shards).prepare()
    assert str(error.value) == (
        f"data.num_shards={num_shards} must be between 1 and 9, the number of train shards in the dataset "
        "(data.total_shards=10, shard 9 is validation)."
    )


def test_val_shard_outside_the_dataset_is_refused(tmp_path):
    corpus = HubShardCorpus(tmp_path, BASE_URL, 3, 10, 10)
    with pytest.raises(UserError, match=r"^data.val_shard=10 is not a shard of the dataset \(data.total_shards=10"):
        corpus.prepare()


def test_non_integer_num_shards_is_refused(tmp_path):
    with pytest.raises(UserError, match="^data.num_shards='8' must be an integer.$"):
        make_corpus(tmp_path, num_shards="8").prepare()


def compose_data(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"data={name}", *overrides]).data


@pytest.mark.parametrize(
    "name, dataset, total",
    [("fineweb_edu", "karpathy/fineweb-edu-100b-shuffle", 1823), ("climbmix", "karpathy/climbmix-400b-shuffle", 6543)],
)
def test_hub_configs_describe_their_dataset(name, dataset, total, tmp_path):
    cfg = compose_data(name, f"data.data_dir={tmp_path}")
    assert cfg.base_url == f"https://huggingface.co/datasets/{dataset}/resolve/main"
    assert (cfg.total_shards, cfg.val_shard, cfg.download, cfg.name) == (total, total - 1, False, name)
    corpus = instantiate(cfg)
    assert isinstance(corpus, HubShardCorpus) and corpus.compression_baselines() == {}
    with pytest.raises(UserError, match=f"run: python -m nanochat.data.download data={name} data.num_shards=8 "):
        corpus.prepare()


def test_training_without_shards_stops_with_the_download_command(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "data=fineweb_edu", f"data.data_dir={tmp_path / 'fw'}",
         "data.num_shards=2", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    first_missing = tmp_path / "fw" / "train" / "shard_00000.parquet"
    assert result.stderr.strip().splitlines() == [
        (
            f"error: 3 of the 3 shards this run needs are missing (first: {first_missing}); run: python -m "
            f"nanochat.data.download data=fineweb_edu data.num_shards=2 data.data_dir={tmp_path / 'fw'}, "
            "or set data.download=true."
        )
    ]
    assert not (tmp_path / "run").exists()
