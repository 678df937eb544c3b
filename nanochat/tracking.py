"""Experiment tracking: a local metrics.jsonl in the run dir (one JSON object per logged record)
that is always written, plus any of three backends, chosen together from the `logger` group
(`logger=[wandb,tensorboard,csv]`; conf/logger/*.yaml each switch one on):

- W&B (`wandb`): offline by default, no account or network needed; the run's folder and the exact
  `wandb sync <folder>` command that uploads it are printed at start and end. Its name says what
  the job is (run_name()), its config is the resolved config plus the run's derived figures
  (parameters, FLOPs per token, steps, ...), `train/tokens` and `total_training_flops` are declared
  as metrics to plot against (the x-axis stays `step`), val/bpb is summarised as its minimum, and
  system metrics (GPU utilisation, memory, power) are sampled on CUDA runs only.
- TensorBoard (`tensorboard`): event files in <run dir>/tensorboard, so `tensorboard --logdir
  outputs` (or `multirun`) shows every run.
- CSV (`csv`): <run dir>/metrics.csv, one `step,metric,value` row per logged number (the long
  format: records with different keys share one header; pandas' pivot makes it wide).

If a backend cannot start or fails mid-run, training warns once and carries on without it.

A resumed run continues the same W&B run (same id, online or offline), cuts metrics.jsonl,
samples.jsonl and metrics.csv back to where they stood when its checkpoint was written, and
TensorBoard drops its events from that step on, so every log reads as one uninterrupted run.
"""

import csv
import json
import math
import shlex
import uuid
import warnings
from pathlib import Path
from typing import Literal

from nanochat.logs import log

LOG_FILES = ("metrics.jsonl", "samples.jsonl")
CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
X_AXES = ("train/tokens", "total_training_flops")  # declared to W&B as metrics to plot against


def run_name(choices: dict[str, str | None], overrides: list[str], sweep: tuple[str, int] | None = None) -> str:
    """A W&B run name that says what the job is: the model and optimizer choices, any other group
    chosen on the command line, then each other override as leaf=value (the whole key where two
    overrides share a leaf; paths by their last part),
    e.g. `d12-adamw_muon-matrix_lr=0.01`. A sweep job adds the sweep's name and its number, which
    tell apart the jobs of one sweep and the sweeps of one day: `d4-adamw-lr=0.001 (lr_adamw #0)`."""
    parts = [choices[g] for g in ("model", "optimizer") if choices.get(g)]
    keys = [o.lstrip("+~").partition("=")[0] for o in overrides]
    leaves = [key.rpartition(".")[2] for key in keys]
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        leaf = key.rpartition(".")[2]
        if key.startswith("hydra.") or key.startswith("hydra/") or key in ("model", "optimizer", "logger"):
            continue
        if key in choices:  # another group chosen on the command line: its choice alone
            parts.append(value)
            continue
        if "/" in value:
            value = Path(value).name or value
        parts.append(f"{leaf if leaves.count(leaf) == 1 else key}={value[:24]}")  # eval.tokens vs sample.tokens
    name = "-".join(parts)
    if sweep is not None:
        name = f"{name} ({sweep[0]} #{sweep[1]})"
    return name


class Tracker:
    """Built from conf/logger/*.yaml (cheap: nothing is opened), then start()ed by rank 0 with
    what only a run knows: its dir, its config and derived figures, and what it resumes."""

    def __init__(
        self,
        wandb: bool = False,
        tensorboard: bool = False,
        csv: bool = False,
        mode: Literal["offline", "online", "disabled"] = "offline",
        project: str | None = None,
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
    ):
        """wandb / tensorboard / csv: which backends are on (each conf/logger file switches its own
        one on, so `logger=[wandb,csv]` selects both; the defaults here are "off"). The rest is
        W&B's, set by conf/logger/wandb.yaml; name null: the job's name (run_name())."""
        self.use_wandb = wandb
        self.use_tensorboard = tensorboard
        self.use_csv = csv
        self.mode = mode
        self.project = project
        self.entity = entity
        self.name = name
        self.group = group
        self.tags = list(tags)
        self.run_id: str | None = None
        self.wandb_run = None
        self.tensorboard = None
        self._csv_file = None

    @property
    def backends(self) -> list[str]:
        on = {
            "wandb": self.use_wandb and self.mode != "disabled",
            "tensorboard": self.use_tensorboard,
            "csv": self.use_csv,
        }
        return [name for name, used in on.items() if used]

    def start(
        self,
        run_dir: str | Path,
        run_config: dict,
        run_id: str | None = None,
        log_offsets: dict[str, int] | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        default_group: str | None = None,
        default_name: str | None = None,
        derived: dict | None = None,
        device_type: str = "cpu",
        start_step: int = 0,
    ) -> "Tracker":
        """Open the local logs and the backends. run_id, log_offsets and start_step come from a
        checkpoint when continuing a run (see offsets()); overrides are the job's command-line
        overrides, kept as W&B tags so the runs of a sweep tell apart; default_group and
        default_name are the W&B group and name when the logger config sets none; derived: the
        run's derived figures, added to the W&B config; device_type: system metrics on cuda only."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        continuing = log_offsets is not None
        if continuing:
            for log_file in LOG_FILES:
                self._truncate(log_file, log_offsets.get(log_file, 0))
            if CSV_FILE in log_offsets:
                self._truncate(CSV_FILE, log_offsets[CSV_FILE])
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._samples_file = open(self.run_dir / "samples.jsonl", "a", encoding="utf-8")
        # Our own id (W&B's format: 8+ lowercase alphanumerics) so that it is known, and saved in
        # checkpoints, even when W&B is off or fails to start.
        self.run_id = run_id or uuid.uuid4().hex[:12]
        if self.use_csv:
            self._csv_file = open(self.run_dir / CSV_FILE, "a", encoding="utf-8", newline="")
            self._csv = csv.writer(self._csv_file)
            if self._csv_file.tell() == 0:
                self._csv.writerow(["step", "metric", "value"])
        if self.use_tensorboard:
            self.tensorboard = self._start_tensorboard(start_step if continuing else None)
        if self.use_wandb and self.mode != "disabled":
            tags = [*self.tags, *(o[:64] for o in overrides)]  # W&B caps a tag at 64 characters
            run_config = {**run_config, **(derived or {}), "overrides": list(overrides)}
            name = self.name or default_name or self.run_dir.name
            self.wandb_run = self._start_wandb(run_config, name, self.group or default_group, tags, device_type)
            self._announce_wandb("W&B")
        return self

    def _truncate(self, log_file: str, offset: int) -> None:
        path = self.run_dir / log_file
        if path.exists():
            with open(path, "r+b") as f:
                f.truncate(offset)

    def offsets(self) -> dict[str, int]:
        """Byte length of each local log now; a checkpoint stores them for resume."""
        offsets = {"metrics.jsonl": self._metrics_file.tell(), "samples.jsonl": self._samples_file.tell()}
        if self._csv_file is not None:
            offsets[CSV_FILE] = self._csv_file.tell()
        return offsets

    def _start_tensorboard(self, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a continued run drops the events the crashed or stopped run wrote after
            # its checkpoint, as metrics.jsonl is cut back.
            return SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step, flush_secs=10)
        except Exception as error:
            warnings.warn(f"TensorBoard could not start ({type(error).__name__}: {error}); no event files.")
            return None

    def _start_wandb(self, run_config, name, group, tags, device_type):
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
                # The console is kept in <run dir>/train.log (nanochat/logs.py); W&B's stdout capture
                # would mangle the progress lines. System metrics (GPU utilisation, memory, power)
                # are sampled on CUDA runs only: on a CPU the sampler competes with training.
                settings=wandb.Settings(console="off", x_disable_stats=device_type != "cuda", silent=True),
            )
            for axis in X_AXES:  # plot anything against these in the UI; `step` stays the default
                run.define_metric(axis, summary="max")
            run.define_metric("val/bpb", summary="min")
            return run
        except Exception as error:  # any failure here must not cost the training run
            warnings.warn(f"W&B could not start ({type(error).__name__}: {error}); logging to metrics.jsonl only.")
            return None

    def _announce_wandb(self, when: str) -> None:
        run = self.wandb_run
        if run is None:
            return
        try:
            if self.mode == "offline":
                folder = run.settings.sync_dir
                log.info(f"{when} offline run in {folder}; upload it with: wandb sync {shlex.quote(str(folder))}")
            else:
                log.info(f"{when} run {run.url}")
        except Exception:  # a W&B run without these attributes (a stand-in) has nothing to say
            pass

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, **{k: _json_safe(v) for k, v in metrics.items()}}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._csv_file is not None:
            self._csv.writerows([step, key, value] for key, value in numbers.items())
            self._csv_file.flush()
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, global_step=step)
        self._to_wandb(lambda run: run.log(metrics, step=step))

    def log_samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        for prompt, completion in samples:
            self._samples_file.write(json.dumps({"step": step, "prompt": prompt, "completion": completion}) + "\n")
        self._samples_file.flush()
        if self.tensorboard is not None:
            text = "\n\n".join(f"**{prompt!r}** {completion!r}" for prompt, completion in samples)
            self.tensorboard.add_text("samples", text, global_step=step)

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
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        self._to_wandb(_close_wandb)
        self._announce_wandb("finished W&B")
        self.wandb_run = None


def _close_wandb(run) -> None:
    import wandb

    run.finish()
    # finish() asks W&B's service process to close the run's files but does not wait for it; under
    # load they were still unwritten when it returned. teardown() waits until that process has
    # exited, so the offline run announced next is complete for a `wandb sync` started at once.
    wandb.teardown()


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
    backends: list[str] = []

    def offsets(self) -> dict[str, int]:
        return {}

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        pass

    def finish(self) -> None:
        pass
