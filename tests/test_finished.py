"""A finished run's checkpoint, loaded on its own: the model it trained and the tokenizer it used."""

import shutil

import pytest
import torch
from configs import TEST_RUN_BASICS
from conftest import FAKE_VAL_BYTES, FAKE_VOCAB_SIZE
from runs import assemble_run

from nanochat.checkpoint import TOKENIZER_FILE, complete_checkpoints
from nanochat.errors import UserError
from nanochat.finished import load_finished


@pytest.fixture(scope="module")
def finished_run(shakespeare_data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    overrides = [
        f"data.data_dir={shakespeare_data_dir}",
        f"data.val_bytes={FAKE_VAL_BYTES}",
        f"tokenizer.vocab_size={FAKE_VOCAB_SIZE}",
        "model.n_layer=2",
        *TEST_RUN_BASICS,
        "model.sequence_len=64",
        "model.n_kv_head=1",
        "trainer.device_batch_size=4",
        "trainer.num_iterations=3",
        "checkpoint.save_every=2",
        "eval.tokens=256",
        "sample.tokens=4",
        "system.peak_flops=1e12",
        "logger=none",
    ]
    run = assemble_run(*overrides, run_dir=run_dir)
    run.fit()
    return run, run_dir


def test_the_loaded_model_gives_the_trained_models_logits(finished_run):
    run, run_dir = finished_run
    finished = load_finished(run_dir)
    assert finished.step == 3 and finished.path.name == "step_000003"
    tokens = torch.randint(0, FAKE_VOCAB_SIZE, (2, 64), generator=torch.Generator().manual_seed(0))
    run.trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(finished.model(tokens), run.trainer.model(tokens))
    assert finished.tokenizer.fingerprint() == run.trainer.tokenizer.fingerprint()
    assert finished.config["model"]["n_kv_head"] == 1


def test_a_checkpoint_folder_loads_that_checkpoint(finished_run):
    _, run_dir = finished_run
    older = complete_checkpoints(run_dir / "checkpoints")[0]
    assert load_finished(older).step == 2


def test_a_checkpoint_without_its_tokenizer_file_uses_the_tokenizer_its_config_names(finished_run, tmp_path):
    _, run_dir = finished_run
    copy = tmp_path / "step_000003"
    shutil.copytree(complete_checkpoints(run_dir / "checkpoints")[-1], copy)
    (copy / TOKENIZER_FILE).unlink()
    assert load_finished(copy).tokenizer.fingerprint() == load_finished(run_dir).tokenizer.fingerprint()


def test_a_path_without_a_checkpoint_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match=f"^{tmp_path / 'nowhere'} does not exist.$"):
        load_finished(tmp_path / "nowhere")
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        load_finished(tmp_path)
