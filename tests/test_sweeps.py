"""Ready sweeps, launchers and experiment presets, launched the way their documentation says.

Anything that trains runs a tiny model for 3 steps on the conftest's synthetic corpus (no network).
"""

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from configs import TEST_RUN_BASICS, compose
from conftest import FAKE_VAL_BYTES, FAKE_VOCAB_SIZE
from omegaconf import OmegaConf
from runs import REPO, read_metrics, run_train
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

from nanochat.assemble import check
from nanochat.config import compose_cli
from nanochat.trainer import resolve_num_iterations

CONF_DIR = REPO / "conf"
SWEEPS_DIR = REPO / "sweeps"
# W&B sweep definitions are not Hydra configs: they live one folder down, out of `-cd sweeps`'s way.
WANDB_SWEEPS = sorted((SWEEPS_DIR / "wandb_agent").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
LAUNCHERS = {"local": "LocalLauncher", "slurm": "SlurmLauncher"}


def tiny_run_overrides(data_dir: Path) -> list[str]:
    """A 3-step run of a 2-layer model on the synthetic corpus, without W&B."""
    return [
        f"data.data_dir={data_dir}",
        f"data.val_bytes={FAKE_VAL_BYTES}",
        f"tokenizer.vocab_size={FAKE_VOCAB_SIZE}",
        "model.n_layer=2",
        *TEST_RUN_BASICS,
        "model.sequence_len=64",
        "trainer.device_batch_size=8",
        "trainer.total_batch_size=1024",
        "eval.tokens=2048",
        "sample.tokens=8",
        "trainer.num_iterations=3",
        "logger=none",
    ]


def train(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_train(*args, cwd=cwd, env=env, timeout=300)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def final_val_bpb(run_dir: Path) -> float:
    return [r["val/bpb"] for r in read_metrics(run_dir) if "val/bpb" in r][-1]


@pytest.mark.slow
def test_optuna_sweep_of_two_trials_reports_the_best_val_bpb(shakespeare_data_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = train(
        "-m", "-cd", str(SWEEPS_DIR), "-cn", "optuna_lr",
        "hydra.sweeper.n_trials=2",
        *tiny_run_overrides(shakespeare_data_dir),
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = job_dirs(sweep_dir)
    assert [p.name for p in jobs] == ["0", "1"]
    trials = []
    for job in jobs:
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        trials.append((final_val_bpb(job), config.optimizer.lr, config.schedule.warmdown_ratio))
    assert trials[0][1:] != trials[1][1:], "the sampler proposed the same trial twice"
    best_bpb, best_lr, best_warmdown = min(trials)

    results = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))
    assert results["best_value"] == pytest.approx(best_bpb, rel=1e-9)
    assert results["best_params"] == {
        "optimizer.lr": pytest.approx(best_lr),
        "schedule.warmdown_ratio": pytest.approx(best_warmdown),
    }
    assert 1e-4 <= best_lr <= 3e-2 and 0.1 <= best_warmdown <= 0.6


@pytest.mark.slow
def test_submitit_local_sweep_runs_each_job_in_its_own_process(shakespeare_data_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = train(
        "-m", "optimizer.lr=1e-4,3e-4", "hydra/launcher=local",
        *tiny_run_overrides(shakespeare_data_dir),
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = job_dirs(sweep_dir)
    assert [p.name for p in jobs] == ["0", "1"]
    for job, lr in zip(jobs, [1e-4, 3e-4]):
        assert OmegaConf.load(job / ".hydra" / "config.yaml").optimizer.lr == lr
        assert math.isfinite(final_val_bpb(job))
    logs = sorted((sweep_dir / ".submitit").glob("*/*_0_log.out"))  # one per submitit process
    assert len(logs) == 2 and all("Job completed successfully" in log.read_text() for log in logs)


@pytest.mark.parametrize("launcher, plugin", LAUNCHERS.items())
def test_every_launcher_config_composes_onto_its_submitit_plugin(launcher, plugin):
    config = compose_cli([f"hydra/launcher={launcher}"]).hydra.launcher
    assert config["_target_"] == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{plugin}"
    assert config["tasks_per_node"] == 1, "train.py is one process per job"


def sample(spec: dict, rng: random.Random):
    """One value of a W&B sweep parameter, as the sweep server might pick it."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][0]
    low, high = spec["min"], spec["max"]
    if spec["distribution"] == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if spec["distribution"] == "uniform":
        return rng.uniform(low, high)
    if spec["distribution"] == "int_uniform":
        return rng.randint(low, high)
    raise AssertionError(f"the test cannot sample {spec}; teach it this distribution")


def agent_command(definition: dict, values: dict) -> list[str]:
    """The command line `wandb agent` builds from the definition's `command` for these values."""
    macros = create_sweep_command_args({"args": {key: {"value": value} for key, value in values.items()}})
    macros |= {"env": ["/usr/bin/env"], "program": [str(REPO / definition["program"])]}
    command = []
    for chunk in map(str, create_sweep_command(definition["command"])):
        if chunk == "python":
            command.append(sys.executable)
        elif chunk.startswith("${") and chunk.endswith("}"):
            command += macros[chunk[2:-1]]
        else:
            command.append(chunk)
    return command


@pytest.mark.parametrize("definition_path", WANDB_SWEEPS, ids=lambda p: p.name)
def test_wandb_sweep_turns_a_sampled_parameter_set_into_a_train_command_that_composes(definition_path, tmp_path):
    definition = yaml.safe_load(definition_path.read_text())
    assert (REPO / definition["program"]).is_file()
    assert definition["metric"]["goal"] == "minimize"
    values = {key: sample(spec, random.Random(0)) for key, spec in definition["parameters"].items()}
    assert all(isinstance(v, (int, float, str, bool)) for v in values.values()), values
    command = agent_command(definition, values)
    env = {**os.environ, "WANDB_SWEEP_ID": "sweep0", "WANDB_RUN_ID": "run0"}  # set by the agent

    def show(part: str) -> dict:
        command_line = [*command, "--cfg", part, "--resolve"]
        result = subprocess.run(command_line, capture_output=True, text=True, cwd=tmp_path, env=env)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        return yaml.safe_load(result.stdout)

    job = OmegaConf.create(show("job"))
    check(job)
    for key, value in values.items():
        assert OmegaConf.select(job, key) == pytest.approx(value), key
    assert job.logger.mode == "online", "an offline run never reports its val/bpb to the sweep"
    assert show("hydra")["hydra"]["run"]["dir"].endswith("sweep0/run0")


def compose_experiment(name: str):
    return compose(f"experiment={name}")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes_validates_and_changes_the_default_run(experiment):
    default = compose()
    cfg = compose_experiment(experiment)
    check(cfg)
    assert OmegaConf.to_container(cfg) != OmegaConf.to_container(default)


def test_d20_speedrun_plans_nanochats_parameters_flops_and_steps():
    cfg = compose_experiment("d20_speedrun")
    assert cfg.data._target_.endswith("HubShardCorpus") and cfg.data.name == "fineweb_edu"
    assert cfg.optimizer._target_ == "nanochat.optim.adamw_muon"
    components = check(cfg)
    model = components.model  # on the meta device
    # The figures nanochat's base_train.py prints for its d20 run.
    assert model.num_params() == 560_988_160
    assert model.estimate_flops() == pytest.approx(3.491758e9, rel=1e-6)
    trainer = components.settings.trainer
    assert resolve_num_iterations(trainer, model.estimate_flops(), model.num_params()) == 21_400
