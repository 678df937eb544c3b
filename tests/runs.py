"""Training runs for the end-to-end tests, and reading what they wrote.

assemble_run() / train() build a run in this process from the composed config, as train.py does,
for most tests. run_train() / start_train() run `python train.py` the way a user does, for what
only a process shows (signals, exit codes, torchrun): those tests are marked slow, and a test that
is not marked slow cannot start one (conftest.py enforces it), so `pytest -m "not slow"` trains in
this process only.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from configs import compose

from nanochat.assemble import Run, assemble
from nanochat.checkpoint import TOKENIZER_FILE, save_checkpoint
from nanochat.config import compose_cli, job_name

REPO = Path(__file__).resolve().parents[1]
SUBPROCESSES_ALLOWED = {"now": False}  # set by conftest.py for tests marked slow


def assemble_run(*overrides: str, run_dir: Path) -> Run:
    """As train.py assembles a single run: the job's overrides and W&B name from the command line."""
    name = job_name(compose_cli(list(overrides)).hydra)
    return assemble(compose(*overrides), run_dir, list(overrides), name=name)


def train(*overrides: str, run_dir: Path) -> dict:
    """Train in this process; returns the final metrics (val/bpb, ...) and leaves run_dir as train.py would."""
    return assemble_run(*overrides, run_dir=run_dir).fit()


def train_command(*args: str, launcher: list[str] | None = None) -> list[str]:
    """launcher replaces the plain interpreter, e.g. with one that patches a module first."""
    assert SUBPROCESSES_ALLOWED["now"], "a test that starts train.py (or torchrun) must be marked slow"
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


def checkpoint_of(run_dir: Path, model_node: dict, model: torch.nn.Module, tokenizer, step: int = 1) -> Path:
    """A run dir holding one complete checkpoint of `model` (built by model_node's _target_ from its
    shape keys) and its tokenizer, as a finished run leaves it, for the tools that read one; the
    weights are whatever the test gave the model, no training needed."""
    identity = {"vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint()}
    meta = {"config": {"model": model_node}, "tokenizer": identity, "sharded_optimizer": False}
    save_checkpoint(
        run_dir / "checkpoints",
        step,
        {"model": model.state_dict()},
        meta,
        keep_last=2,
        texts={TOKENIZER_FILE: tokenizer.to_json()},
    )
    return run_dir
