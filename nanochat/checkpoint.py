"""Checkpoints as folders, one per step, made crash-safe the way torchtitan does it.

    <run_dir>/checkpoints/step_000500/
        model.pt          model weights (tensors only)
        optimizers.pt     a list with one state_dict per optimizer
        meta.json         step, resolved config, tokenizer identity, ... (plain JSON)
        COMPLETE          written last: a folder without it is ignored

Files are written into a hidden temporary folder, fsync'd, and the folder is renamed into place
in one atomic step, so a kill at any moment leaves either no checkpoint or a whole one. Loading
uses torch.load(weights_only=True): a checkpoint from someone else's disk cannot run code.
"""

import json
import os
import shutil
from pathlib import Path

import torch

COMMIT_MARKER = "COMPLETE"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(checkpoint_dir: str | Path, step: int, model_state: dict, optimizer_states: list[dict], meta: dict) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / checkpoint_name(step)
    staging = checkpoint_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    torch.save(model_state, staging / "model.pt")
    torch.save(optimizer_states, staging / "optimizers.pt")
    (staging / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    (staging / COMMIT_MARKER).write_text("")
    for path in staging.iterdir():
        _fsync_file(path)
    _fsync_dir(staging)
    if final.exists():  # the same step saved again (e.g. a resumed run re-reaching it)
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync_dir(checkpoint_dir)
    return final


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (path / COMMIT_MARKER).exists()


def complete_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first; temporary and half-written folders are skipped."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.glob("step_*") if is_complete(p))


def load_checkpoint(path: str | Path, map_location="cpu") -> tuple[dict, list[dict], dict]:
    """(model state, optimizer states, meta) of one committed checkpoint folder."""
    path = Path(path)
    model_state = torch.load(path / "model.pt", map_location=map_location, weights_only=True)
    optimizer_states = torch.load(path / "optimizers.pt", map_location=map_location, weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    return model_state, optimizer_states, meta
