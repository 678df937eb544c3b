"""Every config composes and builds; every user mistake is one sentence naming key and value."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nanochat.config import validate
from nanochat.errors import UserError
from nanochat.model import GPT

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_has_the_documented_groups():
    cfg = compose_config()
    assert cfg.model.n_layer == 4 and cfg.model.n_embd == 256
    assert cfg.optimizer._target_ == "nanochat.optim.adamw" and cfg.optimizer.lr > 0
    assert cfg.data._target_.endswith("ShakespeareCorpus")
    assert cfg.logger.mode == "offline"


@pytest.mark.parametrize("model", choices("model"))
def test_every_model_follows_the_depth_rule_and_builds_on_meta(model):
    cfg = compose_config(f"model={model}")
    depth = int(model.removeprefix("d"))
    assert (cfg.model.n_layer, cfg.model.n_embd) == (depth, 64 * depth)
    assert cfg.model.n_head == -(-64 * depth // 128) == cfg.model.n_kv_head
    assert cfg.model.vocab_size == cfg.tokenizer.vocab_size
    validate(cfg)
    with torch.device("meta"):
        gpt = GPT(instantiate(cfg.model))
        for optimizer in choices("optimizer"):
            built = instantiate(compose_config(f"model={model}", f"optimizer={optimizer}").optimizer)(gpt)
            assert all(isinstance(o, torch.optim.Optimizer) for o in built)
    assert gpt.num_params() > 0


def test_vocab_size_is_taken_from_the_tokenizer():
    assert compose_config("tokenizer.vocab_size=8192").model.vocab_size == 8192


def test_n_layer_override_walks_the_depth_series():
    cfg = compose_config("model.n_layer=10")
    assert (cfg.model.n_embd, cfg.model.n_head) == (640, 5)


@pytest.mark.parametrize("group", ["data", "logger"])
def test_every_data_and_logger_config_instantiates(group, tmp_path):
    for choice in choices(group):
        cfg = compose_config(f"{group}={choice}", f"data.data_dir={tmp_path}")
        validate(cfg)
        assert callable(instantiate(cfg[group], _partial_=True))


BAD_INPUTS = [
    (["model.n_head=3"], "model.n_embd=256 is not divisible by model.n_head=3."),
    (["model=d8", "model.n_kv_head=3"], "model.n_head=4 is not divisible by model.n_kv_head=3"),
    (["model.n_embd=250"], "model.n_embd / model.n_head = 250 / 2 = 125 is odd"),
    (
        ["trainer.total_batch_size=1000", "trainer.device_batch_size=8"],
        "trainer.total_batch_size=1000 is not divisible by device_batch_size x sequence_len x world_size "
        "= 8 x 256 x 1.",
    ),
    (["optimizer.lr=0"], "optimizer.lr=0 must be a positive learning rate."),
    (["optimizer=adamw_muon", "optimizer.matrix_lr=-0.02"], "optimizer.matrix_lr=-0.02 must be a positive"),
    (["trainer.device_batch_size=0"], "trainer.device_batch_size=0 must be a positive number."),
    (["model.sequence_len=-5"], "model.sequence_len=-5 must be a positive number."),
    (["model.n_layer=0"], "model.n_layer=0 must be a positive number."),
    (
        ["trainer.warmup_ratio=0.6", "trainer.warmdown_ratio=0.5"],
        "trainer.warmup_ratio + trainer.warmdown_ratio = 0.6 + 0.5 exceeds 1",
    ),
    (["trainer.device=tpu"], "trainer.device=tpu is not one of auto, cpu, cuda, mps."),
    (["trainer.dtype=float16"], "trainer.dtype=float16 is not one of auto, float32, bfloat16."),
    (["trainer.eval_tokens=100"], "trainer.eval_tokens=100 is smaller than one evaluation batch"),
    (["trainer.num_iterations=0"], "trainer.num_iterations=0 must be positive, or -1 to derive it."),
    (["trainer.grad_clip=-1"], "trainer.grad_clip=-1 must be >= 0"),
    (["logger.mode=loud"], "logger.mode=loud is not one of offline, online, disabled."),
    (["tokenizer.vocab_size=200"], "tokenizer.vocab_size=200 must exceed 265"),
]


@pytest.mark.parametrize("overrides, sentence", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_rejected_with_one_sentence_naming_key_and_value(overrides, sentence):
    with pytest.raises(UserError) as error:
        validate(compose_config(*overrides))
    assert sentence in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_without_cuda_is_rejected():
    with pytest.raises(UserError, match="trainer.device=cuda was asked for, but PyTorch sees no CUDA device"):
        validate(compose_config("trainer.device=cuda"))


def test_world_size_enters_the_batch_arithmetic():
    with pytest.raises(UserError, match="= 8 x 256 x 3"):
        validate(compose_config(), world_size=3)


SWEEPS_DIR = CONF_DIR.parent / "sweeps"


def first_value(key: str, values) -> str:
    """`key=<first value>` of a sweep param, read with Hydra's override grammar: a list, choice() or
    range() gives its first element, an Optuna interval() its lower bound."""
    override = OverridesParser.create().parse_override(f"{key}={values}")
    if not override.is_sweep_override():
        return f"{key}={override.get_value_element_as_str()}"
    if isinstance(override.value(), IntervalSweep):
        return f"{key}={override.value().start}"
    return f"{key}={next(override.sweep_string_iterator())}"


@pytest.mark.parametrize("sweep", sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
def test_every_sweep_file_composes_with_its_first_values(sweep, tmp_path):
    def show(part: str, *overrides: str) -> dict:
        command = [sys.executable, str(CONF_DIR.parent / "train.py"), "-cd", str(SWEEPS_DIR), "-cn", sweep]
        result = subprocess.run([*command, *overrides, "--cfg", part], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)

    params = show("hydra")["hydra"]["sweeper"]["params"]
    assert params, f"{sweep} sweeps nothing"
    first_values = [first_value(key, values) for key, values in params.items()]
    job = show("job", *first_values)
    validate(OmegaConf.create(job))
