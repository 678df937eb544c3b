"""Faults at every boundary, each one sentence and nothing lost: checkpoints that cannot be written,
W&B failing mid-run, dirs that cannot be created, a run dir a live run holds, and steps whose loss
or grad norm is not finite."""

import errno
import math

import pytest
import torch
from configs import TEST_RUN_BASICS
from conftest import FAKE_VAL_BYTES, FAKE_VOCAB_SIZE
from runs import assemble_run, read_metrics, run_train

from nanochat.assemble import check_jobs
from nanochat.checkpoint import complete_checkpoints
from nanochat.config import as_user_error
from nanochat.errors import UserError
from nanochat.run_dir import RunDirLock


def tiny(data_dir, *extra: str) -> list[str]:
    return [
        f"data.data_dir={data_dir}",
        f"data.val_bytes={FAKE_VAL_BYTES}",
        f"tokenizer.vocab_size={FAKE_VOCAB_SIZE}",
        "model.n_layer=2",
        *TEST_RUN_BASICS,
        "model.sequence_len=64",
        "trainer.device_batch_size=4",
        "trainer.num_iterations=6",
        "checkpoint.save_every=2",
        "eval.every=-1",
        "eval.tokens=256",
        "sample.tokens=4",
        "system.peak_flops=1e12",
        "logger=none",
        *extra,
    ]


def files_of(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}


@pytest.fixture
def disk_full_at_save(monkeypatch):
    """torch.save fails (as on a full disk) from the given save on, after writing part of a file."""
    import nanochat.checkpoint as checkpoint

    save, calls = checkpoint.torch.save, {"saves": 0}

    def failing_save(obj, path):
        if path.name == "model.pt":
            calls["saves"] += 1
        if calls["saves"] >= calls.get("fail_from", 10**9):
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save(obj, path)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    return calls


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_older_ones(
    shakespeare_data_dir, tmp_path, disk_full_at_save
):
    run_dir = tmp_path / "run"
    disk_full_at_save["fail_from"] = 2  # the save at step 4
    run = assemble_run(*tiny(shakespeare_data_dir), run_dir=run_dir)
    with pytest.raises(UserError) as error:
        run.fit()
    assert str(error.value).startswith(f"cannot write checkpoint {run_dir / 'checkpoints' / 'step_000004'} (No space")
    assert str(error.value).endswith("; the checkpoints before it are intact.")
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000002"]  # no temporaries left
    assert load_step(run_dir) == 2


def load_step(run_dir) -> int:
    from nanochat.checkpoint import load_checkpoint

    return load_checkpoint(complete_checkpoints(run_dir / "checkpoints")[-1]).step


def test_with_write_errors_warn_the_run_goes_on_without_that_checkpoint(shakespeare_data_dir, tmp_path, disk_full_at_save):
    run_dir = tmp_path / "run"
    disk_full_at_save["fail_from"] = 2
    run = assemble_run(*tiny(shakespeare_data_dir, "checkpoint.write_errors=warn"), run_dir=run_dir)
    with pytest.warns(UserWarning, match="cannot write checkpoint .*step_000004.* Training goes on"):
        final = run.fit()
    assert math.isfinite(final["val/bpb"])
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == list(range(6))
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000002"]


class FailingWandbRun:
    def __init__(self):
        self.logged = 0

    def log(self, metrics, step):
        self.logged += 1
        if self.logged == 3:
            raise ConnectionError("wandb service went away")

    def finish(self):
        raise AssertionError("a failed W&B run is not touched again")


def test_wandb_failing_mid_run_costs_one_warning_and_not_the_run(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run = assemble_run(*tiny(shakespeare_data_dir), run_dir=run_dir)
    run.tracker.wandb_run = failing = FailingWandbRun()
    with pytest.warns(UserWarning, match="W&B failed \\(ConnectionError: wandb service went away\\); logging to metrics"):
        run.fit()
    assert failing.logged == 3
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == list(range(6))


def test_a_run_dir_that_a_live_run_holds_is_refused_naming_it(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    holder = RunDirLock(run_dir)  # a live run's lock (another open file: flock tells them apart)
    try:
        with pytest.raises(UserError, match=rf"^{run_dir} is in use by a live run, pid \d+ on host .+ \(since .+\): wait"):
            check_jobs([*tiny(shakespeare_data_dir), f"hydra.run.dir={run_dir}"])
        with pytest.raises(UserError, match="is in use by a live run"):
            assemble_run(*tiny(shakespeare_data_dir), run_dir=run_dir)
    finally:
        holder.release()
    check_jobs([*tiny(shakespeare_data_dir), f"hydra.run.dir={run_dir}"])  # free again once it ended


def test_a_run_dir_that_cannot_be_created_is_one_sentence(shakespeare_data_dir):
    with pytest.raises(UserError, match=r"^hydra.run.dir=/proc/nanochat/run cannot be created or written: "):
        check_jobs([*tiny(shakespeare_data_dir), "hydra.run.dir=/proc/nanochat/run"])


def test_an_os_error_the_run_meets_is_one_sentence_naming_the_path():
    try:
        (__import__("pathlib").Path("/proc/nanochat") / "data").mkdir(parents=True)
    except OSError as error:
        sentence = str(as_user_error(error))
    assert sentence.startswith("cannot create or write /proc/nanochat: ") and sentence.endswith(".")


@pytest.mark.slow
def test_a_data_dir_that_cannot_be_created_ends_the_run_with_one_sentence(tmp_path):
    result = run_train("data.data_dir=/proc/nanochat/data", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot create or write /proc/nanochat"), result.stderr
    assert not (tmp_path / "run").exists()


class NanAt(torch.nn.Module):
    """The model, with the training loss made NaN in the micro-steps of update `step` (evaluation,
    the data and the weights untouched)."""

    def __init__(self, model, step: int, micro_steps: int):
        super().__init__()
        self.model, self.step, self.micro_steps, self.calls = model, step, micro_steps, 0

    def forward(self, inputs, targets=None, loss_reduction="mean"):
        loss = self.model(inputs, targets, loss_reduction=loss_reduction)
        if targets is not None and loss_reduction == "mean":
            self.calls += 1
            if (self.calls - 1) // self.micro_steps == self.step:
                return loss * float("nan")
        return loss


def nan_at(run, step: int) -> None:
    run.trainer.forward = NanAt(run.trainer.model, step, run.trainer.grad_accum_steps)


def test_a_nonfinite_step_is_not_applied_and_stops_the_run_naming_it(shakespeare_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run = assemble_run(*tiny(shakespeare_data_dir), run_dir=run_dir)
    nan_at(run, 3)
    with pytest.raises(UserError) as error:
        run.fit()
    assert str(error.value) == (
        "step 3: the train loss is nan and the grad norm nan; the update was not applied and the run stops after 1 "
        "such step(s) in a row (trainer.skip_nonfinite=0); the checkpoints before it are kept as they were."
    )
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step_000002"]
    assert all(torch.isfinite(p).all() for p in run.trainer.model.parameters())


def test_nonfinite_steps_within_the_allowance_are_skipped_and_counted(shakespeare_data_dir, tmp_path):
    run_dir, reference_dir = tmp_path / "run", tmp_path / "reference"
    run = assemble_run(*tiny(shakespeare_data_dir, "trainer.skip_nonfinite=1"), run_dir=run_dir)
    nan_at(run, 3)
    weights = {}
    step = run.trainer.train_step

    def remember(s):  # the weights before and after the poisoned update
        if s == 3:
            weights["before"] = [p.detach().clone() for p in run.trainer.model.parameters()]
        metrics = step(s)
        if s == 3:
            weights["after"] = [p.detach().clone() for p in run.trainer.model.parameters()]
        return metrics

    run.trainer.train_step = remember
    with pytest.warns(UserWarning, match=r"step 3: the train loss is nan and the grad norm nan; the update was skipped"):
        run.fit()
    assert all(torch.equal(a, b) for a, b in zip(weights["before"], weights["after"]))
    records = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["train/skipped_steps"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert records[3]["train/loss"] is None and records[4]["train/loss"] is not None
    reference = assemble_run(*tiny(shakespeare_data_dir), run_dir=reference_dir)
    reference.fit()
    assert [r["train/loss"] for r in records[:3]] == [
        r["train/loss"] for r in read_metrics(reference_dir) if "train/loss" in r
    ][:3]
