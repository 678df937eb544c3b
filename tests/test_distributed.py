"""torchrun data parallelism end to end: two Gloo processes on the CPU against one process.

The data is built so that both set-ups see the same tokens in every step (tests/token_exact_shards.py):
two ranks of device_batch_size b then train exactly like one process of 2b, and any difference in
the logged losses is the data-parallel machinery's.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAKE_VAL_BYTES
from runs import read_metrics, run_train, train_command
from token_exact_shards import publish_token_exact_shards

from nanochat.checkpoint import complete_checkpoints
from nanochat.data.shakespeare import ShakespeareCorpus

pytestmark = pytest.mark.slow

SEQUENCE_LEN = 64
ROWS_PER_RANK = 2
STEPS = 30
# Muon's Newton-Schulz runs in bf16, whose 8-bit mantissa turns the last-bit differences of summing
# gradients in another order into ~1e-5 relative loss differences that grow over steps (~1.6e-4 at
# step 28 in one measurement); AdamW's stay ~1e-7 throughout.
STEPS_WITHIN_1E_4 = {"adamw": STEPS, "adamw_muon": 20}

# Runs train.py under torchrun after patching, per rank, what a test needs (see the tests below).
LAUNCHER = """
import os, runpy, sys, time
rank = int(os.environ["RANK"])
{patch}
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory, shakespeare_data_dir, shakespeare_tokenizer) -> list[str]:
    corpus = ShakespeareCorpus(shakespeare_data_dir, val_bytes=FAKE_VAL_BYTES)
    return publish_token_exact_shards(
        tmp_path_factory.mktemp("token_exact"),
        shakespeare_tokenizer,
        tokens_per_row_group=ROWS_PER_RANK * SEQUENCE_LEN,
        num_train=24,  # even, so epochs end at the same step for 1 and 2 processes
        num_val=4,
        source_text="\n\n".join(corpus.iter_documents("train")),
    )


def tiny_run(data_overrides: list[str], rows: int, *extra: str) -> list[str]:
    return [
        *data_overrides,
        "model.n_layer=2",
        f"model.sequence_len={SEQUENCE_LEN}",
        f"trainer.device_batch_size={rows}",
        "trainer.total_batch_size=512",  # two micro-steps per update either way
        f"trainer.num_iterations={STEPS}",
        "trainer.eval_every=10",
        "trainer.eval_tokens=256",
        "trainer.sample_tokens=4",
        "logger=none",
        *extra,
    ]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def torchrun_command(*args: str, patch: str | None = None, tmp_path: Path | None = None) -> list[str]:
    launcher = [*TORCHRUN, "--standalone", "--nproc_per_node=2"]
    if patch is not None:
        patching = tmp_path / "launcher.py"
        patching.write_text(LAUNCHER.format(patch=patch))
        launcher.append(str(patching))
    return train_command(*args, launcher=launcher)


def torchrun(*args: str, cwd: Path | None = None, **launcher) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*args, **launcher), cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_overrides):
    """Completed runs by (processes, optimizer, shard_optimizer), each made once per module."""
    made = {}

    def run(processes: int, optimizer: str, shard: bool = True) -> Path:
        key = (processes, optimizer, shard if processes > 1 else None)
        if key not in made:
            run_dir = tmp_path_factory.mktemp("run")
            args = [
                f"optimizer={optimizer}",
                f"trainer.shard_optimizer={str(shard).lower()}",
                f"hydra.run.dir={run_dir}",
            ]
            if processes == 1:  # one thread, as torchrun gives each rank by default
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                result = run_train(*tiny_run(data_overrides, 2 * ROWS_PER_RANK, *args), env=env)
            else:
                result = torchrun(*tiny_run(data_overrides, ROWS_PER_RANK, *args))
            assert result.returncode == 0, result.stderr
            made[key] = run_dir
        return made[key]

    return run


def losses(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run_dir) if key in r]


@pytest.mark.parametrize("shard", [True, False], ids=["sharded", "replicated"])
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_muon"])
def test_two_ranks_of_b_rows_train_like_one_process_of_2b_rows(runs, optimizer, shard):
    one, two = runs(1, optimizer), runs(2, optimizer, shard)
    for key in ("train/loss", "val/bpb"):
        expected, got = losses(one, key), losses(two, key)
        assert [step for step, _ in got] == [step for step, _ in expected]
        for (step, a), (_, b) in zip(expected, got):
            if step < STEPS_WITHIN_1E_4[optimizer]:
                assert b == pytest.approx(a, rel=1e-4), f"{key} at step {step}"
            else:
                assert b == pytest.approx(a, rel=1e-3), f"{key} at step {step}"
    assert len(losses(two, "train/loss")) == STEPS
    checkpoint = complete_checkpoints(two / "checkpoints")[-1]
    optimizer_files = sorted(p.name for p in checkpoint.glob("optimizers*.pt"))
    expected_files = ["optimizers.rank0.pt", "optimizers.rank1.pt"] if shard else ["optimizers.pt"]
    assert optimizer_files == expected_files


def test_a_two_rank_run_makes_one_run_dir_one_metrics_file_and_one_wandb_run(data_overrides, tmp_path):
    # Rank 1 enters Hydra 1.5 s after rank 0, so their own timestamps would name different dirs.
    patch = """
import nanochat.distributed as distributed
init = distributed.init_from_env
distributed.init_from_env = lambda: (init(), time.sleep(1.5 * distributed.rank()))
"""
    args = tiny_run(data_overrides, ROWS_PER_RANK, "trainer.num_iterations=12", "logger=wandb")
    result = torchrun(*args, cwd=tmp_path, patch=patch, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    assert [p.parent for p in tmp_path.rglob("metrics.jsonl")] == run_dirs
    assert len(list((run_dirs[0] / "wandb").glob("offline-run-*"))) == 1
    assert len(losses(run_dirs[0], "train/loss")) == 12
    assert result.stdout.count("step     1/12") == 1  # rank 1 is quiet


def test_a_two_rank_run_stopped_by_sigterm_resumes_exactly(runs, data_overrides, tmp_path):
    uninterrupted = runs(2, "adamw")
    run_dir = tmp_path / "run"
    args = tiny_run(data_overrides, ROWS_PER_RANK, "optimizer=adamw", f"hydra.run.dir={run_dir}")
    process = subprocess.Popen(torchrun_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() or len(losses(run_dir, "train/loss")) < 5:
        assert process.poll() is None and time.time() < deadline, "the run ended before it was signalled"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # to torchrun, as a scheduler would; it forwards it to every rank
    stdout, stderr = process.communicate(timeout=120)
    saved = complete_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1, stderr
    stopped_at = int(saved[0].name.removeprefix("step_"))
    assert 5 <= stopped_at < STEPS
    assert "torchrun --standalone --nproc_per_node=2" in stdout  # the resume hint

    result = torchrun(*args)
    assert result.returncode == 0, result.stderr
    assert f"at step {stopped_at}" in result.stdout
    for key in ("train/loss", "train/loss_ema", "val/bpb"):
        assert losses(run_dir, key) == losses(uninterrupted, key)


def test_two_nodes_of_one_rank_train_like_two_ranks_on_one_node(runs, data_overrides, tmp_path):
    """Multi-node torchrun (c10d rendezvous), both "nodes" on this machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run_dir = tmp_path / "run"
    args = tiny_run(data_overrides, ROWS_PER_RANK, "optimizer=adamw", f"hydra.run.dir={run_dir}")
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"]
    command = train_command(*args, launcher=[*TORCHRUN, *rendezvous, "--rdzv_id=test"])
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [stderr for _, stderr in outputs]
    for key in ("train/loss", "val/bpb"):
        assert losses(run_dir, key) == losses(runs(2, "adamw"), key)


def test_a_world_size_that_does_not_divide_the_batch_is_refused_once(data_overrides, tmp_path):
    run_dir = tmp_path / "run"
    result = torchrun(
        *tiny_run(data_overrides, ROWS_PER_RANK, "trainer.total_batch_size=384", f"hydra.run.dir={run_dir}")
    )
    assert result.returncode != 0
    sentence = (
        "trainer.total_batch_size=384 is not divisible by device_batch_size x sequence_len x world_size = 2 x 64 x 2."
    )
    assert result.stderr.count(sentence) == 1, result.stderr  # rank 0 reports it; rank 1 stays quiet
    assert not run_dir.exists()


def test_ranks_launched_with_different_configs_are_refused_naming_the_key(data_overrides, tmp_path):
    patch = 'sys.argv += ["optimizer.lr=0.001"] if rank == 1 else []'
    result = torchrun(
        *tiny_run(data_overrides, ROWS_PER_RANK, f"hydra.run.dir={tmp_path / 'run'}"), patch=patch, tmp_path=tmp_path
    )
    assert result.returncode != 0
    assert "the ranks were launched with different configs: optimizer.lr is 0.003 on rank 0 and 0.001 on rank 1" in (
        result.stderr
    )


def test_when_one_rank_fails_the_other_stops_with_a_message_instead_of_hanging(data_overrides, tmp_path):
    patch = """
from nanochat.trainer import Trainer
train_step = Trainer.train_step
def failing_step(self, step):
    if rank == 1 and step == 3:
        raise RuntimeError("injected failure on rank 1")
    return train_step(self, step)
Trainer.train_step = failing_step
"""
    started = time.time()
    result = torchrun(
        *tiny_run(data_overrides, ROWS_PER_RANK, f"hydra.run.dir={tmp_path / 'run'}"), patch=patch, tmp_path=tmp_path
    )
    assert result.returncode != 0
    assert time.time() - started < 60  # not a collective timeout (60 minutes)
    assert "injected failure on rank 1" in result.stderr
    assert "error: [rank 0] lost contact with another rank" in result.stderr


def test_resuming_on_another_world_size_is_refused_naming_both_sizes(runs, data_overrides):
    two_ranks = runs(2, "adamw")
    result = run_train(*tiny_run(data_overrides, 2 * ROWS_PER_RANK, f"resume={two_ranks}"))
    assert result.returncode == 2
    assert "it was written by 2 rank(s) and this run has 1" in result.stderr


def test_resuming_sharded_state_without_sharding_is_refused(runs, data_overrides, tmp_path):
    sharded = runs(2, "adamw")
    result = torchrun(
        *tiny_run(
            data_overrides,
            ROWS_PER_RANK,
            "trainer.shard_optimizer=false",
            f"resume={sharded}",
            f"hydra.run.dir={tmp_path / 'run'}",
        )
    )
    assert result.returncode != 0
    assert (
        "its optimizer state is sharded (trainer.shard_optimizer=true) and this run has trainer.shard_optimizer=false"
        in result.stderr
    )


def test_world_size_without_torchrun_is_one_sentence(data_overrides, tmp_path):
    result = run_train(*tiny_run(data_overrides, ROWS_PER_RANK), env={**os.environ, "WORLD_SIZE": "2"}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: WORLD_SIZE=2 is set but not RANK, MASTER_ADDR, MASTER_PORT: launch multi-process training with "
        "torchrun (e.g. torchrun --standalone --nproc_per_node=2 train.py)."
    )
