"""The local report (python -m nanochat.report) on synthetic run and sweep dirs: no training here,
each test writes the metrics.jsonl and .hydra files a run would have written."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from nanochat.report import find_runs, load_run, main, run_labels

FLOPS_PER_UPDATE = 1e9
SHARED_OVERRIDES = ["model.n_layer=2", "trainer.num_iterations=40", "logger=none"]


def write_run(run_dir: Path, overrides: list[str], scale: float = 1.0, updates: int = 40, eval_every: int = 10) -> None:
    """The files the trainer writes for a finished run: eval at 0, every eval_every and after the
    last update; train records at steps 0 .. updates-1 with FLOPs after step+1 updates."""
    records = []
    for step in range(updates + 1):
        if step % eval_every == 0 or step == updates:
            bpb = 3.5 * scale - step / 100
            records.append({"step": step, "val/bpb": bpb, "val/min_bpb": bpb})
        if step == updates:
            break
        records.append(
            {
                "step": step,
                "train/loss": 8.0 * scale - step / 20,
                "train/loss_ema": 8.1 * scale - step / 20,
                "train/grad_norm": 0.5,
                "train/lrm": 1.0,
                "train/tok_per_sec": 1000.0 + step,
                "train/mfu": 10.0 + step / 10,
                "train/dt": 0.1,
                "total_training_time": 0.1 * max(0, step - 9),
                "total_training_flops": FLOPS_PER_UPDATE * (step + 1),
            }
        )
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    config = f"trainer:\n  num_iterations: {updates}\n  eval_every: {eval_every}\n"
    (run_dir / ".hydra" / "config.yaml").write_text(config)


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A two-job multirun dir, as `train.py -m optimizer.lr=1e-3,3e-3 ...` lays it out."""
    sweep_dir = tmp_path / "sweep"
    write_run(sweep_dir / "0", ["optimizer.lr=0.001", *SHARED_OVERRIDES], scale=1.0)
    write_run(sweep_dir / "1", ["optimizer.lr=0.003", *SHARED_OVERRIDES], scale=0.9)
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    return sweep_dir


def read_csv(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def test_table_has_every_run_with_its_overrides_and_final_metrics(sweep, capsys):
    assert main([str(sweep)]) == 0
    rows = read_csv(sweep / "report.csv")
    assert sorted(rows) == ["0", "1"]
    for name, lr, scale in (("0", "0.001", 1.0), ("1", "0.003", 0.9)):
        row = rows[name]
        assert row["overrides"].split() == [f"optimizer.lr={lr}", *SHARED_OVERRIDES]
        assert row["status"] == "complete"
        assert int(row["steps"]) == 40
        assert float(row["final_train_loss_ema"]) == pytest.approx(8.1 * scale - 39 / 20)
        assert float(row["final_val_bpb"]) == pytest.approx(3.5 * scale - 0.4)
        assert float(row["min_val_bpb"]) == pytest.approx(3.5 * scale - 0.4)
        assert float(row["median_tok_per_sec"]) == pytest.approx(1019.5)
        assert float(row["total_training_time_s"]) == pytest.approx(3.0)
    markdown = (sweep / "report.md").read_text()
    # The markdown says the shared overrides once and shows each row's varied one.
    assert "Overrides shared by every run: `model.n_layer=2 trainer.num_iterations=40 logger=none`" in markdown
    assert "| 0 | `optimizer.lr=0.001` | 40 |" in markdown
    assert "| 1 | `optimizer.lr=0.003` | 40 |" in markdown
    assert capsys.readouterr().err == ""


def test_png_decodes_with_real_content(sweep, tmp_path):
    out_dir = tmp_path / "elsewhere"
    assert main([str(sweep), "--out", str(out_dir)]) == 0
    png = out_dir / "report.png"
    assert png.stat().st_size > 30_000
    assert not (sweep / "report.png").exists()
    image = imread(png)
    height, width = image.shape[:2]
    assert width > 1000 and height > 700
    pixels = (image[..., :3] * 255).astype(np.uint32).reshape(-1, 3)
    colours = pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2]
    assert len(np.unique(colours)) > 100  # antialiased curves, text, grid: not a blank canvas
    white = np.all(pixels > 250, axis=1).mean()
    assert 0.5 < white < 0.98


def test_truncated_metrics_give_an_incomplete_row_read_up_to_the_cut(sweep, capsys):
    metrics = sweep / "1" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    # Keep the records up to train step 24, then half of the next line: a kill mid-write.
    cut = next(i for i, line in enumerate(lines) if '"step": 25,' in line and "train/loss" in line)
    metrics.write_text("".join(lines[:cut]) + lines[cut][: len(lines[cut]) // 2])

    assert main([str(sweep)]) == 0
    rows = read_csv(sweep / "report.csv")
    assert rows["0"]["status"] == "complete"
    assert rows["1"]["status"] == "incomplete"
    assert int(rows["1"]["steps"]) == 25
    assert float(rows["1"]["final_val_bpb"]) == pytest.approx(3.5 * 0.9 - 0.2)
    err = capsys.readouterr().err
    assert "incomplete" in err and "line 29 is cut off" in err
    assert "Incomplete runs:" in (sweep / "report.md").read_text()


def test_job_that_failed_before_its_first_step_is_listed_as_incomplete(sweep):
    (sweep / "2" / ".hydra").mkdir(parents=True)
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=0.1\n")
    assert main([str(sweep)]) == 0
    row = read_csv(sweep / "report.csv")["2"]
    assert (row["status"], row["steps"], row["final_val_bpb"]) == ("incomplete", "0", "")
    assert "the job stopped before its first step" in (sweep / "report.md").read_text()


def test_run_without_its_final_evaluation_is_incomplete(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, SHARED_OVERRIDES)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))  # a crash before the last eval
    run = load_run(run_dir)
    assert run.status == "incomplete"
    assert "no final evaluation" in run.problem
    assert run.steps_completed == 40


def test_run_killed_right_after_an_intermediate_evaluation_is_incomplete(tmp_path):
    """Its metrics.jsonl looks like a finished 20-update run; the config says 40 were asked for."""
    run_dir = tmp_path / "run"
    write_run(run_dir, SHARED_OVERRIDES)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    last = next(i for i, line in enumerate(lines) if line.startswith('{"step": 20, "val/bpb"'))
    (run_dir / "metrics.jsonl").write_text("".join(lines[: last + 1]))
    run = load_run(run_dir)
    assert run.status == "incomplete"
    assert run.problem == "stopped after 20 of 40 updates"


def test_diverged_values_logged_as_null_do_not_break_the_report(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, SHARED_OVERRIDES)
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[-1]["val/bpb"] = None
    records[-2]["train/loss_ema"] = None
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main([str(run_dir)]) == 0
    row = read_csv(run_dir / "report.csv")["run"]
    assert row["final_val_bpb"] == "" and row["final_train_loss_ema"] == ""
    assert float(row["min_val_bpb"]) == pytest.approx(3.5 - 0.3)


def test_eval_flops_are_those_of_the_update_before(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, SHARED_OVERRIDES)
    run = load_run(run_dir)
    steps = [r["step"] for r in run.evals]
    assert steps == [0, 10, 20, 30, 40]
    np.testing.assert_allclose(run.eval_flops(), [s * FLOPS_PER_UPDATE for s in steps])
    # trainer.log_every=4 logs steps 0, 4, ..., 36 and the last update (39): the record at
    # step 9 is missing, and a cut-off file may end before step 29.
    run.train = [r for r in run.train if r["step"] % 4 == 0 or r["step"] == 39]
    np.testing.assert_allclose(run.eval_flops(), [s * FLOPS_PER_UPDATE for s in steps])
    run.train = [r for r in run.train if r["step"] <= 24]
    np.testing.assert_allclose(run.eval_flops(), [s * FLOPS_PER_UPDATE for s in steps])


def test_labels_name_only_what_the_runs_vary(sweep, tmp_path):
    runs = [load_run(path, root=sweep) for path in find_runs(sweep)]
    assert run_labels(runs) == ["lr=0.001", "lr=0.003"]
    single = [load_run(sweep / "0")]
    assert run_labels(single) == ["0"]
    (sweep / "0" / ".hydra" / "overrides.yaml").unlink()
    assert run_labels([load_run(path, root=sweep) for path in find_runs(sweep)]) == ["0", "1"]


def test_single_run_dir_and_nested_sweeps_are_found(sweep, tmp_path):
    assert find_runs(sweep / "1") == [sweep / "1"]
    write_run(sweep / "10", ["optimizer.lr=0.01", *SHARED_OVERRIDES])
    write_run(sweep / "2", ["optimizer.lr=0.002", *SHARED_OVERRIDES])
    assert [p.name for p in find_runs(tmp_path)] == ["0", "1", "2", "10"]


def test_missing_dir_is_one_sentence_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "no_such_sweep"
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {missing} does not exist; give a run dir or a sweep dir.\n"


def test_empty_sweep_dir_is_one_sentence_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "sweep"
    (empty / "0" / ".hydra").mkdir(parents=True)  # a job that never got to its first step
    (empty / "multirun.yaml").write_text("hydra: {}\n")
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {empty} holds no metrics.jsonl") and err.count("\n") == 1
    assert not (empty / "report.png").exists()


@pytest.mark.slow
def test_command_line_entry_point(sweep, tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "nanochat.report", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    done = subprocess.run([sys.executable, "-m", "nanochat.report", str(sweep)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {"report.png", "report.md", "report.csv"} <= {p.name for p in sweep.iterdir()}
    assert not math.isnan(float(read_csv(sweep / "report.csv")["0"]["final_val_bpb"]))
