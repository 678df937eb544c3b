"""What a researcher looks at: the W&B run (read back from its offline records), TensorBoard event
files and the CSV against metrics.jsonl, the console kept in train.log, the debug presets, --help,
and an MFU that never exceeds 100% (the CPU peak it divides by)."""

import csv
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FAKE_VOCAB_SIZE
from runs import REPO, assemble_run, read_metrics, run_train
from test_train import fake_corpus_overrides, tiny_run_overrides, train_records
from wandb_records import offline_run, read_records

from nanochat.config import CONF_DIR, HELP_GROUPS, compose_cli
from nanochat.errors import UserError
from nanochat.tracking import run_name

ALL_LOGGERS = "logger=[wandb,tensorboard,csv]"


def logged_run(data_dir: Path, run_dir: Path, *extra: str):
    """A 3-step tiny run with every backend on; returns the Run after fit()."""
    overrides = [o for o in tiny_run_overrides(data_dir, "trainer.num_iterations=3", *extra) if o != "logger=none"]
    run = assemble_run(*overrides, ALL_LOGGERS, run_dir=run_dir)
    run.fit()
    return run


@pytest.fixture(scope="module")
def all_loggers_run(shakespeare_data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("all_loggers") / "run"
    return logged_run(shakespeare_data_dir, run_dir), run_dir


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def test_the_offline_wandb_run_has_the_job_name_the_derived_config_and_the_x_axes(
    all_loggers_run, shakespeare_data_dir
):
    run, run_dir = all_loggers_run
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = read_records(path)
    # Complete once the run has returned, its exit record last (W&B's service writes it late).
    assert records[-1].WhichOneof("record_type") == "exit"
    wandb_run, history = offline_run(run_dir)
    # The name: the model and optimizer choices, then every override as leaf=value (full key where
    # two overrides share a leaf: eval.tokens and sample.tokens); paths by their last part.
    assert wandb_run.display_name == (
        f"d4-adamw-data_dir={shakespeare_data_dir.name}-val_bytes=50000-vocab_size={FAKE_VOCAB_SIZE}-n_layer=2-"
        "dtype=float32-compile=false-sequence_len=64-device_batch_size=8-total_batch_size=1024-eval.tokens=2048-sample.tokens=8-"
        "peak_flops=1e12-num_iterations=3"
    )
    config = {item.key: json.loads(item.value_json) for item in wandb_run.config.update}
    model = run.trainer.model
    params = sum(p.numel() for p in model.parameters())
    tokens = 3 * 1024
    assert config["parameters"] == params
    assert config["flops_per_token"] == model.estimate_flops()
    assert config["num_iterations"] == 3
    assert config["grad_accum_steps"] == 1024 // (8 * 64)
    assert config["tokens_per_parameter"] == pytest.approx(tokens / params)
    assert config["total_tokens"] == tokens
    assert (config["world_size"], config["device"], config["dtype"]) == (1, "cpu", "float32")
    assert config["torch_version"] == torch.__version__
    assert config["git_commit"] == git("rev-parse", "HEAD")
    assert config["git_dirty"] == bool(git("status", "--porcelain", "--untracked-files=no"))
    assert config["optimizer"]["lr"] == 0.003 and config["trainer"]["num_iterations"] == 3  # the resolved config too

    metrics = {r.metric.name: r.metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert {"train/tokens", "total_training_flops"} <= set(metrics)
    # Declared as metrics to plot against; none of them re-bases another metric: `step` stays the x-axis.
    assert all(not m.step_metric and not m.glob_name for m in metrics.values())
    assert metrics["train/tokens"].summary.max and metrics["total_training_flops"].summary.max
    assert metrics["val/bpb"].summary.min  # the run's summary holds the best val bpb

    train_rows = [row for row in history if "train/loss" in row]
    assert [row["_step"] for row in train_rows] == [0, 1, 2]
    # the tokens and FLOPs of the updates before each step (nanochat's flops_so_far), as for evaluations
    assert [row["train/tokens"] for row in train_rows] == [0, 1024, 2048]
    flops_per_token = model.estimate_flops()
    assert [row["total_training_flops"] for row in train_rows] == [flops_per_token * t for t in (0, 1024, 2048)]
    val_rows = [row for row in history if "val/bpb" in row]
    # val/bpb against tokens: one value per W&B row, shared with the train metrics of that step
    assert [(row["_step"], row["train/tokens"]) for row in val_rows] == [(0, 0), (3, 3072)]


def test_the_run_says_where_its_offline_wandb_run_is_and_how_to_upload_it(all_loggers_run):
    _, run_dir = all_loggers_run
    (folder,) = run_dir.glob("wandb/offline-run-*")
    log = (run_dir / "train.log").read_text()
    command = f"wandb sync {folder}"
    assert f"W&B offline run in {folder}; upload it with: {command}" in log
    assert f"finished W&B offline run in {folder}; upload it with: {command}" in log  # at start and at the end


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def jsonl_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run_dir):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault(key, []).append((record["step"], value))
    return series


def test_tensorboard_and_the_csv_hold_the_scalars_of_metrics_jsonl(all_loggers_run):
    _, run_dir = all_loggers_run
    expected = jsonl_scalars(run_dir)
    assert {"train/loss", "train/tokens", "total_training_flops", "val/bpb", "train/mfu"} <= set(expected)
    board = tensorboard_scalars(run_dir)
    assert set(board) == set(expected)
    for tag, points in expected.items():
        steps, values = zip(*points)
        assert [s for s, _ in board[tag]] == list(steps), tag
        assert [v for _, v in board[tag]] == pytest.approx(values, rel=1e-6), tag  # event files hold float32
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    from_csv: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        from_csv.setdefault(row["metric"], []).append((int(row["step"]), float(row["value"])))
    assert from_csv == {tag: [(s, float(v)) for s, v in points] for tag, points in expected.items()}


def test_train_log_holds_the_setup_summary_every_progress_line_and_the_result(shakespeare_data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(shakespeare_data_dir, "trainer.num_iterations=4", "eval.every=2", "sample.every=2")
    capsys.readouterr()
    assemble_run(*overrides, run_dir=run_dir).fit()
    printed = capsys.readouterr().out.splitlines()
    logged = [
        re.sub(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ", "", line)
        for line in (run_dir / "train.log").read_text().splitlines()
    ]
    assert logged == printed  # every line the run printed, in order
    text = "\n".join(logged)
    for summary in ("parameters: ", "steps: 4 x 1,024 tokens", "grad accumulation 2", "device cpu, float32"):
        assert summary in text
    # A line as each long phase starts, what and how big, and one with its result and duration.
    for step in (0, 2, 4):
        assert f"step {step} val bpb: 2,048 validation tokens ..." in logged
        assert any(
            re.fullmatch(rf"step +{step} \| val bpb \d\.\d{{4}} \(min \d\.\d{{4}}\) \| \d+\.\ds", line)
            for line in logged
        )
    for step in (2, 4):
        assert f"step {step} samples: 3 prompts x 8 tokens ..." in logged
        assert any(re.fullmatch(rf"step {step} samples done in \d+\.\ds", line) for line in logged)
    assert any(line.startswith("checkpoint step_000004: ") and line.endswith(" ...") for line in logged)
    assert any(
        re.fullmatch(rf"saved checkpoint {run_dir}/checkpoints/step_000004 \(.* MiB\) \| \d+\.\ds", line)
        for line in logged
    )
    # Progress lines number steps as metrics.jsonl does: the 0-based update index.
    progress = [line for line in logged if re.match(r"step +\d+/4 ", line)]
    assert [int(line.split()[1].split("/")[0]) for line in progress] == [r["step"] for r in train_records(run_dir)]
    assert [r["step"] for r in train_records(run_dir)] == [0, 1, 2, 3]
    assert re.fullmatch(
        r"done in \d+s: val bpb \d\.\d{4} \(min \d\.\d{4}\), run dir " + re.escape(str(run_dir)), logged[-1]
    )


def test_a_run_that_stops_with_an_error_ends_its_train_log_with_it(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run = assemble_run(*tiny_run_overrides(shakespeare_data_dir, "trainer.num_iterations=3"), run_dir=run_dir)

    def failing_step(step):
        raise UserError("step 0: the disk is full.")

    run.trainer.train_step = failing_step
    with pytest.raises(UserError):
        run.fit()
    assert (run_dir / "train.log").read_text().splitlines()[-1].endswith("] error: step 0: the disk is full.")


def test_run_names_say_what_the_job_is_and_tell_sweeps_apart():
    choices = {"model": "d12", "optimizer": "adamw_muon", "data": "shakespeare", "experiment": None}
    assert run_name(choices, ["model=d12", "optimizer=adamw_muon", "optimizer.matrix_lr=0.01"]) == (
        "d12-adamw_muon-matrix_lr=0.01"
    )
    assert run_name(choices, ["data=shakespeare", "data.data_dir=/big/disk/shards", "hydra.run.dir=x"]) == (
        "d12-adamw_muon-shakespeare-data_dir=shards"
    )
    jobs = [run_name(choices, ["optimizer.matrix_lr=0.01"], (sweep, n)) for sweep in ("lr_a", "lr_b") for n in (0, 1)]
    assert jobs[0] == "d12-adamw_muon-matrix_lr=0.01 (lr_a #0)"
    assert len(set(jobs)) == 4  # the same point in two sweeps, and two jobs of one sweep, differ


def group_files(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_help_lists_every_group_with_its_choices_and_no_base_file():
    cfg = compose_cli([])
    text = cfg.hydra.help.template  # resolved as Hydra resolves it for --help
    for group in ("model", "optimizer", "schedule", "data", "logger", "experiment", "debug", "hydra/launcher"):
        line = next(line for line in text.splitlines() if line.startswith(f"{group}: "))
        assert len(line) > len(group) + 10  # a one-line description
        for choice in group_files(group):
            assert re.search(rf"^  {re.escape(choice)} +\S", text, flags=re.MULTILINE), (group, choice)
    assert set(HELP_GROUPS) >= {"model", "optimizer", "schedule", "data", "logger", "experiment", "debug"}
    assert "_gpt" not in text and not re.search(r"^  gpt ", text, flags=re.MULTILINE)
    assert re.search(r"^  basic +", text, flags=re.MULTILINE)  # Hydra's own launcher among local and slurm
    assert "README.md" in text and "-sc install=bash" in text
    with pytest.raises(UserError) as refused:
        compose_cli(["model=_gpt"])
    assert (
        str(refused.value) == f"model=_gpt is not a choice of model; the choices are {', '.join(group_files('model'))}."
    )


@pytest.mark.slow
def test_train_py_help_prints_the_groups_the_keys_and_the_flags(tmp_path):
    result = run_train("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "== Config groups (group=choice) ==" in out and "d4   nanochat d4: 4 layers" in out
    assert "  fast     Seconds, not minutes" in out and "trainer.num_iterations=400" in out
    assert "--shell-completion,-sc" in out and "_gpt" not in out
    assert not (tmp_path / "outputs").exists()


# Debug presets: each on the fake corpus (the presets leave the data alone).


def test_debug_fast_trains_three_steps_with_nothing_but_local_logs(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run = assemble_run(*fake_corpus_overrides(shakespeare_data_dir), "debug=fast", "model.n_layer=2", run_dir=run_dir)
    assert run.tracker.backends == []
    final = run.fit()
    assert [r["step"] for r in train_records(run_dir)] == [0, 1, 2]
    log = (run_dir / "train.log").read_text()
    # the preset's small validation set, four 256-token rows, at step 0 and after the last step
    assert "step 0 val bpb: 1,024 validation tokens" in log and "step 3 val bpb: 1,024 validation tokens" in log
    assert math.isfinite(final["val/bpb"])
    assert (run_dir / "samples.jsonl").read_text() == ""
    assert not (run_dir / "wandb").exists() and not (run_dir / "tensorboard").exists()


def test_debug_overfit_drives_the_loss_of_one_batch_near_zero(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    # d4 as the preset has it; 2 rows per step to keep the test short
    run = assemble_run(
        *fake_corpus_overrides(shakespeare_data_dir), "debug=overfit", "trainer.device_batch_size=2", run_dir=run_dir
    )
    batches = []

    class Recording:  # what the trainer's micro-steps receive
        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            batch = next(self.inner)
            batches.append(batch[0].clone())
            return batch

        def __getattr__(self, name):  # state_dict(), close()
            return getattr(self.inner, name)

    run.trainer.train_loader = Recording(run.trainer.train_loader)
    run.fit()
    losses = [r["train/loss"] for r in train_records(run_dir)]
    assert losses[0] > 5 and losses[-1] < 0.5
    assert all(torch.equal(b, batches[0]) for b in batches)  # one batch, over and over


def test_debug_profile_writes_a_trace_and_an_operator_table(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        *fake_corpus_overrides(shakespeare_data_dir),
        "debug=profile",
        "model.n_layer=2",
        "trainer.device_batch_size=2",
    ]
    assemble_run(*overrides, run_dir=run_dir).fit()
    trace = json.loads((run_dir / "profile" / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"aten::mm", "ProfilerStep#5"} <= names or {"aten::addmm"} <= names
    table = (run_dir / "profile" / "key_averages.txt").read_text()
    assert "Self CPU %" in table and "aten::mm" in table
    assert json.loads((run_dir / "profile" / "steps.json").read_text())["first_step"] == 5
    assert "profile of steps 5-7: " in (run_dir / "train.log").read_text()


# MFU against the CPU peak


def test_a_compiled_run_never_reports_more_than_100_percent_mfu(shakespeare_data_dir, tmp_path):
    """The case that went to 188% against one 1024^2 matmul: d4, compiled, on the CPU, with the peak
    measured at start-up (system.peak_flops null) over square matmuls and the model's own."""
    run_dir = tmp_path / "run"
    run = assemble_run(
        *fake_corpus_overrides(shakespeare_data_dir),
        "optimizer=adamw",
        "system.compile=true",
        "system.dtype=float32",
        "trainer.num_iterations=12",
        "eval.every=-1",
        "eval.tokens=512",
        "sample.prompts=[]",
        "logger=none",
        run_dir=run_dir,
    )
    assert run.trainer.peak_flops is not None
    run.fit()
    mfus = [r["train/mfu"] for r in train_records(run_dir)]
    assert len(mfus) == 12 and all(0 < m <= 100 for m in mfus), mfus
    assert "MFU on cpu is against a peak measured now: the best of" in (run_dir / "train.log").read_text()


def test_the_cpu_peak_is_measured_over_the_models_own_matmul_shapes():
    from nanochat.device import peak_probe_shapes

    shapes = peak_probe_shapes([(1024, 256), (256, 256)], rows=2048)
    for out, fan_in in [(1024, 256), (256, 256)]:
        assert {(2048, fan_in, out), (2048, out, fan_in), (out, 2048, fan_in)} <= set(shapes)
    assert (2048, 2048, 2048) in shapes and len(shapes) == len(set(shapes))
    assert all(max(s) <= 4096 for s in peak_probe_shapes([(4096, 4096)], rows=10**6))  # rows capped at 4096


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_run_logs_its_peak_memory_and_samples_system_metrics(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_run_overrides(shakespeare_data_dir, "trainer.num_iterations=3") if o != "logger=none"]
    run = assemble_run(*overrides, "system.device=cuda", "logger=wandb", run_dir=run_dir)
    assert run.tracker.wandb_run.settings.x_disable_stats is False  # W&B's GPU sampler is on for CUDA runs
    run.fit()
    memory = [r["train/max_memory_gib"] for r in train_records(run_dir)]
    assert len(memory) == 3 and all(m > 0 for m in memory)
    assert memory == sorted(memory)  # a high-water mark


def test_a_step_above_a_peak_measured_while_the_cpu_was_busy_measures_it_again(shakespeare_data_dir, tmp_path):
    """A peak taken while other work had the cores is too low; the first step that beats it measures
    the peak again (for real, here) and its MFU is against that."""
    run_dir = tmp_path / "run"
    overrides = [
        o for o in tiny_run_overrides(shakespeare_data_dir, "trainer.num_iterations=3") if "peak_flops" not in o
    ]
    run = assemble_run(*overrides, run_dir=run_dir)
    assert run.trainer.remeasure_peak is not None
    run.trainer.peak_flops = 1e6  # as if measured while the CPU was busy: any step beats it
    run.fit()
    mfus = [r["train/mfu"] for r in train_records(run_dir)]
    assert all(0 < m <= 100 for m in mfus), mfus
    assert run.trainer.peak_flops > 1e9
    assert (
        "ran above the peak of 0.0 GFLOP/s measured earlier (the CPU was busy then); measured again: "
        in (run_dir / "train.log").read_text()
    )
