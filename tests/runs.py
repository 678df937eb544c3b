"""Running `python train.py` the way a user does, for the end-to-end tests, and reading what it wrote."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_command(*args: str, launcher: list[str] | None = None) -> list[str]:
    """launcher replaces the plain interpreter, e.g. with one that patches a module first."""
    return [*(launcher or [sys.executable]), str(REPO / "train.py"), *args]


def run_train(
    *args: str, cwd: Path | None = None, env: dict | None = None, launcher: list[str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(*args, launcher=launcher), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def start_train(*args: str, launcher: list[str] | None = None, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        train_command(*args, launcher=launcher), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
