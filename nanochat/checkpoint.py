"""Checkpoints as folders, one per step, made crash-safe the way torchtitan does it.

    <run_dir>/checkpoints/step_000500/
        model.pt               model weights
        optimizers.pt          one full state_dict per optimizer (AdamW moments, Muon momentum
                               buffers), when the optimizer state is replicated
        optimizers.rank<r>.pt  rank r's optimizer shard, when it is sharded (ZeRO-2)
        trainer.rank<r>.pt     rank r's data loader position and RNG states
        tokenizer.json         the run's tokenizer (plain data), so the checkpoint is usable on its own
        meta.json              step, world size, resolved config, tokenizer identity, loss EMA, W&B run id, ...
        COMPLETE               the commit marker, written last

Under torchrun rank 0 writes the shared files and every rank its own <name>.rank<r>.pt; the folder is
committed by rank 0 once every rank's files are on disk, so the run dir must be on a filesystem that
all nodes share.

A checkpoint is written into a hidden temporary folder, every file is fsync'd, the marker is
written, and only then is the folder renamed into place (an atomic rename): a kill at any moment
leaves either no new checkpoint or a whole one, and anything without the marker is ignored.
Loading uses torch.load(weights_only=True), so a checkpoint from someone else's disk cannot run
code; metadata is plain JSON.
"""

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanochat.atomic import replace_folder
from nanochat.distributed import all_gather_object, broadcast_object, is_main, lost_peer, rank, together, world_size
from nanochat.errors import UserError

COMMIT_MARKER = "COMPLETE"
META = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
PREFIX = "step_"


@dataclass
class Checkpoint:
    path: Path
    payload: dict[str, Any]  # name -> what was saved in <name>.pt
    meta: dict

    @property
    def step(self) -> int:
        return self.meta["step"]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def rank_file(name: str, rank: int) -> str:
    return f"{name}.rank{rank}.pt"


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    payload: dict[str, Any],
    meta: dict,
    keep_last: int,
    rank_payload: dict[str, Any] | None = None,
    texts: dict[str, str] | None = None,
) -> Path:
    """Write payload (each entry as <name>.pt, by rank 0), every rank's rank_payload (as
    <name>.rank<r>.pt), texts (file name -> contents, by rank 0) and meta atomically; keep the
    newest keep_last. Every rank calls this."""
    checkpoint_dir = Path(checkpoint_dir)
    rank_payload = rank_payload or {}
    final = checkpoint_dir / checkpoint_name(step)
    staging = checkpoint_dir / f".{final.name}.tmp-{broadcast_object(os.getpid())}"
    try:
        with together("creating a checkpoint folder"):
            if is_main():
                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir()
        with together(f"writing checkpoint {final}"):
            files = {rank_file(name, rank()): obj for name, obj in rank_payload.items()}
            if is_main():
                files.update({f"{name}.pt": obj for name, obj in payload.items()})
            for file_name, obj in files.items():
                torch.save(obj, staging / file_name)
            written = [staging / file_name for file_name in files]
            if is_main():
                for file_name, text in (texts or {}).items():
                    (staging / file_name).write_text(text, encoding="utf-8")
                    written.append(staging / file_name)
                (staging / META).write_text(json.dumps({"step": step, "world_size": world_size(), **meta}, indent=1))
                written.append(staging / META)
            for path in written:
                _fsync(path)
        with together(f"committing checkpoint {final}"):
            if is_main():
                _commit(staging, final, [rank_file(name, r) for name in rank_payload for r in range(world_size())])
                for old in complete_checkpoints(checkpoint_dir)[:-keep_last]:
                    shutil.rmtree(old)
    except (OSError, RuntimeError, UserError) as error:  # torch.save reports a full disk as RuntimeError
        if is_main():
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, UserError) or lost_peer(error):
            raise
        raise UserError(
            f"cannot write checkpoint {final} ({_reason(error)}); the checkpoints before it are intact."
        ) from None
    return final


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error).strip().splitlines()[0]


def _commit(staging: Path, final: Path, rank_files: list[str]) -> None:
    """Mark the staging folder complete and rename it into place (rank 0, after every rank wrote)."""
    missing = [name for name in rank_files if not (staging / name).is_file()]
    if missing:
        raise UserError(
            f"rank 0 cannot see {', '.join(missing)} that other ranks wrote into {staging}: the run dir must be on "
            "a filesystem shared by every node (set hydra.run.dir to a shared path)."
        )
    (staging / COMMIT_MARKER).write_text("")
    _fsync(staging / COMMIT_MARKER)
    _fsync(staging)
    replace_folder(staging, final)  # a step saved before is replaced: a resumed run passing it again
    _fsync(final.parent)


def remove_stale_temporaries(checkpoint_dir: str | Path) -> None:
    """Delete what killed saves left behind (hidden .step_* folders); only one process writes here."""
    for leftover in Path(checkpoint_dir).glob(f".{PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def is_complete(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(PREFIX) and (path / COMMIT_MARKER).is_file()


def complete_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first; temporary and half-written folders are skipped."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.iterdir() if is_complete(p))


class UnreadableCheckpointFile(Exception):
    """A file of a committed checkpoint that does not load (truncated, corrupted, not ours)."""

    def __init__(self, path: Path, cause: Exception):
        super().__init__(f"{path} ({type(cause).__name__})")
        self.path = path
        self.cause = cause


def load_checkpoint(path: str | Path, map_location="cpu", names: tuple[str, ...] | None = None) -> Checkpoint:
    """The shared files and this rank's own; payload keys drop the .rank<r> suffix. names: only
    these payload entries (e.g. ("model",) for inference), else all."""
    path = Path(path)

    def read(file: Path, load):
        try:
            return load(file)
        except Exception as error:  # whatever a damaged file raises, name the file
            raise UnreadableCheckpointFile(file, error) from error

    meta = read(path / META, lambda file: json.loads(file.read_text()))
    mine = f".rank{rank()}"
    payload = {
        file.stem.removesuffix(mine): read(file, lambda f: torch.load(f, map_location=map_location, weights_only=True))
        for file in sorted(path.glob("*.pt"))
        if (".rank" not in file.stem or file.stem.endswith(mine))
        and (names is None or file.stem.removesuffix(mine) in names)
    }
    return Checkpoint(path, payload, meta)


def resume_candidates(resume: str, run_dir: Path) -> list[Path]:
    """The checkpoints `resume` points at, newest first.

    checkpoint.resume=none: none. checkpoint.resume=auto: those in this run dir (none is fine: a fresh start).
    checkpoint.resume=<path>: a checkpoint folder, or a run dir / checkpoints dir holding some; it must exist
    and hold at least one complete checkpoint.
    """
    if resume == "none":
        return []
    if resume == "auto":
        return complete_checkpoints(run_dir / "checkpoints")[::-1]
    return checkpoints_at(resume, f"checkpoint.resume={resume}")


def checkpoints_at(location: str | Path, named_as: str) -> list[Path]:
    """The complete checkpoints a path holds, newest first: a checkpoint folder, a checkpoints dir
    or a run dir. named_as is how a refusal names the path (a config key, or the path itself)."""
    path = Path(location).expanduser()
    if not path.exists():
        raise UserError(f"{named_as} does not exist.")
    if is_complete(path):
        return [path]
    for folder in (path, path / "checkpoints"):
        found = complete_checkpoints(folder)
        if found:
            return found[::-1]
    raise UserError(
        f"{named_as} holds no complete checkpoint (a {PREFIX}NNNNNN folder with its {COMMIT_MARKER} marker)."
    )


def load_newest_readable(
    candidates: list[Path], map_location="cpu", names: tuple[str, ...] | None = None
) -> Checkpoint | None:
    """Load the newest candidate that reads on every rank; warn about each corrupt one skipped on
    the way. Every rank calls this with the same candidates."""
    for path in candidates:
        try:
            checkpoint, problem = load_checkpoint(path, map_location, names), None
        except UnreadableCheckpointFile as error:
            checkpoint, problem = None, f"checkpoint file {error.path} is unreadable ({type(error.cause).__name__})"
        problems = [p for p in all_gather_object(problem) if p is not None]
        if not problems:
            return checkpoint
        if is_main():
            warnings.warn(f"{'; '.join(problems)}; trying an older checkpoint.")
    if candidates:
        raise UserError(f"no checkpoint under {candidates[0].parent} could be read; see the warnings above.")
    return None


def load_rank_files(checkpoint: Checkpoint, name: str) -> list:
    """Every rank's <name>.rank<r>.pt of a checkpoint, in rank order: what a run on another number
    of ranks, or with another optimizer layout, re-splits (see Trainer.restore)."""
    files = [checkpoint.path / rank_file(name, r) for r in range(checkpoint.meta["world_size"])]
    loaded = []
    for file in files:
        try:
            loaded.append(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as error:  # whatever a damaged file raises, name the file
            raise UserError(f"cannot read {file} ({type(error).__name__}: {error}).") from None
    return loaded


def check_model_matches(checkpoint: Checkpoint, model: torch.nn.Module, model_differences: str) -> None:
    """Refuse a checkpoint whose parameters (names and shapes) differ from this run's model.

    model may live on the meta device; model_differences names the model config keys that differ
    (empty if none), which is what the refusal quotes."""
    saved = {name: tuple(tensor.shape) for name, tensor in checkpoint.payload["model"].items()}
    ours = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if saved == ours:
        return
    if not model_differences:
        differing = sorted(name for name in saved.keys() | ours.keys() if saved.get(name) != ours.get(name))
        model_differences = "its parameters " + ", ".join(differing[:5]) + (", ..." if len(differing) > 5 else "")
    raise UserError(f"cannot resume from {checkpoint.path}: the model differs in {model_differences}.")


def check_tokenizer_matches(checkpoint: Checkpoint, tokenizer_identity: dict) -> None:
    """Refuse a checkpoint trained with another tokenizer: its token ids would mean other strings."""
    saved = checkpoint.meta["tokenizer"]
    if saved != tokenizer_identity:
        raise UserError(
            f"cannot resume from {checkpoint.path}: it was trained with tokenizer {saved['fingerprint']} "
            f"(vocab {saved['vocab_size']}), this run's tokenizer is {tokenizer_identity['fingerprint']} "
            f"(vocab {tokenizer_identity['vocab_size']})."
        )
