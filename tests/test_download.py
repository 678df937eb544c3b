"""The shard downloader against a loopback HTTP server that serves generated parquet shards and
misbehaves on request: 500s, responses cut off half-way, Range ignored, missing files."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.config import compose_cli
from nanochat.data import download
from nanochat.data.corpus import SHARD_GLOB, ParquetCorpus
from nanochat.data.download import download_corpus, fetch_shards, shard_name
from nanochat.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FAST = {"max_tries": 3, "timeout": 5.0, "backoff": 0.01, "show_progress": False}
_WORDS = "the of model token shard byte loss grad step data text parquet row group server".split()


def make_shard(seed: int, documents: int = 300, docs_per_row_group: int = 100) -> bytes:
    """A FineWeb-like shard (a `text` column in several row groups) of some tens of KB."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(_WORDS, k=rng.randint(20, 60))) + f" {rng.random()}" for _ in range(documents)]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), sink, row_group_size=docs_per_row_group)
    return sink.getvalue().to_pybytes()


SHARDS = {shard_name(index): make_shard(index) for index in range(4)}


class ShardServer:
    """Serves SHARDS at /<name> with switchable misbehaviour and records every request."""

    def __init__(self):
        self.files = dict(SHARDS)
        self.fail_with_500: dict[str, int] = {}  # name -> how many more GETs answer 500
        self.cut_off: set[str] = set()  # names whose next GET closes after half the body
        self.honours_range = True
        self.requests: list[tuple[str, str, str | None]] = []  # (method, name, Range header)
        self.lock = threading.Lock()
        self.url = ""

    def gets(self, name: str) -> list[str | None]:
        """The Range header (or None) of each GET of name."""
        return [range_ for method, got, range_ in self.requests if method == "GET" and got == name]

    def names_requested(self) -> set[str]:
        return {name for _, name, _ in self.requests}

    def handler(self) -> type[BaseHTTPRequestHandler]:
        shard_server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(send_body=False)

            def do_GET(self):
                self.answer(send_body=True)

            def answer(self, send_body: bool):
                name, range_header = self.path.lstrip("/"), self.headers.get("Range")
                with shard_server.lock:
                    shard_server.requests.append((self.command, name, range_header))
                    data = shard_server.files.get(name)
                    fail = send_body and shard_server.fail_with_500.get(name, 0) > 0
                    if fail:
                        shard_server.fail_with_500[name] -= 1
                    cut = send_body and name in shard_server.cut_off
                    if cut:
                        shard_server.cut_off.discard(name)
                if data is None:
                    return self.send_error(404)
                if fail:
                    return self.send_error(500)
                start = 0
                if range_header and shard_server.honours_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    # A cut-off response announces the full length, then the connection drops.
                    self.wfile.write(body[: len(body) // 2] if cut else body)

        return Handler


@pytest.fixture
def server():
    shard_server = ShardServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), shard_server.handler())
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    shard_server.url = f"http://127.0.0.1:{httpd.server_port}"
    yield shard_server
    httpd.shutdown()
    httpd.server_close()


class DownloadedCorpus(ParquetCorpus):
    def prepare(self) -> None:
        pass


def part_file(path: Path) -> Path:
    """A partial download of path named as the downloader names them."""
    return path.with_name(f".{path.name}.{'ab12' * 8}.part")


def leftovers(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.part")) + sorted(directory.glob(".*.part"))


def test_success_lands_every_shard_byte_identical_without_part_files(server, tmp_path):
    names = [shard_name(index) for index in range(3)]
    paths = fetch_shards(server.url, names, tmp_path, workers=3, **FAST)
    assert paths == [tmp_path / name for name in names]
    for name in names:
        assert (tmp_path / name).read_bytes() == SHARDS[name]
    assert leftovers(tmp_path) == []


def test_progress_line_shows_shards_and_bytes_and_is_quiet_when_disabled(server, tmp_path, capsys):
    fetch_shards(server.url, [shard_name(0), shard_name(1)], tmp_path / "loud", **{**FAST, "show_progress": True})
    assert re.search(r"shards 2/2 \| [\d.]+/[\d.]+ MB \| [\d.]+ MB/s", capsys.readouterr().err)
    fetch_shards(server.url, [shard_name(0), shard_name(1)], tmp_path / "quiet", **FAST)
    assert capsys.readouterr().err == ""


def test_two_500s_are_retried_then_the_shard_lands(server, tmp_path):
    name = shard_name(0)
    server.fail_with_500[name] = 2
    fetch_shards(server.url, [name], tmp_path, **{**FAST, "max_tries": 5})
    assert len(server.gets(name)) == 3
    assert (tmp_path / name).read_bytes() == SHARDS[name]


def test_retry_delays_double_with_jitter_and_are_capped():
    for attempt in range(1, 5):
        delays = [download.retry_delay(attempt, backoff=1.0) for _ in range(200)]
        base = 2 ** (attempt - 1)
        assert 0.5 * base <= min(delays) and max(delays) <= 1.5 * base
        assert len(set(delays)) > 100
    assert download.retry_delay(30, backoff=1.0) <= 1.5 * download.MAX_BACKOFF_S


def test_cut_off_response_is_resumed_with_a_range_request(server, tmp_path):
    name = shard_name(1)
    server.cut_off.add(name)
    fetch_shards(server.url, [name], tmp_path, **FAST)
    ranges = server.gets(name)
    assert ranges[0] is None and len(ranges) == 2
    resumed_from = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert 0 < resumed_from < len(SHARDS[name])
    assert (tmp_path / name).read_bytes() == SHARDS[name]
    assert leftovers(tmp_path) == []


def test_server_ignoring_range_restarts_the_partial_download_cleanly(server, tmp_path):
    name = shard_name(2)
    server.honours_range = False
    # Garbage, so a client that kept these bytes would produce a wrong file.
    part_file(tmp_path / name).write_bytes(b"x" * (len(SHARDS[name]) // 2))
    fetch_shards(server.url, [name], tmp_path, **FAST)
    assert server.gets(name) == [f"bytes={len(SHARDS[name]) // 2}-"]  # one GET: restarted, not retried
    assert (tmp_path / name).read_bytes() == SHARDS[name]
    assert leftovers(tmp_path) == []


def test_complete_part_left_before_its_rename_is_accepted(server, tmp_path):
    name = shard_name(0)
    part_file(tmp_path / name).write_bytes(SHARDS[name])
    fetch_shards(server.url, [name], tmp_path, **FAST)
    assert server.gets(name) == [f"bytes={len(SHARDS[name])}-"]  # answered 416: nothing left to fetch
    assert (tmp_path / name).read_bytes() == SHARDS[name]


def test_corrupt_file_on_disk_is_replaced(server, tmp_path):
    name = shard_name(0)
    (tmp_path / name).write_bytes(b"not parquet at all" * 100)
    fetch_shards(server.url, [name], tmp_path, **FAST)
    assert (tmp_path / name).read_bytes() == SHARDS[name]


def test_valid_file_on_disk_is_not_downloaded_again(server, tmp_path):
    kept, missing = shard_name(0), shard_name(1)
    (tmp_path / kept).write_bytes(SHARDS[kept])
    fetch_shards(server.url, [kept, missing], tmp_path, **FAST)
    assert kept not in server.names_requested()
    assert (tmp_path / missing).read_bytes() == SHARDS[missing]


def test_part_left_by_a_killed_download_is_not_a_shard_and_gets_completed(server, tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    done, killed = shard_name(0), shard_name(1)
    (train / done).write_bytes(SHARDS[done])
    half = len(SHARDS[killed]) // 2
    part_file(train / killed).write_bytes(SHARDS[killed][:half])
    corpus = DownloadedCorpus(tmp_path)
    assert corpus.files("train") == [train / done]
    assert sorted(train.glob(SHARD_GLOB)) == [train / done]

    fetch_shards(server.url, [done, killed], train, **FAST)
    assert server.gets(killed) == [f"bytes={half}-"]
    assert (train / killed).read_bytes() == SHARDS[killed]
    assert corpus.files("train") == [train / done, train / killed]
    assert leftovers(train) == []


def test_unreachable_base_url_names_the_url_and_the_tries(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UserError, match=rf"http://127\.0\.0\.1:{port}/shard_00000\.parquet failed after 3 tries"):
        fetch_shards(f"http://127.0.0.1:{port}", [shard_name(0)], tmp_path, **FAST)


def test_404_is_final_and_names_the_url(server, tmp_path):
    with pytest.raises(UserError, match=re.escape(f"{server.url}/shard_09999.parquet answered HTTP 404")):
        fetch_shards(server.url, [shard_name(0), shard_name(9999)], tmp_path, **FAST)
    assert len([r for r in server.requests if r[1] == shard_name(9999)]) == 1
    assert list(tmp_path.glob(SHARD_GLOB)) == []


def test_full_disk_is_refused_before_any_shard_body_is_fetched(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "free_disk_bytes", lambda directory: 1000)
    names = [shard_name(0), shard_name(1)]
    needed = sum(len(SHARDS[name]) for name in names)
    with pytest.raises(UserError, match=rf"Not enough disk space .* need {needed} bytes .* only 1000 bytes"):
        fetch_shards(server.url, names, tmp_path, **FAST)
    assert [method for method, _, _ in server.requests] == ["HEAD", "HEAD"]
    assert list(tmp_path.glob(SHARD_GLOB)) == []


@pytest.mark.parametrize("base_url", ["ftp://127.0.0.1/data", "file:///etc", "127.0.0.1:8000", ""])
def test_non_http_base_url_is_refused(tmp_path, base_url):
    with pytest.raises(UserError, match="not an http:// or https:// URL"):
        fetch_shards(base_url, [shard_name(0)], tmp_path, **FAST)


@pytest.mark.parametrize("name", ["../escape.parquet", "..", "sub/shard_00000.parquet", "/etc/passwd"])
def test_shard_name_that_would_escape_the_directory_is_refused(server, tmp_path, name):
    with pytest.raises(UserError, match=re.escape(repr(name))):
        fetch_shards(server.url, [name], tmp_path / "out", **FAST)
    assert server.requests == []


def test_download_corpus_puts_train_and_val_shards_apart(server, tmp_path):
    paths = download_corpus(server.url, tmp_path, num_shards=2, total_shards=4, val_shard=3, show_progress=False)
    assert paths["train"] == [tmp_path / "train" / shard_name(0), tmp_path / "train" / shard_name(1)]
    assert paths["val"] == [tmp_path / "val" / shard_name(3)]
    assert DownloadedCorpus(tmp_path).files("val") == paths["val"]


@pytest.mark.parametrize(
    ("num_shards", "val_shard", "message"),
    [
        (4, 3, "data.num_shards=4 must be between 1 and 3"),
        (0, 3, "data.num_shards=0 must be between 1 and 3"),
        (2, 1, "data.val_shard=1 must be a shard index from 2 to 3"),
        (2, 4, "data.val_shard=4 must be a shard index from 2 to 3"),
    ],
)
def test_download_corpus_refuses_impossible_shard_counts(tmp_path, num_shards, val_shard, message):
    with pytest.raises(UserError, match=re.escape(message)):
        download_corpus("http://127.0.0.1:9", tmp_path, num_shards, total_shards=4, val_shard=val_shard)


def test_cli_refuses_a_corpus_without_base_url():
    with pytest.raises(UserError, match="not downloaded with this command"):
        download.main(compose_cli(["data=shakespeare"]))


def test_cli_fetches_train_and_val_shards(server, tmp_path):
    overrides = [
        "data=fineweb_edu",
        f"data.base_url={server.url}",
        f"data.data_dir={tmp_path}",
        "data.num_shards=2",
        "data.total_shards=4",
        "data.val_shard=3",
    ]
    command = [sys.executable, "-m", "nanochat.data.download", *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "train").glob(SHARD_GLOB)) == [shard_name(0), shard_name(1)]
    assert [p.name for p in (tmp_path / "val").glob(SHARD_GLOB)] == [shard_name(3)]
    assert (tmp_path / "val" / shard_name(3)).read_bytes() == SHARDS[shard_name(3)]
    assert f"Train shards: 2 in {tmp_path / 'train'}." in result.stdout
