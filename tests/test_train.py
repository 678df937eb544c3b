"""End to end on the synthetic Shakespeare corpus (no network): runs assembled in this process
(most tests), and `python train.py` itself where only a process shows it (exit codes, the run dir
Hydra makes or not, sweeps; marked slow)."""

import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
from configs import TEST_RUN_BASICS
from conftest import FAKE_VAL_BYTES, FAKE_VOCAB_SIZE
from core_bundle import LABELS, write_bundle
from omegaconf import OmegaConf
from runs import REPO, assemble_run, read_metrics, run_train, train
from wandb_records import offline_run

from nanochat.assemble import check_jobs
from nanochat.checkpoint import complete_checkpoints, load_checkpoint
from nanochat.core_eval import EvalBundle, evaluate_core
from nanochat.errors import UserError
from nanochat.finished import load_finished
from nanochat.resume import HISTORY

LOGGED_EVERY_STEP = [
    "train/loss",
    "train/loss_ema",
    "train/grad_norm",
    "train/lrm",
    "train/tok_per_sec",
    "train/mfu",
    "train/dt",
    "total_training_time",
    "total_training_flops",
]
TOY_MODEL = "model._target_=toy_models.PositionalTransformer"
# Muon's bf16 Newton-Schulz is slow on CPUs without native bf16 matmuls; what these tests check
# does not depend on it (its own tests are in tests/test_optim.py and test_distributed.py).
RECIPES = {"adamw": ["optimizer=adamw"], "adamw_muon": ["optimizer=adamw_muon", "optimizer.ns_dtype=float32"]}


def fake_corpus_overrides(data_dir: Path) -> list[str]:
    """Point a run at the conftest's prepared synthetic corpus and its tokenizer."""
    return [f"data.data_dir={data_dir}", f"data.val_bytes={FAKE_VAL_BYTES}", f"tokenizer.vocab_size={FAKE_VOCAB_SIZE}"]


def tiny_run_overrides(data_dir: Path, *extra: str) -> list[str]:
    return [
        *fake_corpus_overrides(data_dir),
        "model.n_layer=2",
        *TEST_RUN_BASICS,
        "model.sequence_len=64",
        "trainer.device_batch_size=8",
        "trainer.total_batch_size=1024",  # two micro-steps: grad accumulation is exercised
        "eval.tokens=2048",
        "sample.tokens=8",
        "system.peak_flops=1e12",  # MFU against a fixed figure: no CPU peak measured per run
        "logger=none",
        *extra,
    ]


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "train/loss" in r]


def test_tiny_run_lowers_the_loss_and_writes_its_run_dir(shakespeare_data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(*tiny_run_overrides(shakespeare_data_dir, "trainer.num_iterations=60", "eval.every=30"), run_dir=run_dir)
    records = read_metrics(run_dir)
    steps = train_records(run_dir)
    val_records = [r for r in records if "val/bpb" in r]
    assert [r["step"] for r in steps] == list(range(60))
    assert all(key in r for r in steps for key in LOGGED_EVERY_STEP)
    assert steps[-1]["train/loss_ema"] < steps[0]["train/loss"] - 1.0
    assert [r["step"] for r in val_records] == [0, 30, 60]
    assert val_records[-1]["val/bpb"] < val_records[0]["val/bpb"] - 0.3
    assert (run_dir / "checkpoints" / "step_000060" / "COMPLETE").exists()
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["step"] == 60 for s in samples)
    assert "val bpb" in capsys.readouterr().out


def test_core_is_logged_at_its_cadence_and_at_the_end_and_equals_core_of_those_checkpoints(
    shakespeare_data_dir, tmp_path, capsys
):
    bundle_root = write_bundle(tmp_path / "bundle", per_task=20)
    run_dir = tmp_path / "run"
    overrides = [
        "trainer.num_iterations=6",
        "eval.every=-1",
        "eval.core_every=4",
        "eval.core_max_per_task=8",
        f"eval.core_bundle={bundle_root}",
        "checkpoint.save_every=4",  # the weights CORE saw at step 4 are kept too
        "checkpoint.keep_last=3",
        "system.dtype=float32",
    ]
    final = train(*tiny_run_overrides(shakespeare_data_dir, *overrides), run_dir=run_dir)
    rows = {r["step"]: r for r in read_metrics(run_dir) if "core/metric" in r}
    assert sorted(rows) == [4, 6]
    bundle = EvalBundle.load(bundle_root)
    for step, row in rows.items():
        finished = load_finished(run_dir / "checkpoints" / f"step_{step:06d}")
        expected = evaluate_core(
            finished.model,
            finished.tokenizer,
            bundle,
            torch.device("cpu"),
            max_per_task=8,
            max_len=10 * 64,  # GPT's rotary table: nanochat does not crop prompts its GPT can take
        )
        assert {f"core/{label}" for label in LABELS} | {"core/metric"} <= set(expected)
        assert {key: row[key] for key in expected} == expected
    assert final["core/metric"] == rows[6]["core/metric"]
    out = capsys.readouterr().out
    for step in (4, 6):
        assert f"step {step} CORE: 6 tasks, at most 8 examples each ..." in out
        assert f"step {step:5d} | CORE {rows[step]['core/metric']:.4f} | " in out


def test_core_is_off_by_default(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(*tiny_run_overrides(shakespeare_data_dir, "trainer.num_iterations=2"), run_dir=run_dir)
    assert not any(key.startswith("core") for row in read_metrics(run_dir) for key in row)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_muon"])
def test_a_second_architecture_trains_when_chosen_by_its_target_alone(shakespeare_data_dir, tmp_path, optimizer):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(shakespeare_data_dir, TOY_MODEL, *RECIPES[optimizer], "trainer.num_iterations=40")
    run = assemble_run(*overrides, run_dir=run_dir)
    assert type(run.trainer.model).__name__ == "PositionalTransformer"
    run.fit()
    steps = train_records(run_dir)
    assert len(steps) == 40 and steps[-1]["train/loss_ema"] < steps[0]["train/loss"] - 1.0


@pytest.mark.slow  # a minute and more on a 2-core CPU
def test_d12_with_muon_builds_and_logs_every_metric(shakespeare_data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(
        "model=d12",
        "optimizer=adamw_muon",
        "optimizer.ns_dtype=float32",  # see RECIPES
        "trainer.num_iterations=2",
        "trainer.device_batch_size=1",
        "trainer.total_batch_size=64",
        "model.sequence_len=64",
        *fake_corpus_overrides(shakespeare_data_dir),
        "eval.tokens=256",
        "sample.tokens=4",
        "system.peak_flops=1e12",
        "logger=none",
        run_dir=run_dir,
    )
    assert [r["step"] for r in train_records(run_dir)] == [0, 1]
    assert all(key in r for r in train_records(run_dir) for key in LOGGED_EVERY_STEP)
    assert "parameters: 85," in capsys.readouterr().out  # 12 x 12 x 768^2 block weights + embeddings


def muon_matrices(run) -> list[torch.Tensor]:
    (muon_group,) = run.trainer.optimizers[1].param_groups
    return [p.detach().clone() for p in muon_group["params"]]


def test_a_new_run_from_a_checkpoint_trains_at_its_own_learning_rates(shakespeare_data_dir, tmp_path, capsys):
    """checkpoint.resume=<another run> optimizer.matrix_lr=0.01: the moments come from the
    checkpoint, the lr from this run. Against the same start at the old lr, Muon's first update is
    exactly half as large (same gradients, same momentum buffers), AdamW's the same."""
    common = tiny_run_overrides(shakespeare_data_dir, *RECIPES["adamw_muon"], "schedule=constant")
    source = tmp_path / "source"
    train(*common, "trainer.num_iterations=4", run_dir=source)
    capsys.readouterr()
    start = [*common, "trainer.num_iterations=5", f"checkpoint.resume={source}"]
    runs = {lr: assemble_run(*start, f"optimizer.matrix_lr={lr}", run_dir=tmp_path / f"lr_{lr}") for lr in (0.02, 0.01)}
    printed = capsys.readouterr().out
    assert "optimizer.matrix_lr (0.02 in the checkpoint, 0.01 now)" in printed
    assert "at step 4 (starting a new run with this run's settings)" in printed
    new = runs[0.01].trainer.optimizers[1].param_groups[0]
    assert (new["lr"], new["initial_lr"]) == (0.01, 0.01)
    assert runs[0.01].trainer.optimizers[1].state  # the momentum buffers came with the checkpoint
    before = muon_matrices(runs[0.01])
    assert all(torch.equal(a, b) for a, b in zip(before, muon_matrices(runs[0.02])))
    for run in runs.values():
        run.fit()
    for start_weight, half, full in zip(before, muon_matrices(runs[0.01]), muon_matrices(runs[0.02])):
        torch.testing.assert_close(half - start_weight, 0.5 * (full - start_weight), rtol=1e-4, atol=1e-7)
    heads = [run.trainer.model.lm_head.weight for run in runs.values()]
    assert torch.equal(*heads)  # AdamW's groups unchanged: identical updates


def test_a_continued_auto_dtype_run_keeps_the_dtype_measured_when_it_started(
    shakespeare_data_dir, tmp_path, monkeypatch
):
    """system.dtype=auto decides by measuring, and a measurement can come out otherwise the next
    time: the continued run takes the dtype its checkpoint was trained with, not a new measurement."""
    measured = iter([torch.bfloat16, torch.float32])  # what two start-up measurements would say
    monkeypatch.setattr("nanochat.assemble.resolve_dtype", lambda *args: (next(measured), None))
    run_dir = tmp_path / "run"
    auto = tiny_run_overrides(shakespeare_data_dir, "system.dtype=auto", "trainer.num_iterations=2")
    assemble_run(*auto, run_dir=run_dir).fit()
    continued = assemble_run(*auto[:-1], "trainer.num_iterations=3", run_dir=run_dir)
    assert continued.trainer.start_step == 2 and continued.trainer.dtype == torch.bfloat16
    fresh = assemble_run(*auto, run_dir=tmp_path / "fresh")
    assert fresh.trainer.dtype == torch.float32


def test_muons_auto_newton_schulz_dtype_is_decided_once_per_run_and_kept_when_continued(
    shakespeare_data_dir, tmp_path, monkeypatch
):
    """optimizer.ns_dtype=auto is measured by train.py once (rank 0's choice for every rank) and
    written to the checkpoint; a continued run keeps it although a new measurement would differ."""
    measured = iter(["float32", "bfloat16"])  # what two start-up measurements would say
    monkeypatch.setattr("nanochat.assemble.resolve_ns_dtype", lambda *args: next(measured))
    run_dir = tmp_path / "run"
    auto = tiny_run_overrides(shakespeare_data_dir, "optimizer=adamw_muon", "optimizer.ns_dtype=auto")
    assemble_run(*auto, "trainer.num_iterations=2", run_dir=run_dir).fit()
    continued = assemble_run(*auto, "trainer.num_iterations=3", run_dir=run_dir)
    (muon_group,) = continued.trainer.optimizers[1].param_groups
    assert continued.trainer.start_step == 2 and muon_group["ns_dtype"] == "float32"
    fresh = assemble_run(*auto, "trainer.num_iterations=3", run_dir=tmp_path / "fresh")
    assert fresh.trainer.optimizers[1].param_groups[0]["ns_dtype"] == "bfloat16"


def test_muons_auto_bf16_matmul_is_decided_once_per_run_and_kept_when_continued(
    shakespeare_data_dir, tmp_path, monkeypatch
):
    """optimizer.ns_bf16_matmul=auto (for a bf16 Newton-Schulz) is measured once, written to the
    checkpoint's meta and kept by a continued run, as ns_dtype=auto is."""
    measured = iter(["emulated", "native"])
    monkeypatch.setattr("nanochat.assemble.resolve_ns_bf16_matmul", lambda *args: next(measured))
    run_dir = tmp_path / "run"
    bf16 = tiny_run_overrides(shakespeare_data_dir, "optimizer=adamw_muon", "optimizer.ns_dtype=bfloat16")
    assemble_run(*bf16, "trainer.num_iterations=2", run_dir=run_dir).fit()
    saved = load_checkpoint(complete_checkpoints(run_dir / "checkpoints")[-1]).meta["autocast"]
    assert saved["ns_bf16_matmuls"] == ["emulated"]
    continued = assemble_run(*bf16, "trainer.num_iterations=3", run_dir=run_dir)
    assert continued.trainer.start_step == 2
    assert continued.trainer.optimizers[1].param_groups[0]["ns_bf16_matmul"] == "emulated"
    fresh = assemble_run(*bf16, "trainer.num_iterations=3", run_dir=tmp_path / "fresh")
    assert fresh.trainer.optimizers[1].param_groups[0]["ns_bf16_matmul"] == "native"


def test_continuing_a_run_refuses_a_changed_setting_and_accepts_it_when_asked(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    base = tiny_run_overrides(shakespeare_data_dir, "trainer.num_iterations=4")
    train(*base, run_dir=run_dir)
    command_line = [*base, f"hydra.run.dir={run_dir}"]  # what train.py checks before Hydra starts the job
    with pytest.raises(UserError) as refused:
        check_jobs([*command_line, "optimizer.lr=0.01", "trainer.grad_clip=0.5"])
    assert str(refused.value) == (
        f"cannot continue {run_dir} from step_000004: its config differs from the checkpoint's in "
        "optimizer.lr (0.003 in the checkpoint, 0.01 now), trainer.grad_clip (1.0 in the checkpoint, 0.5 now); "
        "to continue with the new values add checkpoint.accept_changes=[optimizer.lr,trainer.grad_clip], or start "
        f"a new run from the checkpoint with checkpoint.resume={run_dir / 'checkpoints' / 'step_000004'} and "
        "another hydra.run.dir."
    )
    accepted = ["optimizer.lr=0.01", "checkpoint.accept_changes=[optimizer.lr]"]
    check_jobs([*command_line, *accepted])  # a deliberate change
    run = assemble_run(*base, *accepted, run_dir=run_dir)
    assert run.trainer.start_step == 4 and run.trainer.optimizers[0].param_groups[0]["initial_lr"] == 0.01
    history = [json.loads(line) for line in (run_dir / HISTORY).read_text().splitlines()]
    assert [(h["step"], h["continuing"], h["changed"]) for h in history] == [
        (0, False, {}),
        (4, True, {"checkpoint.accept_changes": [[], ["optimizer.lr"]], "optimizer.lr": [0.003, 0.01]}),
    ]


def test_continuing_with_a_longer_run_goes_on_exactly_as_an_uninterrupted_one(shakespeare_data_dir, tmp_path):
    """A constant schedule does not depend on the run length, so 4 steps continued to 7 must be
    the 7-step run, loss for loss."""
    common = tiny_run_overrides(shakespeare_data_dir, "schedule=constant", "eval.every=-1")
    train(*common, "trainer.num_iterations=7", run_dir=tmp_path / "whole")
    train(*common, "trainer.num_iterations=4", run_dir=tmp_path / "cut")
    train(*common, "trainer.num_iterations=7", run_dir=tmp_path / "cut")  # continued: a changeable key
    losses = lambda d: [(r["step"], r["train/loss"], r["train/loss_ema"]) for r in train_records(d)]  # noqa: E731
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert [p.name for p in complete_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step_000004", "step_000007"]


# Through `python train.py`: the process, its exit code and the dirs Hydra makes.

CLI_MISTAKES = [  # (overrides, the sentence): one per kind of mistake
    (["trainer.num_iterations=abc"], "trainer.num_iterations=abc must be an integer."),
    (["optimizer.matrix_lr=fast"], "optimizer.matrix_lr=fast must be a number."),
    (["system.compile=maybe"], "system.compile=maybe must be true or false."),
    (["sample.prompts=3"], "sample.prompts=3 must be a list of strings."),
    (["system.dtype=float16"], "system.dtype=float16 must be one of auto, float32, bfloat16."),
    (["data=local"], "data.path needs a value (it is ??? in the YAML): set data.path=<value>."),
    (
        ["optimizer.matrix_learning_rate=0.01"],
        "optimizer.matrix_learning_rate is not a key of optimizer; did you mean optimizer.matrix_lr?",
    ),
    (
        ["+optimizer.matrix_learning_rate=0.01"],
        "optimizer.matrix_learning_rate is not a key of optimizer (nanochat.optim.adamw_muon); "
        "did you mean optimizer.matrix_lr?",
    ),
    (
        ["trainer.total_batch_size=1000"],
        "trainer.total_batch_size=1000 is not divisible by device_batch_size x sequence_len x world_size = 8 x 256 x 1.",
    ),
]


def mistake_command_line(overrides: list[str], sweep: bool, tmp_path: Path) -> list[str]:
    if sweep:  # the mistake in the second job of a two-job sweep
        return ["-m", "trainer.seed=1,2", *overrides, f"hydra.sweep.dir={tmp_path / 'run'}"]
    return [*overrides, f"hydra.run.dir={tmp_path / 'run'}"]


def assert_refused_with(exit_code: int, stderr: str, sentence: str, tmp_path: Path) -> None:
    assert exit_code == 2, stderr
    assert stderr.strip().splitlines() == [f"error: {sentence}"]
    assert (
        not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
    )


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
@pytest.mark.parametrize("overrides, sentence", CLI_MISTAKES, ids=[o[0] for o, _ in CLI_MISTAKES])
def test_a_mistake_exits_2_with_one_sentence_and_no_run_dir(overrides, sentence, sweep, tmp_path, monkeypatch, capsys):
    """train.py's own command-line path (its __main__ block), run in this process: a mistake is found
    before Hydra starts, so no interpreter of its own is needed to see the exit code and the dirs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), *mistake_command_line(overrides, sweep, tmp_path)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    assert_refused_with(exited.value.code, capsys.readouterr().err, sentence, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_a_mistake_on_the_command_line_exits_2_with_one_sentence_and_no_run_dir(sweep, tmp_path):
    """The same through `python train.py` (one kind of mistake: the path is the same for every kind)."""
    overrides, sentence = CLI_MISTAKES[0]
    result = run_train(*mistake_command_line(overrides, sweep, tmp_path), cwd=tmp_path)
    assert_refused_with(result.returncode, result.stderr, sentence, tmp_path)


@pytest.mark.slow
def test_a_refused_continuation_leaves_the_run_dir_as_it_was(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    common = [*tiny_run_overrides(shakespeare_data_dir), "trainer.num_iterations=2", f"hydra.run.dir={run_dir}"]
    assert run_train(*common, cwd=tmp_path).returncode == 0
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = run_train(*common, "optimizer.lr=0.01", cwd=tmp_path)
    assert result.returncode == 2 and "optimizer.lr (0.003 in the checkpoint, 0.01 now)" in result.stderr
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # .hydra too


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_muon"])
def test_a_second_architecture_trains_through_the_unchanged_train_py(shakespeare_data_dir, tmp_path, optimizer):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    overrides = tiny_run_overrides(shakespeare_data_dir, TOY_MODEL, *RECIPES[optimizer], "trainer.num_iterations=20")
    result = run_train(*overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    steps = train_records(run_dir)
    assert len(steps) == 20 and steps[-1]["train/loss_ema"] < steps[0]["train/loss"]


@pytest.mark.slow
def test_the_default_logger_keeps_an_offline_wandb_run(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_run_overrides(shakespeare_data_dir) if o != "logger=none"]
    result = run_train(*overrides, "trainer.num_iterations=3", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run, history = offline_run(run_dir)
    assert {"train/loss", "train/mfu", "val/bpb"} <= {key for row in history for key in row}
    assert "tok/s" in result.stdout


@pytest.mark.slow
def test_lr_sweep_makes_one_run_dir_and_one_wandb_run_per_job(shakespeare_data_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in tiny_run_overrides(shakespeare_data_dir) if o != "logger=none"]
    result = run_train(
        "-m",
        "optimizer.lr=1e-4,3e-4",
        *overrides,
        "trainer.num_iterations=3",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    job_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in job_dirs] == ["0", "1"]
    runs = []
    for job_dir, lr in zip(job_dirs, [1e-4, 3e-4]):
        assert OmegaConf.load(job_dir / ".hydra" / "config.yaml").optimizer.lr == lr
        assert len(train_records(job_dir)) == 3
        run, history = offline_run(job_dir)  # parsed from the run's protobuf records
        runs.append(run)
        logged = {key for row in history for key in row}
        assert {"train/loss", "train/loss_ema", "train/grad_norm", "train/mfu", "val/bpb"} <= logged
        assert run.job_type == "train"
    assert runs[0].run_id != runs[1].run_id
    for job, (run, lr) in enumerate(zip(runs, ["0.0001", "0.0003"])):  # named by choices, overrides, sweep and job
        assert run.display_name.startswith(f"d4-adamw-lr={lr}-") and run.display_name.endswith(f" (sweep #{job})")
    assert runs[0].run_group == runs[1].run_group == sweep_dir.name  # one W&B group per sweep
    assert [[t for t in run.tags if t.startswith("optimizer.lr=")] for run in runs] == [
        ["optimizer.lr=0.0001"],
        ["optimizer.lr=0.0003"],
    ]


@pytest.mark.slow
def test_a_sweep_job_failing_at_run_time_is_reported_and_the_others_continue(shakespeare_data_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    missing = tmp_path / "nowhere"
    result = run_train(
        "-m",
        f"checkpoint.resume={missing},none",  # a checkpoint is looked for when the job starts
        *tiny_run_overrides(shakespeare_data_dir),
        "trainer.num_iterations=2",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"error: checkpoint.resume={missing} does not exist." in result.stderr
    assert "sweep job 0 failed" in result.stderr
    assert not (sweep_dir / "0").exists()  # the failed job left nothing behind
    assert len(train_records(sweep_dir / "1")) == 2
