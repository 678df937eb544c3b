"""Writes that a killed process never leaves half-done: a file or a folder is built under a hidden
temporary name beside its final one and renamed into place, so a reader sees the old one or the new
one, never a part of either."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary file next to `path`; on success fsyncs it and renames it to `path`.

    The temporary name starts with "." and ends in ".tmp", so no glob for visible files matches it;
    it is created with open(), not mkstemp, so the final file gets the usual umask permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.open("xb").close()
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_folder(staging: Path, final: Path) -> None:
    """Renames the finished folder `staging` to `final`. A folder already at `final` (a rename cannot
    replace a non-empty one) is renamed aside to a hidden ".<name>.<id>.old" first and removed once
    the new one is in place, so `final` is missing only between two renames."""
    if final.exists():
        displaced = final.with_name(f".{final.name}.{uuid.uuid4().hex}.old")
        os.rename(final, displaced)
        os.rename(staging, final)
        shutil.rmtree(displaced)
    else:
        os.rename(staging, final)
