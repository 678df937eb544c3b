"""torchrun data parallelism end to end: two Gloo processes on the CPU against one process, on the
synthetic Shakespeare corpus as it comes (no specially built shards).

Every row of an optimizer step is read by its own lane (nanochat/data/loader.py, LaneLoader), so
1 process of 8 rows, 2 ranks of 4 and 2 ranks of 2 rows x 2 accumulation steps train on the same
tokens in every step, and any difference in the logged losses is the data-parallel machinery's.
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from configs import TEST_RUN_BASICS
from conftest import FAKE_VAL_BYTES, FAKE_VOCAB_SIZE
from pausing import continue_once_pending, launcher_script, pause_env, wait_until, wait_until_paused
from runs import read_metrics, run_train, train_command

from nanochat.checkpoint import complete_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow

SEQUENCE_LEN = 64
ROWS = 8  # per optimizer step: trainer.total_batch_size = 8 x 64
STEPS = 30

# How far another split of a step may drift from 1 process of 8 rows, relative, at every logged
# step. The set-ups see the same tokens and do the same arithmetic except the order in which
# gradients are summed (over ranks and micro-steps instead of within one batch). In fp32 each such
# sum is exact to fp32's 6e-8 relative, and the drift over this run stays near 1e-7 (the test
# prints it): 1e-4 is three orders of magnitude above that and two below what a real error (a
# missed shard, a wrong average, a lane read twice) does to the loss within a step. Muon's
# Newton-Schulz in bf16 (nanochat's default) rounds every update to bf16's 8 significant bits, so
# last-bit differences in its input can come out as one bf16 rounding (2^-8 relative) of the
# update, and the loss then differs by up to that much. The fp32 set-ups therefore run Muon with
# optimizer.ns_dtype=float32 and are held to 1e-4; the bf16 one is held to bf16's unit roundoff.
SETUPS = {
    "adamw": (["optimizer=adamw"], 1e-4),
    "adamw_muon_fp32": (["optimizer=adamw_muon", "optimizer.ns_dtype=float32"], 1e-4),
    "adamw_muon_bf16": (["optimizer=adamw_muon"], 2.0**-8),
}

# Runs train.py under torchrun after patching, per rank, what a test needs (see the tests below).
LAUNCHER = """
import os, runpy, sys, time
rank = int(os.environ["RANK"])
{patch}
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def data_overrides(shakespeare_data_dir) -> list[str]:
    return [
        f"data.data_dir={shakespeare_data_dir}",
        f"data.val_bytes={FAKE_VAL_BYTES}",
        f"tokenizer.vocab_size={FAKE_VOCAB_SIZE}",
    ]


def tiny_run(data_overrides: list[str], rows: int, *extra: str) -> list[str]:
    return [
        *data_overrides,
        "model.n_layer=2",
        *TEST_RUN_BASICS,
        f"model.sequence_len={SEQUENCE_LEN}",
        f"trainer.device_batch_size={rows}",
        f"trainer.total_batch_size={ROWS * SEQUENCE_LEN}",
        f"trainer.num_iterations={STEPS}",
        "schedule=constant",  # the run length does not shape it: a run cut short and continued is the whole run
        "eval.every=10",
        f"eval.tokens={ROWS * SEQUENCE_LEN}",
        "sample.tokens=4",
        "system.peak_flops=1e12",
        "logger=none",
        *extra,
    ]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def torchrun_command(
    *args: str, patch: str | None = None, tmp_path: Path | None = None, launcher: list[str] = ()
) -> list[str]:
    command = [*TORCHRUN, "--standalone", "--nproc_per_node=2", *launcher]
    if patch is not None:
        patching = tmp_path / "launcher.py"
        patching.write_text(LAUNCHER.format(patch=patch))
        command.append(str(patching))
    return train_command(*args, launcher=command)


def torchrun(*args: str, cwd: Path | None = None, timeout: int = 300, **launcher) -> subprocess.CompletedProcess:
    command = torchrun_command(*args, **launcher)
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(
            f"torchrun did not finish within {timeout}s (ranks waiting on each other?); stderr: {expired.stderr}"
        )


def train_once(processes: int, rows: int, *args: str) -> subprocess.CompletedProcess:
    if processes == 1:  # one thread, as torchrun gives each rank by default
        return run_train(*args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return torchrun(*args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_overrides):
    """Completed runs by (processes, rows per micro-step, set-up, shard_optimizer), made once per module."""
    made = {}

    def run(processes: int, rows: int, setup: str = "adamw", shard: bool = True) -> Path:
        key = (processes, rows, setup, shard if processes > 1 else None)
        if key not in made:
            run_dir = tmp_path_factory.mktemp("run")
            extra = [*SETUPS[setup][0], f"system.shard_optimizer={str(shard).lower()}", f"hydra.run.dir={run_dir}"]
            result = train_once(processes, rows, *tiny_run(data_overrides, rows, *extra))
            assert result.returncode == 0, result.stderr
            made[key] = run_dir
        return made[key]

    return run


def losses(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run_dir) if key in r]


def assert_close_runs(
    expected_dir: Path, got_dir: Path, bound: float, what: str, keys=("train/loss", "val/bpb")
) -> None:
    for key in keys:
        expected, got = losses(expected_dir, key), losses(got_dir, key)
        assert [step for step, _ in got] == [step for step, _ in expected], key
        drift = max(abs(b - a) / abs(a) for (_, a), (_, b) in zip(expected, got))
        print(f"{what} {key}: largest relative difference {drift:.2e} (bound {bound:.1e})")
        for (step, a), (_, b) in zip(expected, got):
            assert b == pytest.approx(a, rel=bound), f"{what}: {key} at step {step}"


SPLITS = [  # (set-up, rows per micro-step on each of 2 ranks, sharded): each against 1 process of 8 rows
    ("adamw", 4, True),
    ("adamw", 2, True),
    ("adamw", 2, False),
    ("adamw_muon_fp32", 2, True),
    ("adamw_muon_fp32", 2, False),
    ("adamw_muon_bf16", 4, True),
    ("adamw_muon_bf16", 2, True),
]


@pytest.mark.parametrize(
    "setup, rows, shard",
    SPLITS,
    ids=[f"{s}-2x{r}{'x2' if r == 2 else ''}-{'sharded' if z else 'replicated'}" for s, r, z in SPLITS],
)
def test_every_split_of_a_step_over_ranks_and_micro_steps_trains_like_one_process(runs, setup, rows, shard):
    one, two = runs(1, ROWS, setup), runs(2, rows, setup, shard)
    assert_close_runs(one, two, SETUPS[setup][1], f"{setup} 2 ranks x {rows} rows")
    assert len(losses(two, "train/loss")) == STEPS
    checkpoint = complete_checkpoints(two / "checkpoints")[-1]
    optimizer_files = sorted(p.name for p in checkpoint.glob("optimizers*.pt"))
    expected_files = ["optimizers.rank0.pt", "optimizers.rank1.pt"] if shard else ["optimizers.pt"]
    assert optimizer_files == expected_files


RESHAPES = [  # (first part: processes, rows, sharded) -> (continuation: processes, rows, sharded)
    ((2, 2, True), (1, 8, True)),
    ((1, 8, True), (2, 4, True)),
    ((2, 2, True), (2, 4, False)),
]


@pytest.mark.parametrize(
    "first, then",
    RESHAPES,
    ids=["2 ranks sharded -> 1 process", "1 process -> 2 ranks sharded", "sharded -> replicated"],
)
def test_a_run_continued_on_another_world_size_or_layout_trains_like_the_uninterrupted_one(
    runs, data_overrides, tmp_path, first, then
):
    """Half the run, then the other half on another cluster shape: the optimizer state and the data
    lanes are re-split from the checkpoint."""
    run_dir = tmp_path / "run"

    def part(shape, steps):
        processes, rows, shard = shape
        extra = [
            f"trainer.num_iterations={steps}",
            f"system.shard_optimizer={str(shard).lower()}",
            f"hydra.run.dir={run_dir}",
        ]
        result = train_once(processes, rows, *tiny_run(data_overrides, rows, *extra))
        assert result.returncode == 0, result.stderr
        return result

    part(first, STEPS // 2)
    resumed = part(then, STEPS)
    assert f"resumed from {run_dir / 'checkpoints' / 'step_000015'} at step 15 (continuing this run" in resumed.stdout
    assert_close_runs(runs(1, ROWS), run_dir, SETUPS["adamw"][1], f"{first} -> {then}", keys=("train/loss",))
    saved = load_checkpoint(complete_checkpoints(run_dir / "checkpoints")[-1]).meta
    assert (saved["world_size"], saved["sharded_optimizer"]) == (then[0], then[2] and then[0] > 1)


def test_a_two_rank_run_makes_one_run_dir_one_metrics_file_and_one_wandb_run(data_overrides, tmp_path):
    # Rank 1 enters Hydra 1.5 s after rank 0, so their own timestamps would name different dirs.
    patch = """
import nanochat.distributed as distributed
init = distributed.init_from_env
distributed.init_from_env = lambda: (init(), time.sleep(1.5 * distributed.rank()))
"""
    args = tiny_run(data_overrides, 4, "trainer.num_iterations=12", "logger=wandb")
    result = torchrun(*args, cwd=tmp_path, patch=patch, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    assert [p.parent for p in tmp_path.rglob("metrics.jsonl")] == run_dirs
    assert len(list((run_dirs[0] / "wandb").glob("offline-run-*"))) == 1
    assert len(losses(run_dirs[0], "train/loss")) == 12
    assert result.stdout.count("step     1/12") == 1  # rank 1 is quiet


def test_a_two_rank_run_stopped_by_sigterm_resumes_exactly(runs, data_overrides, tmp_path):
    uninterrupted = runs(2, 2)
    run_dir = tmp_path / "run"
    args = tiny_run(data_overrides, 2, "optimizer=adamw", "system.shard_optimizer=true", f"hydra.run.dir={run_dir}")
    # Rank 0 stops itself just before update 5; the SIGTERM that torchrun forwards to it is handled
    # there, so the ranks agree to stop after update 5 and save at 6, however loaded the machine is.
    pid_file = tmp_path / "rank0.pid"
    env = pause_env(before_step=5, pid_file=pid_file)
    command = torchrun_command(*args, launcher=[str(launcher_script(tmp_path))])
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(pid_file.exists, "rank 0 to start", alive=lambda: process.poll() is None)
    rank0 = int(pid_file.read_text())
    wait_until_paused(process, rank0)
    process.send_signal(signal.SIGTERM)  # to torchrun, as a scheduler would; it forwards it to every rank
    continue_once_pending(rank0, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    saved = complete_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in saved] == ["step_000006"], stderr
    stopped_at = 6
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
    args = tiny_run(data_overrides, 2, "optimizer=adamw", "system.shard_optimizer=true", f"hydra.run.dir={run_dir}")
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"]
    command = train_command(*args, launcher=[*TORCHRUN, *rendezvous, "--rdzv_id=test"])
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [stderr for _, stderr in outputs]
    for key in ("train/loss", "val/bpb"):
        assert losses(run_dir, key) == losses(runs(2, 2), key)


def test_a_world_size_that_does_not_divide_the_batch_is_refused_once(data_overrides, tmp_path):
    run_dir = tmp_path / "run"
    result = torchrun(*tiny_run(data_overrides, 2, "trainer.total_batch_size=384", f"hydra.run.dir={run_dir}"))
    assert result.returncode != 0
    sentence = (
        "trainer.total_batch_size=384 is not divisible by device_batch_size x sequence_len x world_size = 2 x 64 x 2."
    )
    assert result.stderr.count(sentence) == 1, result.stderr  # rank 0 reports it; rank 1 stays quiet
    assert not run_dir.exists()


def test_ranks_launched_with_different_configs_are_refused_naming_the_key(data_overrides, tmp_path):
    patch = 'sys.argv += ["optimizer.lr=0.001"] if rank == 1 else []'
    result = torchrun(*tiny_run(data_overrides, 2, f"hydra.run.dir={tmp_path / 'run'}"), patch=patch, tmp_path=tmp_path)
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
    result = torchrun(  # a hang (the collective timeout is 60 minutes) fails inside torchrun()
        *tiny_run(data_overrides, 2, f"hydra.run.dir={tmp_path / 'run'}"), patch=patch, tmp_path=tmp_path
    )
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    assert "error: [rank 0] lost contact with another rank" in result.stderr


def test_a_rank_killed_under_max_restarts_restarts_the_job_which_finishes_as_if_uninterrupted(
    runs, data_overrides, tmp_path
):
    """torchrun --max-restarts=1: rank 1 is SIGKILLed just before update 13 (checkpoints every 4
    steps); torchrun restarts both ranks, they resume from step 12 by themselves and finish with
    the uninterrupted run's weights, bit for bit."""
    run_dir, pid_file = tmp_path / "run", tmp_path / "rank1.pid"
    args = tiny_run(data_overrides, 2, "optimizer=adamw", "checkpoint.save_every=4", f"hydra.run.dir={run_dir}")
    command = train_command(
        *args,
        launcher=[*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1", str(launcher_script(tmp_path))],
    )
    env = pause_env(before_step=13, rank=1, pid_file=pid_file)  # the launcher pauses on the first attempt only
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(pid_file.exists, "rank 1 to start", alive=lambda: process.poll() is None)
    rank1 = int(pid_file.read_text())
    wait_until_paused(process, rank1)
    os.kill(rank1, signal.SIGKILL)
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the restarted job did not finish within 600 s")
    assert process.returncode == 0, stderr
    assert f"resumed from {run_dir / 'checkpoints' / 'step_000012'} at step 12" in stdout
    final = load_checkpoint(complete_checkpoints(run_dir / "checkpoints")[-1]).payload["model"]
    reference = load_checkpoint(complete_checkpoints(runs(2, 2) / "checkpoints")[-1]).payload["model"]
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)


def test_max_restarts_without_a_fixed_run_dir_is_one_sentence(data_overrides, tmp_path):
    result = torchrun(*tiny_run(data_overrides, 2), cwd=tmp_path, launcher=["--max-restarts=1"])
    assert result.returncode != 0
    # torchrun restarts a job whatever made it fail: each of its 1 + 1 attempts is refused alike.
    refusal = "error: [rank 0] torchrun --max-restarts=1 needs a fixed hydra.run.dir=<dir>"
    assert result.stderr.count(refusal) == 2, result.stderr
    assert not (tmp_path / "outputs").exists()


def test_world_size_without_torchrun_is_one_sentence(data_overrides, tmp_path):
    result = run_train(*tiny_run(data_overrides, 2), env={**os.environ, "WORLD_SIZE": "2"}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: WORLD_SIZE=2 is set but not RANK, MASTER_ADDR, MASTER_PORT: launch multi-process training with "
        "torchrun (e.g. torchrun --standalone --nproc_per_node=2 train.py)."
    )
