"""A local report of one run or a whole sweep, from the files each run writes, with no W&B needed.

    python -m nanochat.report multirun/2025-01-01/12-00-00          # a sweep dir: one line per job
    python -m nanochat.report outputs/my_run --out /tmp/my_report   # a single run dir

Writes three files into --out (default: the dir given):

- report.png: train loss EMA and val bpb, each against step and against total training FLOPs
  (log scale), one line per run, labelled by the overrides that differ between the runs;
  incomplete runs are dashed.
- report.md and report.csv: one row per run: its overrides, steps completed, final train loss
  EMA, final and min val bpb, median tokens/s and MFU, total training time, and its status.

Metrics come from each run's metrics.jsonl alone; .hydra/overrides.yaml supplies the labels and
.hydra/config.yaml the number of updates the run was asked for, when they exist.

A run is `complete` when its metrics.jsonl reads to the end and its last evaluation is the
final one the trainer logs after its last update: a val record at step N where N = the last train
step + 1 and, when .hydra/config.yaml fixes trainer.num_iterations, N equals it (so a run killed
right after an intermediate evaluation does not pass for a shorter finished one). Anything else
(a line cut mid-write, a crash, a SIGTERM stop, a run still going) is `incomplete`: it is read up
to the first bad line and reported with what it logged, never a crash.
"""

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nanochat.errors import UserError

METRICS_FILE = "metrics.jsonl"
TABLE_COLUMNS = (
    "run",
    "overrides",
    "steps",
    "final_train_loss_ema",
    "final_val_bpb",
    "min_val_bpb",
    "median_tok_per_sec",
    "median_mfu_percent",
    "total_training_time_s",
    "status",
)


@dataclass
class Run:
    """What one run dir logged. `train` and `evals` are its metrics.jsonl records in file order."""

    path: Path
    name: str
    overrides: list[str] = field(default_factory=list)
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    problem: str | None = None  # why the run counts as incomplete; None when it finished

    @property
    def status(self) -> str:
        return "complete" if self.problem is None else "incomplete"

    @property
    def steps_completed(self) -> int:
        """Optimizer updates done: train record `step` is the (step+1)-th update."""
        return self.train[-1]["step"] + 1 if self.train else 0

    @property
    def final_loss_ema(self) -> float:
        return _number(self.train[-1].get("train/loss_ema")) if self.train else math.nan

    @property
    def final_val_bpb(self) -> float:
        return _number(self.evals[-1].get("val/bpb")) if self.evals else math.nan

    @property
    def min_val_bpb(self) -> float:
        values = [v for v in (_number(r.get("val/bpb")) for r in self.evals) if not math.isnan(v)]
        return min(values, default=math.nan)

    # Medians, not means: the first steps (allocator warm-up, compilation) and the odd stall
    # from a shared machine would drag a mean far from the steady-state speed.
    @property
    def median_tok_per_sec(self) -> float:
        return _median(r.get("train/tok_per_sec") for r in self.train)

    @property
    def median_mfu(self) -> float:
        return _median(r.get("train/mfu") for r in self.train)

    @property
    def training_time(self) -> float:
        return _number(self.train[-1].get("total_training_time")) if self.train else math.nan

    def eval_flops(self) -> np.ndarray:
        """Total training FLOPs behind each evaluation.

        Val records carry their FLOPs now (those of the s updates before step s) and are read as
        they are. Older runs' carry none: their val record at step s measures the model after s
        updates, and their train record at step k holds the FLOPs after k+1 updates, so the value
        wanted is the train record at step s-1 (0 at step 0). Interpolating over (k+1, FLOPs) from (0, 0)
        gives exactly that record when it was logged and, as FLOPs grow linearly with updates,
        the right value when trainer.log_every skipped it; an evaluation after the last logged
        update (a run cut off mid-file) is extrapolated at the last record's FLOPs per update.
        """
        if self.evals and all("total_training_flops" in r for r in self.evals):  # logged with the evaluation
            return np.array([_number(r["total_training_flops"]) for r in self.evals])
        if not self.train:
            return np.full(len(self.evals), math.nan)
        updates = np.array([0] + [r["step"] + 1 for r in self.train])
        flops = np.array([0.0] + [_number(r.get("total_training_flops")) for r in self.train])
        eval_steps = np.array([r["step"] for r in self.evals])
        eval_flops = np.interp(eval_steps, updates, flops)
        beyond = eval_steps > updates[-1]
        eval_flops[beyond] = eval_steps[beyond] * flops[-1] / updates[-1]
        return eval_flops


def _number(value) -> float:
    """A logged value as a float; the tracker writes a diverged (NaN/inf) value as null."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def _median(values) -> float:
    finite = [v for v in map(_number, values) if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def _natural_key(path: Path) -> list:
    """Sort job dirs as 0, 1, 2, ..., 10 rather than 0, 1, 10, 2."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def find_runs(directory: str | Path) -> list[Path]:
    """The run dirs in `directory`: itself if it holds a metrics.jsonl, else every dir below it
    that does (the jobs of a sweep, at any depth), in natural order. Hydra job dirs below it
    without one (a job that failed before its first step) are included too, so that the report
    shows them as incomplete rather than leaving them out."""
    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"{directory} does not exist; give a run dir or a sweep dir.")
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; give a run dir or a sweep dir.")
    if (directory / METRICS_FILE).is_file():
        return [directory]
    logged = {p.parent for p in directory.rglob(METRICS_FILE) if p.is_file()}
    if not logged:
        raise UserError(
            f"{directory} holds no {METRICS_FILE}, neither itself nor in any subdirectory; "
            "is it a run dir or a sweep dir whose jobs have started?"
        )
    hydra_jobs = {p.parent.parent for p in directory.rglob(".hydra/overrides.yaml")}
    return sorted(logged | hydra_jobs, key=_natural_key)


def _read_metrics(path: Path) -> tuple[list[dict], list[dict], str | None]:
    """Train and eval records, read up to the first line that is not a whole JSON object."""
    train, evals = [], []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return train, evals, f"no {METRICS_FILE} (the job stopped before its first step)"
    except OSError as error:
        return train, evals, f"its {METRICS_FILE} cannot be read ({error.strerror})"
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            return train, evals, f"{METRICS_FILE} line {line_number} is cut off or not a JSON record"
        if "val/bpb" in record:
            evals.append(record)
        elif "train/loss" in record:
            train.append(record)
    return train, evals, None


def _read_yaml(path: Path):
    """A .hydra file's content, or None when it is missing or unreadable: it only adds context."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _configured_updates(run_dir: Path) -> int | None:
    """trainer.num_iterations when the run's config fixes it; None when the trainer derives it."""
    config = _read_yaml(run_dir / ".hydra" / "config.yaml")
    trainer = config.get("trainer") if isinstance(config, dict) else None
    num_iterations = trainer.get("num_iterations") if isinstance(trainer, dict) else None
    is_count = isinstance(num_iterations, int) and not isinstance(num_iterations, bool)
    return num_iterations if is_count and num_iterations > 0 else None


def _incompleteness(train: list[dict], evals: list[dict], configured_updates: int | None) -> str | None:
    if not train:
        return "no train step was logged"
    final_step = train[-1]["step"] + 1
    if not evals or evals[-1]["step"] != final_step:
        return f"no final evaluation after its last update ({final_step} updates logged)"
    if configured_updates is not None and final_step != configured_updates:
        return f"stopped after {final_step} of {configured_updates} updates"
    return None


def load_run(path: str | Path, root: str | Path | None = None) -> Run:
    """Read one run dir. Its name is its path relative to `root` (the dir the report is about),
    or its own dir name when it is that dir."""
    path = Path(path)
    name = path.name
    if root is not None and path.resolve() != Path(root).resolve():
        name = path.resolve().relative_to(Path(root).resolve()).as_posix()
    overrides = _read_yaml(path / ".hydra" / "overrides.yaml")
    overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
    train, evals, problem = _read_metrics(path / METRICS_FILE)
    problem = problem or _incompleteness(train, evals, _configured_updates(path))
    return Run(path=path, name=name, overrides=overrides, train=train, evals=evals, problem=problem)


def _split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def run_labels(runs: list[Run]) -> list[str]:
    """Legend labels: each run's overrides whose values differ across the runs (what the sweep
    varied), keys cut to their last part where that stays unambiguous (`matrix_lr=0.01`); the
    run's name where the overrides say nothing (one run, identical overrides) or are ambiguous.
    A run without .hydra/overrides.yaml does not count as varying every key."""
    settings = [dict(map(_split_override, run.overrides)) for run in runs]
    known = [s for s in settings if s]
    keys = list(dict.fromkeys(key for s in known for key in s))
    varied = [key for key in keys if len({s.get(key) for s in known}) > 1]
    short = {key: key.rsplit(".", 1)[-1] for key in varied}
    if len(set(short.values())) < len(short):
        short = {key: key for key in varied}
    labels = [" ".join(f"{short[k]}={s[k]}" for k in varied if k in s) or run.name for run, s in zip(runs, settings)]
    if len(set(labels)) < len(labels):
        labels = [label if label == run.name else f"{run.name}: {label}" for run, label in zip(runs, labels)]
    return labels


def _table_rows(runs: list[Run]) -> list[dict]:
    return [
        {
            "run": run.name,
            "overrides": " ".join(run.overrides),
            "steps": run.steps_completed,
            "final_train_loss_ema": run.final_loss_ema,
            "final_val_bpb": run.final_val_bpb,
            "min_val_bpb": run.min_val_bpb,
            "median_tok_per_sec": run.median_tok_per_sec,
            "median_mfu_percent": run.median_mfu,
            "total_training_time_s": run.training_time,
            "status": run.status,
        }
        for run in runs
    ]


def _markdown_cell(column: str, value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    text = str(value).replace("|", "\\|")
    return f"`{text}`" if column == "overrides" and text else text


def _shared_overrides(runs: list[Run]) -> list[str]:
    """Overrides every run of a sweep has (the fixed part of its command line); none for one run."""
    if len(runs) < 2:
        return []
    return [o for o in runs[0].overrides if all(o in run.overrides for run in runs[1:])]


def write_table(runs: list[Run], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    """report.csv (every override, full precision, empty cell for a missing value) and report.md
    (overrides shared by all runs said once above the table, so each row shows what it varied);
    returns both paths."""
    out_dir = Path(out_dir)
    rows = _table_rows(runs)
    csv_path = out_dir / "report.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})

    shared = _shared_overrides(runs)
    lines = [f"# {title or 'Report'}", ""]
    if shared:
        lines += [f"Overrides shared by every run: `{' '.join(shared)}`", ""]
    lines += ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for run, row in zip(runs, rows):
        row = {**row, "overrides": " ".join(o for o in run.overrides if o not in shared)}
        lines.append("| " + " | ".join(_markdown_cell(c, row[c]) for c in TABLE_COLUMNS) + " |")
    incomplete = [run for run in runs if run.problem is not None]
    if incomplete:
        lines += ["", "Incomplete runs:", ""] + [f"- `{run.name}`: {run.problem}." for run in incomplete]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def _colors(count: int) -> list:
    """Distinct qualitative colours while they last, then an ordered ramp (sweeps list in order)."""
    if count <= 10:
        return list(colormaps["tab10"].colors[:count])
    if count <= 20:
        return list(colormaps["tab20"].colors[:count])
    return [colormaps["viridis"](i / (count - 1)) for i in range(count)]


def plot(runs: list[Run], out_path: str | Path, title: str = "") -> Path:
    """The 2x2 figure: train loss EMA and val bpb against step (top) and against FLOPs (bottom)."""
    labels = [label if run.problem is None else f"{label} (incomplete)" for run, label in zip(runs, run_labels(runs))]
    # As many legend columns as fit across the figure; a long legend gets extra height, not
    # squeezed panels.
    legend_columns = max(1, min(len(runs), 4, 150 // (max(map(len, labels)) + 6)))
    legend_rows = math.ceil(len(runs) / legend_columns)
    figure = Figure(figsize=(13, 9 + 0.25 * legend_rows), layout="constrained")
    FigureCanvasAgg(figure)
    (loss_step, bpb_step), (loss_flops, bpb_flops) = figure.subplots(2, 2)
    for run, label, color in zip(runs, labels, _colors(len(runs))):
        style = {"color": color, "linestyle": "-" if run.problem is None else "--", "linewidth": 1.6}
        steps = [r["step"] for r in run.train]
        loss_ema = [_number(r.get("train/loss_ema")) for r in run.train]
        train_flops = [_number(r.get("total_training_flops")) for r in run.train]
        eval_steps = np.array([r["step"] for r in run.evals])
        bpb = np.array([_number(r.get("val/bpb")) for r in run.evals])
        eval_flops = run.eval_flops()
        # The evaluation before any update has 0 FLOPs, which a log axis cannot place.
        on_log_axis = eval_flops > 0
        loss_step.plot(steps, loss_ema, label=label, **style)
        loss_flops.plot(train_flops, loss_ema, **style)
        bpb_step.plot(eval_steps, bpb, marker="o", markersize=4, **style)
        bpb_flops.plot(eval_flops[on_log_axis], bpb[on_log_axis], marker="o", markersize=4, **style)
    for axes, ylabel, what in (
        (loss_step, "train loss EMA (nats/token)", "Train loss (EMA)"),
        (bpb_step, "val bits per byte", "Validation bpb"),
        (loss_flops, "train loss EMA (nats/token)", "Train loss (EMA)"),
        (bpb_flops, "val bits per byte", "Validation bpb"),
    ):
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        axes.set_title(f"{what} vs {'step' if axes in (loss_step, bpb_step) else 'training FLOPs'}")
    for axes in (loss_step, bpb_step):
        axes.set_xlabel("step (optimizer updates)")
    for axes in (loss_flops, bpb_flops):
        axes.set_xscale("log")
        axes.set_xlabel("total training FLOPs")
    # One legend for all four panels, below them, so that it never covers a curve.
    figure.legend(loc="outside lower center", ncols=legend_columns, fontsize="medium", frameon=False)
    if title:
        figure.suptitle(title, fontsize="x-large")
    out_path = Path(out_path)
    figure.savefig(out_path, dpi=110)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanochat.report",
        description="Plot and tabulate a run dir or a sweep dir from its metrics.jsonl files.",
    )
    parser.add_argument("directory", type=Path, help="a run dir (holds metrics.jsonl) or a sweep dir (jobs below it)")
    parser.add_argument("--out", type=Path, help="where report.png/.md/.csv go (default: the directory given)")
    args = parser.parse_args(argv)
    out_dir = args.out or args.directory
    try:
        runs = [load_run(path, root=args.directory) for path in find_runs(args.directory)]
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for run in runs:
        if run.problem is not None:
            print(f"warning: {run.path} is incomplete: {run.problem}.", file=sys.stderr)
    runs_counted = f"{len(runs)} run{'s' if len(runs) != 1 else ''}"
    title = f"{args.directory.resolve().name}: {runs_counted}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [plot(runs, out_dir / "report.png", title), *write_table(runs, out_dir, title)]
    except OSError as error:
        print(f"error: cannot write the report into {out_dir} ({error.strerror}).", file=sys.stderr)
        return 2
    complete = sum(run.problem is None for run in runs)
    print(f"{runs_counted} ({complete} complete): " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
