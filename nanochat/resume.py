"""What a run starts from, and how its config may differ from the checkpoint's.

Two ways to start from a checkpoint, told apart by where it lies:

- Continuing a run: `checkpoint.resume=auto` (the default) finds the newest complete checkpoint in
  this run's own dir. The composed config must equal the checkpoint's, except keys that may change
  mid-run (CHANGEABLE: run length, eval / CORE / sample / save / log cadence, the logger, keep_last) and
  the keys listed in `checkpoint.accept_changes`. Any other difference is refused, naming each key
  with both values and the override that accepts it. A continued run is the same run: same W&B
  run, and the local logs cut back to the checkpoint.
- Starting a new run from a checkpoint: `checkpoint.resume=<path>` outside this run dir. Weights,
  optimizer moments, step, data position and RNG states come from the checkpoint; every
  hyperparameter is this run's (the optimizers keep the lrs, betas, eps, weight decay and momentum
  schedule they were built with, and the schedule, grad clip, ... are this run's config). The
  differences are printed, not refused; only the model's parameter shapes and the tokenizer must
  match.

Every start appends a line to <run dir>/invocations.jsonl (time, host, overrides, what it resumed
from and which changes it accepted), since Hydra's .hydra/overrides.yaml keeps only the last.
"""

import datetime
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.checkpoint import META, resume_candidates
from nanochat.errors import UserError, show

# Keys (or whole nodes) a continued run may change without asking.
CHANGEABLE = (
    "trainer.num_iterations",
    "trainer.target_flops",
    "trainer.target_param_data_ratio",
    "trainer.log_every",
    "trainer.device_batch_size",  # how a step's rows are split into micro-steps, not which rows (LaneLoader)
    "trainer.skip_nonfinite",
    "eval.every",
    # CORE during training reads the weights and changes nothing the next steps depend on
    "eval.core_every",
    "eval.core_max_per_task",
    "eval.core_bundle",
    "eval.core_sha256",
    "eval.core_cache_dir",
    "sample.every",
    "checkpoint.save_every",
    "checkpoint.keep_last",
    "checkpoint.resume",
    "checkpoint.accept_changes",
    "checkpoint.write_errors",
    "system.shard_optimizer",  # the optimizer state is re-split on resume (nanochat/data_parallel.py)
    "system.quiet_ranks",
    "logger",
    "profile",
)
HISTORY = "invocations.jsonl"


@dataclass
class ResumePlan:
    candidates: list[Path] = field(default_factory=list)  # newest first; empty: a fresh start
    continuing: bool = False  # this run's own checkpoint (same run), or another run's (a new run)
    differences: list[tuple[str, object, object]] = field(default_factory=list)  # (key, checkpoint's, this run's)

    def describe_differences(self) -> str:
        return ", ".join(
            f"{key} ({show(saved)} in the checkpoint, {show(now)} now)" for key, saved, now in self.differences
        )


def flatten(config: dict, prefix: str = "") -> dict:
    """{"optimizer.lr": 0.003, ...}: nested dicts to dotted keys (lists stay values)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for every dotted key that differs; a missing key is None."""
    saved, now = flatten(saved), flatten(now)
    return [
        (key, saved.get(key), now.get(key))
        for key in sorted(saved.keys() | now.keys())
        if saved.get(key) != now.get(key)
    ]


def _is_under(key: str, nodes) -> bool:
    return any(key == node or key.startswith(node + ".") for node in nodes)


def _saved_config(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())["config"]
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"cannot read the config of checkpoint {path} ({type(error).__name__}: {error}).") from None


def plan_resume(config: dict, run_dir: Path) -> ResumePlan:
    """Where this run starts, and the config differences that starting there implies; refuses a
    continued run whose config changed outside CHANGEABLE and checkpoint.accept_changes.

    config: the resolved config (plain containers). Cheap: reads only the newest meta.json."""
    settings = config["checkpoint"]
    candidates = resume_candidates(settings["resume"], run_dir)
    if not candidates:
        return ResumePlan()
    newest = candidates[0]
    continuing = Path(run_dir).resolve() in newest.resolve().parents
    differences = config_differences(_saved_config(newest), config)
    plan = ResumePlan(candidates, continuing, differences)
    if continuing:
        accepted = list(settings["accept_changes"])
        refused = [d for d in differences if not _is_under(d[0], CHANGEABLE) and not _is_under(d[0], accepted)]
        if refused:
            keys = [key for key, _, _ in refused]
            raise UserError(
                f"cannot continue {run_dir} from {newest.name}: its config differs from the checkpoint's in "
                f"{ResumePlan(differences=refused).describe_differences()}; to continue with the new values "
                f"add checkpoint.accept_changes=[{','.join(keys)}], or start a new run from the checkpoint "
                f"with checkpoint.resume={newest} and another hydra.run.dir."
            )
    return plan


def record_invocation(run_dir: Path, overrides: list[str], plan: ResumePlan, checkpoint, world_size: int) -> None:
    """Append this start to <run dir>/invocations.jsonl (rank 0 only); checkpoint: the one loaded, or None."""
    entry = {
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "world_size": world_size,
        "overrides": list(overrides),
        "resumed_from": str(checkpoint.path) if checkpoint is not None else None,
        "step": checkpoint.step if checkpoint is not None else 0,
        "continuing": plan.continuing,
        "changed": {key: [saved, now] for key, saved, now in plan.differences},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / HISTORY, "a", encoding="utf-8") as history:
        history.write(json.dumps(entry, default=str) + "\n")
