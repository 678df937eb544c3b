"""The run dir as a resource: one live run at a time, and a dir the run can create.

A live run holds an exclusive flock on <run dir>/.lock (rank 0, for the whole run); the file also
says who holds it. A second process started on the same dir, by mistake or by a scheduler that
requeued a job whose first copy is still running, is refused naming that pid and host, before it
touches anything. The lock dies with its process (a kill -9 or a lost node frees it), so it never
needs cleaning up.
"""

import datetime
import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path

from nanochat.errors import UserError

LOCK = ".lock"


class RunDirLock:
    """Held while a run writes its dir; release() (or the process ending) frees it."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK
        self._file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self._file)
            self._file.close()
            raise UserError(_in_use(run_dir, holder)) from None
        self._file.seek(0)
        self._file.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
        self._file.write(json.dumps(holder))
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def check_not_in_use(run_dir: Path) -> None:
    """Refuse a run dir that a live run holds (without taking it)."""
    path = run_dir / LOCK
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(_in_use(run_dir, _holder(file))) from None


def check_creatable(path: Path, key: str) -> None:
    """Refuse a dir the run would have to create where it cannot (a read-only or virtual file
    system, no permission), naming the setting; probes with an empty temporary dir."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise UserError(f"{key}={path} is a file, not a directory.")
    ancestor = target
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".nanochat-probe-"))
    except OSError as error:
        raise UserError(f"{key}={path} cannot be created or written: {error.strerror} in {ancestor}.") from None


def _holder(file) -> dict:
    file.seek(0)
    try:
        return json.loads(file.read())
    except ValueError:
        return {}


def _in_use(run_dir: Path, holder: dict) -> str:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"
    return f"{run_dir} is in use by a live run, {who}: wait for it to end, or use another hydra.run.dir."


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")
