"""Signals that land where a test chooses, not where the scheduler happens to be.

A test runs train.py under LAUNCHER with one pause point in the environment; the trainer process
stops itself there (SIGSTOP), the test sees it stopped, sends what it wants to send (SIGKILL, or
SIGTERM then SIGCONT), and so the signal lands at that point however loaded the machine is:

    NANOCHAT_PAUSE_BEFORE_STEP=s   just before update s starts (updates 0..s-1 are logged, and saved
                                   where save_every says so)
    NANOCHAT_PAUSE_AT_FSYNC=k      at the k-th fsync of a checkpoint file, i.e. inside a checkpoint
                                   write (8 per single-process save: 5 files, the marker, the folder,
                                   then the parent after the rename)
    NANOCHAT_PAUSE_RANK=r          under torchrun, only rank r pauses (default 0); it writes its pid
                                   to $NANOCHAT_PAUSE_PID_FILE first. Under torchrun --max-restarts,
                                   only the first attempt pauses
"""

import os
import signal
import sys
import time
from pathlib import Path

LAUNCHER = """
import os, runpy, signal, sys

def pause():
    os.kill(os.getpid(), signal.SIGSTOP)

pause_rank = int(os.environ.get("NANOCHAT_PAUSE_RANK", "0"))
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"  # a restarted job runs on
if int(os.environ.get("RANK", "0")) == pause_rank and first_attempt:
    if "NANOCHAT_PAUSE_PID_FILE" in os.environ:
        with open(os.environ["NANOCHAT_PAUSE_PID_FILE"], "w") as f:
            f.write(str(os.getpid()))
    if "NANOCHAT_PAUSE_BEFORE_STEP" in os.environ:
        from nanochat.trainer import Trainer
        pause_step = int(os.environ["NANOCHAT_PAUSE_BEFORE_STEP"])
        train_step = Trainer.train_step
        def pausing_train_step(self, step):
            if step == pause_step:
                pause()
            return train_step(self, step)
        Trainer.train_step = pausing_train_step
    if "NANOCHAT_PAUSE_AT_FSYNC" in os.environ:
        import nanochat.checkpoint as checkpoint
        pause_call = int(os.environ["NANOCHAT_PAUSE_AT_FSYNC"])
        fsync, calls = checkpoint._fsync, [0]
        def pausing_fsync(path):
            calls[0] += 1
            if calls[0] == pause_call:
                pause()
            fsync(path)
        checkpoint._fsync = pausing_fsync
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

FSYNCS_PER_SAVE = 8
FSYNCS_BEFORE_RENAME = 7


def launcher() -> list[str]:
    """What replaces the plain interpreter in runs.train_command."""
    return [sys.executable, "-c", LAUNCHER]


def launcher_script(directory: Path) -> Path:
    """LAUNCHER as a file, for torchrun (which runs a script, not python -c)."""
    path = directory / "pausing_launcher.py"
    path.write_text(LAUNCHER)
    return path


def pause_env(**points: int) -> dict:
    """os.environ plus pause points, e.g. pause_env(before_step=13)."""
    return {**os.environ, **{f"NANOCHAT_PAUSE_{name.upper()}": str(value) for name, value in points.items()}}


def is_stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (state T in /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def has_pending(pid: int, signum: int) -> bool:
    """Whether signum is pending for the stopped process (delivered, not yet handled)."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signum - 1)) for mask in masks)


def wait_until(condition, what: str, alive=lambda: True, timeout: float = 300) -> None:
    """Poll condition() until it holds; fail naming `what` if alive() turns false or time runs out
    (a bound on a hang, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if not alive():
            raise AssertionError(f"the run ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


def wait_until_paused(process, pid: int | None = None) -> None:
    """Until the trainer (process, or the given pid under torchrun) has stopped itself."""
    pid = pid or process.pid
    wait_until(lambda: is_stopped(pid), "it reached its pause point", alive=lambda: process.poll() is None)


def continue_once_pending(pid: int, signum: int) -> None:
    """Let a paused process run on once signum (sent by the test, or forwarded by torchrun) is
    pending for it: it then handles the signal at its pause point."""
    wait_until(lambda: has_pending(pid, signum), f"signal {signum} to reach process {pid}")
    os.kill(pid, signal.SIGCONT)
