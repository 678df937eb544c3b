"""The run's console, kept: every line a run prints goes through Python logging, to the terminal and
to <run dir>/train.log, so the setup summary, progress lines, warnings and results are on disk.

    log = logging.getLogger("nanochat")   # what the library writes to (log.info for a line)
    with RunLog(run_dir, rank, quiet):     # a run's handlers: console, and train.log on rank 0
        ...
    with phase("val bpb", "65,536 tokens") as done:   # a line as a long phase starts, one as it ends
        done("val bpb 2.1700")

Rank aware under torchrun: rank 0 writes the console and train.log; other ranks write only to their
console, each line prefixed with their rank, and (system.quiet_ranks) only warnings and errors.
Python warnings (warnings.warn) go to the same place while a RunLog is open. Hydra's own job
logging is switched off (conf/config.yaml: hydra/job_logging=none) so that it does not add a
second, differently formatted copy of each line.
"""

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

LOG_FILE = "train.log"
log = logging.getLogger("nanochat")
log.setLevel(logging.INFO)
log.propagate = False  # our handlers only: a root handler (Hydra's, pytest's) would print each line twice


class _Console(logging.StreamHandler):
    """Lines to sys.stdout, warnings and errors to sys.stderr (as print and warnings.warn would),
    whatever those are at the time of each line (pytest's capture, a redirect)."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        # Not setStream(): it flushes the stream before, which may be closed by now (a capture that ended).
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


# Outside a run (command-line tools, a notebook), lines still reach the terminal.
_default_console = _Console()
log.addHandler(_default_console)


class RunLog:
    """A run's logging handlers; open from the start of assemble() to the end of fit()."""

    def __init__(self, run_dir: Path | None, rank: int = 0, quiet: bool = False):
        for handler in list(log.handlers):  # a previous run in this process (tests, sweeps)
            if getattr(handler, "nanochat_run", False):
                log.removeHandler(handler)
                handler.close()
        log.removeHandler(_default_console)
        prefix = f"[rank {rank}] " if rank else ""
        console = _Console()
        console.setFormatter(logging.Formatter(prefix + "%(message)s"))
        console.setLevel(logging.WARNING if rank and quiet else logging.INFO)
        self.handlers: list[logging.Handler] = [console]
        self.path = None
        if rank == 0 and run_dir is not None:
            self.path = Path(run_dir) / LOG_FILE
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = logging.FileHandler(self.path, encoding="utf-8")  # appends: a resumed run goes on in it
            file.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
            self.handlers.append(file)
        for handler in self.handlers:
            handler.nanochat_run = True
            log.addHandler(handler)
        self._showwarning = warnings.showwarning
        warnings.showwarning = _log_warning

    def to_file(self, message: str) -> None:
        """A line for train.log only: an error the caller reports on the terminal itself."""
        for handler in self.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.emit(logging.LogRecord("nanochat", logging.ERROR, __file__, 0, message, None, None))

    def close(self) -> None:
        if warnings.showwarning is _log_warning:
            warnings.showwarning = self._showwarning
        for handler in self.handlers:
            log.removeHandler(handler)
            handler.close()
        if not any(getattr(h, "nanochat_run", False) for h in log.handlers):
            log.addHandler(_default_console)

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    log.warning(f"warning: {message}")


@contextlib.contextmanager
def phase(what: str, size: str) -> Iterator[Callable[[str], None]]:
    """'<what>: <size> ...' as the phase starts; at its end '<what> done in 1.2s' or, when the body
    called done(result), '<result> (<what> in 1.2s)'."""
    log.info(f"{what}: {size} ...")
    start = time.perf_counter()
    result: list[str] = []
    yield result.append
    seconds = time.perf_counter() - start
    log.info(f"{result[-1]} | {seconds:.1f}s" if result else f"{what} done in {seconds:.1f}s")
