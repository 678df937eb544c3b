"""End to end through `python train.py`, on the synthetic Shakespeare corpus (no network)."""

import json
from pathlib import Path

import pytest
from conftest import FAKE_VAL_BYTES, FAKE_VOCAB_SIZE
from omegaconf import OmegaConf
from runs import read_metrics, run_train
from wandb_records import offline_run

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

pytestmark = pytest.mark.slow


def fake_corpus_overrides(data_dir: Path) -> list[str]:
    """Point a run at the conftest's prepared synthetic corpus and its tokenizer."""
    return [f"data.data_dir={data_dir}", f"data.val_bytes={FAKE_VAL_BYTES}", f"tokenizer.vocab_size={FAKE_VOCAB_SIZE}"]


def tiny_run_overrides(data_dir: Path) -> list[str]:
    return [
        *fake_corpus_overrides(data_dir),
        "model.n_layer=2",
        "model.sequence_len=64",
        "trainer.device_batch_size=8",
        "trainer.total_batch_size=1024",  # two micro-steps: grad accumulation is exercised
        "trainer.eval_tokens=2048",
        "trainer.sample_tokens=8",
    ]


def test_tiny_run_lowers_the_loss_and_writes_its_run_dir(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        *tiny_run_overrides(shakespeare_data_dir),
        "trainer.num_iterations=60",
        "trainer.eval_every=30",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    records = read_metrics(run_dir)
    train_records = [r for r in records if "train/loss" in r]
    val_records = [r for r in records if "val/bpb" in r]
    assert [r["step"] for r in train_records] == list(range(60))
    assert all(key in r for r in train_records for key in LOGGED_EVERY_STEP)
    assert train_records[-1]["train/loss_ema"] < train_records[0]["train/loss"] - 1.0
    assert [r["step"] for r in val_records] == [0, 30, 60]
    assert val_records[-1]["val/bpb"] < val_records[0]["val/bpb"] - 0.3
    assert (run_dir / "checkpoints" / "step_000060" / "COMPLETE").exists()
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["step"] == 60 for s in samples)
    assert list((run_dir / "wandb").glob("offline-run-*")), "the default logger keeps an offline W&B run"
    assert "val bpb" in result.stdout and "tok/s" in result.stdout


def test_d12_with_muon_runs_and_logs_every_metric(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        "model=d12",
        "optimizer=adamw_muon",
        # bf16 Newton-Schulz on 48 matrices of d12 is minutes per step on a CPU without native bf16
        # matmuls; the bf16 path is tested on smaller models (tests/test_optim.py, test_distributed.py).
        "optimizer.ns_dtype=float32",
        "trainer.num_iterations=2",
        "trainer.device_batch_size=1",
        "trainer.total_batch_size=64",
        "model.sequence_len=64",
        *fake_corpus_overrides(shakespeare_data_dir),
        "trainer.eval_tokens=256",
        "trainer.sample_tokens=4",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "train/loss" in r] == [0, 1]
    assert all(key in r for r in records if "train/loss" in r for key in LOGGED_EVERY_STEP)
    assert "parameters: 85," in result.stdout  # 12 x 12 x 768^2 block weights + embeddings


def test_lr_sweep_makes_one_run_dir_and_one_wandb_run_per_job(shakespeare_data_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "-m",
        "optimizer.lr=1e-4,3e-4",
        *tiny_run_overrides(shakespeare_data_dir),
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
        assert len([r for r in read_metrics(job_dir) if "train/loss" in r]) == 3
        run, history = offline_run(job_dir)  # parsed from the run's protobuf records
        runs.append(run)
        logged = {key for row in history for key in row}
        assert {"train/loss", "train/loss_ema", "train/grad_norm", "train/mfu", "val/bpb"} <= logged
        assert run.job_type == "train"
    assert runs[0].run_id != runs[1].run_id
    assert runs[0].run_group == runs[1].run_group == sweep_dir.name  # one W&B group per sweep
    assert [[t for t in run.tags if t.startswith("optimizer.lr=")] for run in runs] == [
        ["optimizer.lr=0.0001"],
        ["optimizer.lr=0.0003"],
    ]


def test_a_failing_sweep_job_is_reported_and_the_others_continue(shakespeare_data_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "-m",
        "optimizer.lr=-1,3e-4",
        *tiny_run_overrides(shakespeare_data_dir),
        "trainer.num_iterations=2",
        "logger=none",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "error: optimizer.lr=-1 must be a positive learning rate." in result.stderr
    assert "sweep job 0 failed" in result.stderr
    assert len([r for r in read_metrics(sweep_dir / "1") if "train/loss" in r]) == 2


def test_bad_config_exits_with_one_sentence_and_leaves_no_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train("trainer.total_batch_size=1000", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: trainer.total_batch_size=1000 is not divisible by device_batch_size x sequence_len x "
        "world_size = 8 x 256 x 1."
    ]
    assert not run_dir.exists()


def test_a_component_refusing_its_arguments_gives_its_sentence_not_hydras_traceback(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train("data.val_bytes=-5", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # raised inside instantiate()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: data.val_bytes=-5 must be a positive integer."]
    assert not run_dir.exists()


@pytest.mark.parametrize("args", [["trainer.lrr=0.1"], ["-m", "trainer.lrr=0.1,0.2"]], ids=["run", "sweep"])
def test_misspelt_key_is_named_without_a_traceback(args, tmp_path):
    result = run_train(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not override 'trainer.lrr'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
