"""Every config composes against its schema and builds real objects; every user mistake is one
sentence naming the key, the value and what is expected, before any work (in-process here; the
exit code and the absent run dir through train.py in test_train.py)."""

import shutil

import pytest
import torch
from configs import compose

from nanochat.assemble import check, check_jobs
from nanochat.config import CONF_DIR, compose_cli, without_hydra
from nanochat.data.corpus import ParquetCorpus
from nanochat.errors import UserError
from nanochat.interface import LanguageModel
from nanochat.model import GPT
from nanochat.tokenizer import TokenizerSpec
from nanochat.tracking import Tracker

SWEEPS_DIR = CONF_DIR.parent / "sweeps"
GROUPS = ("model", "optimizer", "schedule", "data", "logger", "experiment", "debug")


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_default_config_has_the_documented_groups_and_nodes():
    cfg = compose()
    assert cfg.model.n_layer == 4 and cfg.model.n_embd == 256
    assert cfg.optimizer._target_ == "nanochat.optim.adamw_muon" and cfg.optimizer.matrix_lr > 0
    assert cfg.schedule._target_ == "nanochat.schedules.Trapezoid"
    assert cfg.data._target_.endswith("ShakespeareCorpus")
    assert cfg.logger.mode == "offline"
    assert set(cfg) == {"model", "optimizer", "schedule", "data", "tokenizer", "logger"} | {
        "trainer",
        "eval",
        "sample",
        "checkpoint",
        "system",
        "profile",
    }


def built(components) -> None:
    """What check() builds is real objects, not configs or partials waiting to be called."""
    assert isinstance(components.model, LanguageModel) and components.model.num_params() > 0
    optimizers = components.optimizer(components.model)
    assert optimizers and all(isinstance(o, torch.optim.Optimizer) for o in optimizers)
    assert isinstance(components.schedule(0, 10), float)
    assert isinstance(components.data, ParquetCorpus)
    assert isinstance(components.tokenizer, TokenizerSpec)
    assert isinstance(components.logger, Tracker)


@pytest.mark.parametrize("group, choice", [(g, c) for g in GROUPS for c in choices(g)])
def test_every_yaml_of_every_group_builds_real_objects(group, choice, tmp_path):
    overrides = [f"{group}={choice}"] + (["data.path=/corpus"] if choice == "local" else [])
    built(check(compose(*overrides)))


@pytest.mark.parametrize("model", choices("model"))
def test_every_model_follows_the_depth_rule_with_every_optimizer(model):
    depth = int(model.removeprefix("d"))
    for optimizer in choices("optimizer"):
        components = check(compose(f"model={model}", f"optimizer={optimizer}"))
        cfg = components.config["model"]
        assert (cfg["n_layer"], cfg["n_embd"]) == (depth, 64 * depth)
        assert cfg["n_head"] == -(-64 * depth // 128) == cfg["n_kv_head"]
        assert cfg["vocab_size"] == components.config["tokenizer"]["vocab_size"]
        built(components)


@pytest.mark.parametrize("sweep", sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
def test_every_sweep_file_composes_and_checks_every_job(sweep, monkeypatch):
    jobs = []
    monkeypatch.setattr("nanochat.assemble.preflight", lambda cfg, run_dir, world: jobs.append(check(cfg)))
    check_jobs(["-m", "-cd", str(SWEEPS_DIR), "-cn", sweep])
    assert len(jobs) >= 2, f"{sweep} sweeps nothing"
    assert len({str(job.config) for job in jobs}) == len(jobs)  # each job a different config
    for job in jobs:
        built(job)


def test_a_misspelt_key_in_a_yaml_file_fails_the_check(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    default_optimizer = conf / "optimizer" / "adamw_muon.yaml"
    default_optimizer.write_text(default_optimizer.read_text().replace("weight_decay:", "weight_decay_rate:"))
    cfg = without_hydra(compose_cli([], config_dir=conf))
    with pytest.raises(
        UserError, match=r"optimizer.weight_decay_rate is not a key of optimizer \(nanochat.optim.adamw_muon\); "
    ):
        check(cfg)


def test_vocab_size_is_taken_from_the_tokenizer():
    assert compose("tokenizer.vocab_size=8192").model.vocab_size == 8192


def test_n_layer_override_walks_the_depth_series():
    cfg = compose("model.n_layer=10")
    assert (cfg.model.n_embd, cfg.model.n_head) == (640, 5)


# (overrides, the sentence): every kind of mistake the schema catches, as a user types it.
MISTAKES = [
    (["trainer.num_iterations=abc"], "trainer.num_iterations=abc must be an integer."),
    (["eval.every=ten"], "eval.every=ten must be an integer."),
    (["trainer.grad_clip=strong"], "trainer.grad_clip=strong must be a number."),
    (["optimizer.matrix_lr=fast"], "optimizer.matrix_lr=fast must be a number."),
    (["system.compile=maybe"], "system.compile=maybe must be true or false."),
    (["sample.prompts=3"], "sample.prompts=3 must be a list of strings."),
    (["optimizer.adam_betas=[0.9]"], "optimizer.adam_betas=[0.9] must be a list of 2 values (a number, a number)."),
    (["system.dtype=float16"], "system.dtype=float16 must be one of auto, float32, bfloat16."),
    (["system.device=tpu"], "system.device=tpu must be one of auto, cpu, cuda, mps."),
    (["logger.mode=loud"], "logger.mode=loud must be one of offline, online, disabled."),
    (["optimizer.ns_dtype=fp16"], "optimizer.ns_dtype=fp16 must be one of auto, bfloat16, float32."),
    (["model=_gpt"], "model=_gpt is not a choice of model; the choices are d12, d16, d20, d26, d32, d4, d6, d8."),
    (
        ["logger=[wandb,tensorbord]"],
        "logger=tensorbord is not a choice of logger; the choices are csv, none, tensorboard, wandb.",
    ),
    (["debug=quick"], "debug=quick is not a choice of debug; the choices are fast, overfit, profile."),
    (["data=local"], "data.path needs a value (it is ??? in the YAML): set data.path=<value>."),
    (
        ["optimizer.matrix_learning_rate=0.01"],
        "optimizer.matrix_learning_rate is not a key of optimizer; did you mean optimizer.matrix_lr?",
    ),
    (
        ["optimizer=adamw", "+optimizer.learning_rate=1e-3"],
        "optimizer.learning_rate is not a key of optimizer (nanochat.optim.adamw); did you mean optimizer.lr?",
    ),
    (
        ["optimizer.lr=3e-3"],  # plain AdamW's key, under the default adamw_muon
        "optimizer.lr is not a key of optimizer; optimizer=adamw has it, or did you mean optimizer.unembedding_lr",
    ),
    (
        ["+optimizer.matrix_lr=0.01"],
        "optimizer.matrix_lr is already a key of optimizer: set it without the leading +, as "
        "optimizer.matrix_lr=<value>.",
    ),
    (["+trainer.lr=0.1"], "trainer.lr is not a key of trainer; its keys are trainer.device_batch_size, "),
    (["model=d5"], "model=d5 is not a choice of model; the choices are d12, d16, d20, d26, d32, d4, d6, d8."),
    (["trainer.eval_every=100"], "trainer.eval_every is now eval.every (the config is split by concern"),
    (["resume=none"], "resume is now checkpoint.resume"),
    (["+trainer.save_every=5"], "trainer.save_every is now checkpoint.save_every"),
    # the rules of each node, written once in the component or settings class
    (["model.n_head=3"], "model.n_embd=256 is not divisible by model.n_head=3."),
    (["model=d8", "model.n_kv_head=3"], "model.n_head=4 is not divisible by model.n_kv_head=3"),
    (["model.n_embd=250"], "model.n_embd=250 / model.n_head=2 = 125 is odd"),
    (["model.n_layer=0"], "model.n_layer=0 must be a positive integer."),
    (["model.sequence_len=-5"], "model.sequence_len=-5 must be a positive integer."),
    (["optimizer=adamw", "optimizer.lr=0"], "optimizer.lr=0 must be a positive learning rate."),
    (["optimizer.matrix_lr=-0.02"], "optimizer.matrix_lr=-0.02 must be a positive"),
    (
        ["schedule.warmup_ratio=0.6", "schedule.warmdown_ratio=0.5"],
        "schedule.warmup_ratio=0.6 + schedule.warmdown_ratio=0.5 exceeds 1",
    ),
    (["schedule=cosine", "schedule.final_lr_frac=2"], "schedule.final_lr_frac=2 must be between 0 and 1."),
    (["trainer.device_batch_size=0"], "trainer.device_batch_size=0 must be positive."),
    (["trainer.num_iterations=0"], "trainer.num_iterations=0 must be positive, or -1 to derive it."),
    (["trainer.grad_clip=-1"], "trainer.grad_clip=-1 must be >= 0"),
    (["checkpoint.keep_last=1"], "checkpoint.keep_last=1 must be at least 2"),
    (["sample.top_k=0"], "sample.top_k=0 must be positive, or null for no cut."),
    (["system.peak_flops=-1"], "system.peak_flops=-1 must be a positive FLOP/s figure or null."),
    (["tokenizer.vocab_size=200"], "tokenizer.vocab_size=200 must be an integer above 265"),
    (["data.val_bytes=-5"], "data.val_bytes=-5 must be a positive integer."),
    # rules across nodes
    (
        ["trainer.total_batch_size=1000", "trainer.device_batch_size=8"],
        "trainer.total_batch_size=1000 is not divisible by device_batch_size x sequence_len x world_size = 8 x 256 x 1.",
    ),
    (["eval.tokens=100"], "eval.tokens=100 is less than one row of model.sequence_len=256 tokens."),
    (["trainer.skip_nonfinite=-1"], "trainer.skip_nonfinite=-1 must be >= 0"),
    (["checkpoint.write_errors=ignore"], "checkpoint.write_errors=ignore must be one of stop, warn."),
    # CORE during training
    (["eval.core_every=often"], "eval.core_every=often must be an integer."),
    (
        ["eval.core_max_per_task=0"],
        "eval.core_max_per_task=0 must be a positive number of examples, or null for all of them.",
    ),
    (["eval.core_sha256=abc123"], "eval.core_sha256=abc123 is not a sha256 digest (64 hex digits), or null."),
    (
        ["eval.core_bundle=ftp://example.com/eval_bundle.zip"],
        "eval.core_bundle=ftp://example.com/eval_bundle.zip is not an http:// or https:// URL; downloads accept only "
        "those.",
    ),
    (
        ["eval.core_every=100", "eval.core_bundle=/nowhere/eval_bundle.zip"],
        "eval.core_bundle=/nowhere/eval_bundle.zip is neither an http(s) URL nor an existing .zip file or eval bundle "
        "folder.",
    ),
    (["eval.core_cache_dir=[a,b]"], "eval.core_cache_dir=[a, b] must be a string."),
]


@pytest.mark.parametrize("overrides, sentence", MISTAKES, ids=[" ".join(o) for o, _ in MISTAKES])
def test_a_mistake_is_one_sentence_naming_the_key(overrides, sentence):
    with pytest.raises(UserError) as error:
        check_jobs(overrides)
    assert sentence in str(error.value)
    assert "\n" not in str(error.value) and str(error.value).endswith((".", "?"))


SWEEP_MISTAKES = [
    (["-m", "trainer.num_iterations=10,abc"], "trainer.num_iterations=abc must be an integer."),
    (["-m", "optimizer=adamw", "optimizer.lr=1e-3,3e-3", "+optimizer.learning_rate=1"], "did you mean optimizer.lr?"),
    (
        ["-m", "optimizer=adamw_muon,adamw", "optimizer.matrix_lr=0.01"],
        "optimizer.matrix_lr is not a key of optimizer; optimizer=adamw_muon has it",
    ),
    (
        ["-m", "optimizer.matrix_lr=1e-3,2e-3", "optimizer.learning_rate=1"],
        "optimizer.learning_rate is not a key of optimizer",
    ),
    (["-m", "system.dtype=float32,float16"], "system.dtype=float16 must be one of auto, float32, bfloat16."),
    (["-m", "model=_gpt,d4"], "model=_gpt is not a choice of model"),
    (
        ["-m", "-cd", str(SWEEPS_DIR), "-cn", "optuna_lr", "schedule.warmdown_ratio=interval(0.5, 1.5)"],
        "schedule.warmdown_ratio=1.5 must be between 0 and 1.",
    ),
]


@pytest.mark.parametrize("argv, sentence", SWEEP_MISTAKES, ids=[" ".join(a[1:]) for a, _ in SWEEP_MISTAKES])
def test_a_mistake_in_any_job_of_a_sweep_is_found_before_the_first_job(argv, sentence):
    with pytest.raises(UserError) as error:
        check_jobs(argv)
    assert sentence in str(error.value) and "\n" not in str(error.value)


def test_several_values_without_multirun_is_one_sentence():
    with pytest.raises(UserError, match=r"optimizer.matrix_lr has several values \(0.001, 0.002\): sweeps need -m"):
        check_jobs(["optimizer.matrix_lr=1e-3,2e-3"])


def test_world_size_enters_the_batch_arithmetic():
    with pytest.raises(UserError, match="= 8 x 256 x 3"):
        check(compose(), world_size=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_without_cuda_is_rejected():
    with pytest.raises(UserError, match="system.device=cuda was asked for, but PyTorch sees no CUDA device"):
        check(compose("system.device=cuda"))


def test_a_model_without_the_interface_is_refused_naming_it():
    with pytest.raises(UserError, match="model._target_=torch.nn.Identity does not build a language model"):
        shape = ["n_kv_head", "n_head", "n_embd", "n_layer", "sequence_len", "vocab_size"]
        check(
            compose(
                "model._target_=torch.nn.Identity", *(f"~model.{key}" for key in shape), "trainer.total_batch_size=2048"
            )
        )


def test_a_second_architecture_is_chosen_by_its_target_alone():
    components = check(compose("model._target_=toy_models.PositionalTransformer", "optimizer=adamw_muon"))
    assert type(components.model).__name__ == "PositionalTransformer" and not isinstance(components.model, GPT)
    adam, muon = components.optimizer(components.model)
    assert {g["name"] for g in adam.param_groups} == {"embedding", "unembedding", "other"}  # LayerNorms, biases


def test_core_is_off_in_the_default_run_and_on_in_the_speedrun_as_in_nanochat():
    assert compose().eval.core_every <= 0
    speedrun = compose("experiment=d20_speedrun").eval
    assert speedrun.core_every == 2000 and speedrun.core_max_per_task == 500


def test_every_default_is_written_once_in_the_yaml_files():
    """The settings dataclasses and the config-facing components have no defaults of their own."""
    import dataclasses
    import inspect

    from nanochat.model import GPTConfig
    from nanochat.optim import adamw, adamw_muon
    from nanochat.schedules import Constant, Cosine, Trapezoid
    from nanochat.schema import SETTINGS

    for schema in [*SETTINGS.values(), GPTConfig]:
        assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(schema)), schema
    for component in (GPT, adamw, adamw_muon, Trapezoid, Cosine, Constant, TokenizerSpec):
        parameters = inspect.signature(component).parameters.values()
        assert all(p.default is inspect.Parameter.empty for p in parameters), component
