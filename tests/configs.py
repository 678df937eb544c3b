"""The project's own config values for tests that build components directly: conf/ is where each
value is written, so tests read it from there rather than repeating it."""

from omegaconf import OmegaConf

from nanochat.config import build, compose_cli, without_hydra

# What every test run pins, whatever the default run chooses: plain AdamW (tests set and compare
# optimizer.lr; Muon runs ask for optimizer=adamw_muon), fp32 (dtype=auto's measurement of tiny
# matmuls is noise) and eager (a cold compilation per run would be most of the suite's time;
# test_compile asks for system.compile=true).
TEST_RUN_BASICS = ("optimizer=adamw", "system.dtype=float32", "system.compile=false")


def compose(*overrides: str):
    """conf/config.yaml with overrides, without Hydra's own node, as train.py's jobs see it."""
    return without_hydra(compose_cli(list(overrides)))


def node(path: str, *overrides: str) -> dict:
    """One node of the composed config as plain values, e.g. node("optimizer", "optimizer=adamw_muon")."""
    return OmegaConf.to_container(OmegaConf.select(compose(*overrides), path), resolve=True)


def build_optimizers(model, name: str = "adamw", **changes) -> list:
    """conf/optimizer/<name>.yaml's optimizers for model, with some arguments changed."""
    settings = {**node("optimizer", f"optimizer={name}"), **changes}
    return build("optimizer", OmegaConf.create(settings))(model)
