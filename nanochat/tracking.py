"""Experiment tracking: Weights & Biases when it is wanted and works, and always a local
metrics.jsonl in the run dir (one JSON object per logged step), so nothing depends on W&B.

W&B runs offline by default: no account or network needed, and `wandb sync <run_dir>/wandb`
uploads the run later. If W&B cannot start, training warns once and carries on with local logs.

A resumed run continues the same W&B run (same id, online or offline) and cuts metrics.jsonl and
samples.jsonl back to where they stood when its checkpoint was written, so the files read as one
uninterrupted run.
"""

import json
import math
import uuid
import warnings
from pathlib import Path
from typing import Literal

LOG_FILES = ("metrics.jsonl", "samples.jsonl")


class Tracker:
    """Built from conf/logger/*.yaml (cheap: nothing is opened), then start()ed by the trainer's
    rank 0 with what only a run knows: its dir, its config, and what it resumes."""

    def __init__(
        self,
        backend: Literal["wandb", "none"],
        mode: Literal["offline", "online", "disabled"] = "disabled",
        project: str | None = None,
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
    ):
        """Everything but backend is W&B's and has no meaning for backend=none (hence the neutral
        defaults; conf/logger/wandb.yaml sets each one)."""
        self.backend = backend
        self.mode = mode
        self.project = project
        self.entity = entity
        self.name = name
        self.group = group
        self.tags = list(tags)
        self.run_id: str | None = None
        self.wandb_run = None

    def start(
        self,
        run_dir: str | Path,
        run_config: dict,
        run_id: str | None = None,
        log_offsets: dict[str, int] | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        default_group: str | None = None,
    ) -> "Tracker":
        """Open the local logs and the W&B run. run_id and log_offsets come from a checkpoint when
        continuing a run (see offsets()); overrides are the job's command-line overrides, kept as W&B
        tags so the runs of a sweep tell apart; default_group is the W&B group when none is set."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if log_offsets is not None:
            for log_file in LOG_FILES:
                path = self.run_dir / log_file
                if path.exists():
                    with open(path, "r+b") as f:
                        f.truncate(log_offsets.get(log_file, 0))
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._samples_file = open(self.run_dir / "samples.jsonl", "a", encoding="utf-8")
        # Our own id (W&B's format: 8+ lowercase alphanumerics) so that it is known, and saved in
        # checkpoints, even when W&B is off or fails to start.
        self.run_id = run_id or uuid.uuid4().hex[:12]
        if self.backend == "wandb" and self.mode != "disabled":
            tags = [*self.tags, *(o[:64] for o in overrides)]  # W&B caps a tag at 64 characters
            run_config = {**run_config, "overrides": list(overrides)}
            self.wandb_run = self._start_wandb(
                run_config, self.name or self.run_dir.name, self.group or default_group, tags
            )
        return self

    def offsets(self) -> dict[str, int]:
        """Byte length of each local log now; a checkpoint stores them for resume."""
        return {"metrics.jsonl": self._metrics_file.tell(), "samples.jsonl": self._samples_file.tell()}

    def _start_wandb(self, run_config, name, group, tags):
        try:
            import wandb

            run = wandb.init(
                project=self.project,
                entity=self.entity,
                name=name,
                group=group,
                tags=list(tags),
                config=run_config,
                dir=str(self.run_dir),
                mode=self.mode,
                id=self.run_id,
                resume="allow",
                job_type="train",
                # The loop reports its own timings; W&B's samplers and stdout capture would only
                # compete for CPU and mangle the progress line.
                settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
            )
            run.define_metric("val/bpb", summary="min")
            return run
        except Exception as error:  # any failure here must not cost the training run
            warnings.warn(f"W&B could not start ({type(error).__name__}: {error}); logging to metrics.jsonl only.")
            return None

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, **{k: _json_safe(v) for k, v in metrics.items()}}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        self._to_wandb(lambda run: run.log(metrics, step=step))

    def log_samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        for prompt, completion in samples:
            self._samples_file.write(json.dumps({"step": step, "prompt": prompt, "completion": completion}) + "\n")
        self._samples_file.flush()

        def table(run):
            import wandb

            rows = [[step, p, c] for p, c in samples]
            run.log({"samples": wandb.Table(columns=["step", "prompt", "completion"], data=rows)}, step=step)

        self._to_wandb(table)

    def _to_wandb(self, send) -> None:
        """W&B failing in the middle of a run (a full disk under wandb/, a dead service, the network)
        costs one warning and W&B itself, never the run: metrics.jsonl goes on."""
        if self.wandb_run is None:
            return
        try:
            send(self.wandb_run)
        except Exception as error:
            warnings.warn(f"W&B failed ({type(error).__name__}: {error}); logging to metrics.jsonl only from now on.")
            self.wandb_run = None

    def finish(self) -> None:
        self._metrics_file.close()
        self._samples_file.close()
        self._to_wandb(lambda run: run.finish())
        self.wandb_run = None


def _json_safe(value):
    """JSON has no NaN or infinity; a diverged loss is logged as null rather than as invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class SilentTracker:
    """What ranks other than 0 log through under torchrun: nothing. Rank 0 logs the run's metrics,
    which are already averaged or summed over ranks, so one run dir holds one metrics.jsonl and one
    W&B run."""

    run_id = None

    def offsets(self) -> dict[str, int]:
        return {}

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        pass

    def finish(self) -> None:
        pass
