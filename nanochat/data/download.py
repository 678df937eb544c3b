"""Downloads parquet shards over HTTP(S): in parallel, resumable, verified, and safe to kill.

    python -m nanochat.data.download data=fineweb_edu data.num_shards=8

fetches the first data.num_shards train shards and the validation shard of a data config (the
keys training reads) into <data.data_dir>/train/ and <data.data_dir>/val/. The functions below
take plain arguments; only the command line composes the Hydra config.

- A shard is accepted only when its size matches what the server announced and its parquet footer
  opens, so a truncated or garbled file never reaches the loader. Shards already on disk that
  open are skipped without touching the network; ones that do not are fetched again.
- Each download writes to a hidden, uniquely named `.<name>.<32 hex>.part` next to the shard and
  is renamed into place only when complete. It never matches SHARD_GLOB, so a killed run leaves
  nothing a corpus would read, and the next run resumes it with an HTTP Range request (starting
  over cleanly when the server ignores Range).
- Connection errors, timeouts, HTTP 5xx and 429 (rate limiting) are retried with exponential
  backoff and random jitter; other 4xx answers are final.
- Sizes are asked for with HEAD before any body is fetched, so a disk without room is refused up
  front instead of being filled.
- One downloader per directory at a time (a lock on `.download.lock`): ranks or jobs started
  together wait for the first one and then find the shards present.
- HTTP goes through the standard library only (urllib), to keep the dependencies small.

fetch_url() gives one file of another kind (the CORE eval bundle's zip) the same retries, resume,
atomic rename and lock, with its own check of what a complete file is.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import http.client
import os
import random
import re
import shutil
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.data.corpus import shard_name
from nanochat.errors import UserError

__all__ = ["download_corpus", "fetch_shards", "fetch_url", "free_disk_bytes", "main", "retry_delay", "shard_name"]

MAX_TRIES = 5
TIMEOUT_S = 30.0  # per socket operation (connect, each read), not per shard
BACKOFF_S = 1.0  # the first retry delay; it doubles with each try
CHUNK_BYTES = 1 << 20
LOCK_NAME = ".download.lock"
MAX_BACKOFF_S = 60.0
# Failures of the network rather than of the request: worth another try. (HTTPError is a
# URLError too; its status decides, see _is_transient.)
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError)
_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)")


class _BadDownload(Exception):
    """A response arrived but cannot be used as it is (short, too long, not parquet): try again."""


class _Stopped(Exception):
    """Another shard failed or the user interrupted: abandon this one, keeping its partial file."""


def free_disk_bytes(directory: Path) -> int:
    """Bytes available in directory's filesystem (a module function so tests can simulate a full disk)."""
    return shutil.disk_usage(directory).free


def retry_delay(attempt: int, backoff: float) -> float:
    """Seconds to wait after failed try number `attempt`: doubling from backoff, capped, and
    jittered so that workers hit by the same outage do not all retry in lockstep."""
    return min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.5)


def _human(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB"):
        if num_bytes < 1000:
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} GB"


def _checked_base_url(base_url: object, name: str = "base_url") -> str:
    parts = urllib.parse.urlsplit(base_url) if isinstance(base_url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"{name}={base_url!r} is not an http:// or https:// URL; downloads accept only those.")
    return base_url.rstrip("/")


def _check_name(name: object) -> None:
    """Names come from configs or listings: they must stay inside the target directory."""
    if not isinstance(name, str) or not name or ".." in name or any(c in name for c in "/\\\0"):
        raise UserError(f"Shard name {name!r} is not a plain file name (no path separators or '..').")


def _opens_as_parquet(path: Path) -> bool:
    try:
        pq.read_metadata(path)  # the footer: absent or garbled in a truncated or foreign file
        return True
    except (OSError, ValueError, pa.ArrowException):
        return False


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from `bytes 100-199/1000` or `bytes */1000`; None where unknown."""
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _content_length(headers) -> int | None:
    value = headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def _is_transient(status: int) -> bool:
    return status >= 500 or status == 429


def _leftover_part(path: Path) -> Path | None:
    """The largest partial download of `path` left by an earlier run, the others deleted."""
    own_name = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{32}}\.part")
    leftovers = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*.part") if own_name.fullmatch(p.name)]
    leftovers.sort(key=lambda p: p.stat().st_size, reverse=True)
    for stale in leftovers[1:]:
        stale.unlink()
    return leftovers[0] if leftovers else None


def _new_part(path: Path) -> Path:
    part = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    part.open("xb").close()
    return part


class _Progress:
    """`shards 3/8 | 512.0/1365.3 MB | 41.2 MB/s | ETA 0:00:21` on stderr, redrawn in place on a
    terminal and printed once per finished shard otherwise, so log files stay readable."""

    def __init__(self, enabled: bool, noun: str = "shards"):
        self._enabled = enabled
        self._noun = noun
        self._interactive = enabled and sys.stderr.isatty()
        self._lock = threading.Lock()
        self._shards = self._shards_done = 0
        self._total_bytes: int | None = None
        self._done_bytes = self._received = 0
        self._start = self._last_draw = time.monotonic()

    def begin(self, shards: int, total_bytes: int | None, done_bytes: int) -> None:
        with self._lock:
            self._shards, self._total_bytes, self._done_bytes = shards, total_bytes, done_bytes
            self._start = time.monotonic()

    def add_bytes(self, count: int) -> None:
        """Count received bytes; negative when a partial download is thrown away."""
        with self._lock:
            self._done_bytes += count
            self._received += max(count, 0)
            if self._interactive and time.monotonic() - self._last_draw > 0.1:
                self._draw()

    def shard_done(self) -> None:
        with self._lock:
            self._shards_done += 1
            if self._enabled:
                self._draw()
                if not self._interactive:
                    sys.stderr.write("\n")

    def note(self, message: str) -> None:
        with self._lock:
            if self._enabled:
                sys.stderr.write(("\r\033[K" if self._interactive else "") + message + "\n")
                sys.stderr.flush()

    def close(self) -> None:
        if self._interactive and self._shards:
            sys.stderr.write("\n")

    def _draw(self) -> None:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self._received / elapsed
        line = f"{self._noun} {self._shards_done}/{self._shards} | "
        if self._total_bytes:
            line += f"{self._done_bytes / 1e6:.1f}/{self._total_bytes / 1e6:.1f} MB | {rate / 1e6:.1f} MB/s"
            if rate > 0:
                eta = int(max(self._total_bytes - self._done_bytes, 0) / rate)
                line += f" | ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        else:
            line += f"{self._done_bytes / 1e6:.1f} MB | {rate / 1e6:.1f} MB/s"
        sys.stderr.write(("\r\033[K" if self._interactive else "") + line)
        sys.stderr.flush()
        self._last_draw = time.monotonic()


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects (the Hugging Face hub sends shards on to a CDN), but only to http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise UserError(f"{req.full_url} redirects to {newurl}, which is not an http:// or https:// URL.")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Downloader:
    """The HTTP side: HEAD for sizes, GET with Range resume, retries; shared by the worker threads.

    is_valid decides whether a complete download is a `kind` file (else it is fetched again); hint
    ends the message of a final HTTP error, pointing at the setting that holds the URL."""

    def __init__(
        self,
        timeout: float,
        max_tries: int,
        backoff: float,
        progress: _Progress,
        is_valid: Callable[[Path], bool] = _opens_as_parquet,
        kind: str = "parquet",
        hint: str = "check base_url",
    ):
        self.timeout, self.max_tries, self.backoff = timeout, max_tries, backoff
        self.progress = progress
        self.is_valid, self.kind, self.hint = is_valid, kind, hint
        self.opener = urllib.request.build_opener(_HttpOnlyRedirects)
        self.stop = threading.Event()

    def run_all(self, pool: ThreadPoolExecutor, calls: list[Callable[[], object]]) -> list:
        """Runs calls on the pool and returns their results in order; the first failure (or a
        Ctrl-C) stops the others at their next chunk and is raised."""
        futures = [pool.submit(call) for call in calls]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            self.stop.set()
            for future in futures:
                future.cancel()
            raise
        return [future.result() for future in futures]

    def size_of(self, url: str) -> int | None:
        def head() -> int | None:
            with self.opener.open(urllib.request.Request(url, method="HEAD"), timeout=self.timeout) as response:
                return _content_length(response.headers)

        return self._retrying(url, head)

    def fetch(self, url: str, path: Path, part: Path | None) -> None:
        part = part or _new_part(path)
        self._retrying(url, lambda: self._fetch_once(url, part))
        os.replace(part, path)
        self.progress.shard_done()

    def _retrying(self, url: str, action: Callable[[], object]):
        for attempt in range(1, self.max_tries + 1):
            if self.stop.is_set():
                raise _Stopped
            try:
                return action()
            except urllib.error.HTTPError as error:
                error.close()
                if not _is_transient(error.code):
                    raise UserError(f"{url} answered HTTP {error.code} {error.reason}; {self.hint}.") from None
                last_error: Exception = error
            except (_BadDownload, *_NETWORK_ERRORS) as error:
                last_error = error
            if attempt < self.max_tries:
                delay = retry_delay(attempt, self.backoff)
                self.progress.note(f"{url}: {last_error}; try {attempt + 1}/{self.max_tries} in {delay:.1f} s")
                self.stop.wait(delay)
        raise UserError(f"Downloading {url} failed after {self.max_tries} tries; last error: {last_error}")

    def _fetch_once(self, url: str, part: Path) -> None:
        offset = part.stat().st_size
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            response = self.opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            if error.code != 416 or not offset:
                raise
            error.close()
            # Nothing lies past `offset`: the partial is the whole file (a run killed just before
            # the rename) or longer than the file; _verify tells which.
            self._verify(part, _content_range(error.headers.get("Content-Range"))[1])
            return
        with response, open(part, "r+b") as file:
            if response.status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    self._discard(part)
                    raise _BadDownload(f"asked for bytes {offset}- and got {response.headers.get('Content-Range')}")
            else:
                if offset:  # the server ignored Range and sends the whole file: start over
                    self._discard(part)
                    offset = 0
                total = _content_length(response.headers)
            file.seek(offset)
            while chunk := response.read(CHUNK_BYTES):
                if self.stop.is_set():
                    raise _Stopped
                file.write(chunk)
                self.progress.add_bytes(len(chunk))
            file.flush()
            os.fsync(file.fileno())
        self._verify(part, total)

    def _verify(self, part: Path, total: int | None) -> None:
        size = part.stat().st_size
        if total is not None and size < total:
            # Kept: the next try asks for the rest with Range.
            raise _BadDownload(f"the connection closed after {size} of {total} bytes")
        if total is not None and size > total:
            self._discard(part)
            raise _BadDownload(f"got {size} bytes, more than the {total} announced")
        if not self.is_valid(part):
            self._discard(part)
            raise _BadDownload(f"the {size} bytes received are not a valid {self.kind} file")

    def _discard(self, part: Path) -> None:
        self.progress.add_bytes(-part.stat().st_size)
        os.truncate(part, 0)


@contextlib.contextmanager
def _exclusive(directory: Path, progress: _Progress) -> Iterator[None]:
    """Holds directory's download lock; released by the OS if this process dies."""
    with open(directory / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.note(f"Waiting for another download into {directory} to finish...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _check_disk_space(needed_by_directory: dict[Path, int]) -> None:
    """Sums what the missing shards need per filesystem and compares it with what is free there."""
    needed_by_device: dict[int, tuple[Path, int]] = {}
    for directory, needed in needed_by_directory.items():
        device = directory.stat().st_dev
        first_directory, total = needed_by_device.get(device, (directory, 0))
        needed_by_device[device] = (first_directory, total + needed)
    for directory, needed in needed_by_device.values():
        free = free_disk_bytes(directory)
        if needed > free:
            raise UserError(
                f"Not enough disk space in {directory}: the missing shards need {needed} bytes "
                f"({_human(needed)}) but only {free} bytes ({_human(free)}) are free."
            )


def _fetch_into(
    base_url: str,
    shards: list[tuple[str, Path]],
    workers: int,
    max_tries: int = MAX_TRIES,
    timeout: float = TIMEOUT_S,
    backoff: float = BACKOFF_S,
    show_progress: bool = True,
) -> list[Path]:
    """Downloads each (name, directory) pair to directory/name; returns those paths in order."""
    base_url = _checked_base_url(base_url)
    for name, _ in shards:
        _check_name(name)
    if workers < 1 or max_tries < 1:
        raise ValueError(f"workers={workers} and max_tries={max_tries} must both be at least 1")
    paths = [Path(directory).expanduser() / name for name, directory in shards]
    directories = sorted({path.parent for path in paths})
    progress = _Progress(show_progress)
    with contextlib.ExitStack() as locks:
        for directory in directories:  # sorted, so two downloaders never wait on each other
            directory.mkdir(parents=True, exist_ok=True)
            locks.enter_context(_exclusive(directory, progress))
        missing = []
        for path in dict.fromkeys(paths):
            if path.exists():
                if _opens_as_parquet(path):
                    continue
                progress.note(f"{path} is not a valid parquet file; downloading it again.")
                path.unlink()
            missing.append(path)
        if missing:
            _download(base_url, missing, workers, _Downloader(timeout, max_tries, backoff, progress))
    return paths


def _download(base_url: str, missing: list[Path], workers: int, downloader: _Downloader) -> None:
    urls = [f"{base_url}/{urllib.parse.quote(path.name)}" for path in missing]
    parts = [_leftover_part(path) for path in missing]
    resumed = [part.stat().st_size if part else 0 for part in parts]
    progress = downloader.progress
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-download") as pool:
        progress.note(f"Asking {base_url} for the sizes of the missing shards ({len(missing)})...")
        sizes = downloader.run_all(pool, [partial(downloader.size_of, url) for url in urls])
        needed_by_directory: dict[Path, int] = {}
        for path, size, have in zip(missing, sizes, resumed):
            needed_by_directory[path.parent] = needed_by_directory.get(path.parent, 0) + max((size or 0) - have, 0)
        _check_disk_space(needed_by_directory)
        progress.begin(len(missing), None if None in sizes else sum(sizes), sum(resumed))
        try:
            downloader.run_all(pool, [partial(downloader.fetch, *shard) for shard in zip(urls, missing, parts)])
        finally:
            progress.close()


def fetch_shards(
    base_url: str,
    names: list[str],
    out_dir: Path,
    workers: int = 8,
    max_tries: int = MAX_TRIES,
    timeout: float = TIMEOUT_S,
    backoff: float = BACKOFF_S,
    show_progress: bool = True,
) -> list[Path]:
    """Downloads <base_url>/<name> to out_dir/<name> for each name; returns those paths in order.

    Valid parquet files already there are kept without any request. timeout is per socket
    operation; backoff is the first retry delay in seconds (doubling, with jitter). A UserError
    says which URL failed and why.
    """
    shards = [(name, Path(out_dir)) for name in names]
    return _fetch_into(base_url, shards, workers, max_tries, timeout, backoff, show_progress)


def fetch_url(
    url: str,
    path: str | os.PathLike,
    is_valid: Callable[[Path], bool],
    kind: str,
    hint: str,
    max_tries: int = MAX_TRIES,
    timeout: float = TIMEOUT_S,
    backoff: float = BACKOFF_S,
    show_progress: bool = True,
) -> Path:
    """Downloads url to path as the shards are downloaded (HEAD for the size and a disk-space check,
    retries with backoff, Range resume of a killed download, rename into place when complete, one
    downloader per directory); returns path.

    is_valid(path) says whether a complete download is a `kind` file: one that is not is fetched
    again, and so is a file already at path that fails it; one that passes is kept without any
    request. hint ends the message of a final HTTP error (e.g. "check the eval bundle's URL").
    """
    url = _checked_base_url(url, "url")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    progress = _Progress(show_progress, noun="files")
    downloader = _Downloader(timeout, max_tries, backoff, progress, is_valid=is_valid, kind=kind, hint=hint)
    with _exclusive(path.parent, progress):
        if path.exists():
            if is_valid(path):
                return path
            progress.note(f"{path} is not a valid {kind} file; downloading it again.")
            path.unlink()
        part = _leftover_part(path)
        have = part.stat().st_size if part else 0
        size = downloader.size_of(url)
        _check_disk_space({path.parent: max((size or 0) - have, 0)})
        progress.begin(1, size, have)
        try:
            downloader.fetch(url, path, part)
        finally:
            progress.close()
    return path


def download_corpus(
    base_url: str,
    data_dir: str | os.PathLike,
    num_shards: int,
    total_shards: int,
    val_shard: int,
    workers: int = 8,
    show_progress: bool = True,
) -> dict[str, list[Path]]:
    """Makes <data_dir>/train hold shards 0..num_shards-1 and <data_dir>/val the shard val_shard,
    downloading what is missing; returns {"train": paths, "val": [path]}.

    The arguments are the data config's keys, so errors name them as data.<key>.
    """
    if not isinstance(total_shards, int) or total_shards < 2:
        raise UserError(f"data.total_shards={total_shards!r} must be an integer of at least 2 (train plus validation).")
    if not isinstance(num_shards, int) or not 1 <= num_shards <= total_shards - 1:
        raise UserError(
            f"data.num_shards={num_shards!r} must be between 1 and {total_shards - 1} "
            f"(data.total_shards={total_shards}, one of which is the validation shard)."
        )
    if not isinstance(val_shard, int) or not num_shards <= val_shard < total_shards:
        raise UserError(
            f"data.val_shard={val_shard!r} must be a shard index from {num_shards} to {total_shards - 1}: "
            f"not one of the {num_shards} train shards (data.num_shards), and below data.total_shards={total_shards}."
        )
    data_dir = Path(data_dir).expanduser()
    shards = [(shard_name(index), data_dir / "train") for index in range(num_shards)]
    shards.append((shard_name(val_shard), data_dir / "val"))
    paths = _fetch_into(base_url, shards, workers, show_progress=show_progress)
    return {"train": paths[:-1], "val": paths[-1:]}


def main(cfg) -> None:
    """The command line: downloads the shards cfg.data asks for and prints where they are."""
    data = cfg.data
    if not data.get("base_url"):
        raise UserError(
            f"This data config ({data.get('_target_', 'no _target_')}) has no data.base_url: its corpus is "
            "not downloaded with this command (training prepares it); data=fineweb_edu and data=climbmix are."
        )
    for key in ("data_dir", "num_shards", "total_shards", "val_shard"):
        if data.get(key) is None:
            raise UserError(f"The data config has no data.{key}, which the downloader needs.")
    paths = download_corpus(data.base_url, data.data_dir, data.num_shards, data.total_shards, data.val_shard)
    on_disk = sum(path.stat().st_size for split in paths.values() for path in split)
    train, (val,) = paths["train"], paths["val"]
    print(f"Train shards: {len(train)} in {train[0].parent}. Validation shard: {val.name} in {val.parent}.")
    print(f"{_human(on_disk)} on disk.")


if __name__ == "__main__":
    from nanochat.config import run_cli

    run_cli(main)
