"""Config helpers: the resolvers the YAML files use, validation of a composed config, and the
composition of conf/ for command-line tools other than train.py.

Validation runs before anything heavy (downloads, tokenizer training, model allocation) and turns
every user mistake into one sentence that names the key and its value. This is the only library
module that knows about Hydra; components themselves take plain arguments.
"""

import shutil
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from nanochat.distributed import broadcast_object, is_main
from nanochat.errors import UserError

# Used by conf/model/_gpt.yaml to express nanochat's depth rule.
OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)
OmegaConf.register_new_resolver("ceil_div", lambda a, b: -(-a // b), replace=True)

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16")
LOGGER_MODES = ("offline", "online", "disabled")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _positive(section: DictConfig, prefix: str, keys: list[str]) -> None:
    for key in keys:
        value = section[key]
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
            f"{prefix}.{key}={value} must be a positive number.",
        )


def _check_model(model: DictConfig) -> None:
    _positive(model, "model", ["n_layer", "n_embd", "n_head", "n_kv_head", "sequence_len", "vocab_size"])
    _require(
        model.n_embd % model.n_head == 0,
        f"model.n_embd={model.n_embd} is not divisible by model.n_head={model.n_head}.",
    )
    _require(
        model.n_head % model.n_kv_head == 0,
        f"model.n_head={model.n_head} is not divisible by model.n_kv_head={model.n_kv_head} "
        "(each key/value head must serve a whole number of query heads).",
    )
    head_dim = model.n_embd // model.n_head
    _require(
        head_dim % 2 == 0,
        f"model.n_embd / model.n_head = {model.n_embd} / {model.n_head} = {head_dim} is odd; "
        "rotary embeddings need an even head dimension.",
    )


def _check_optimizer(optimizer: DictConfig) -> None:
    for key, value in optimizer.items():
        if key.endswith("lr"):
            _require(
                isinstance(value, (int, float)) and value > 0,
                f"optimizer.{key}={value} must be a positive learning rate.",
            )


def _check_schedule(trainer: DictConfig) -> None:
    for key in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        _require(0.0 <= trainer[key] <= 1.0, f"trainer.{key}={trainer[key]} must be between 0 and 1.")
    _require(
        trainer.warmup_ratio + trainer.warmdown_ratio <= 1.0,
        f"trainer.warmup_ratio + trainer.warmdown_ratio = {trainer.warmup_ratio} + "
        f"{trainer.warmdown_ratio} exceeds 1: warmup and warmdown would overlap.",
    )
    _require(
        trainer.num_iterations > 0 or trainer.target_flops > 0 or trainer.target_param_data_ratio > 0,
        f"trainer.num_iterations={trainer.num_iterations}, trainer.target_flops={trainer.target_flops} "
        f"and trainer.target_param_data_ratio={trainer.target_param_data_ratio} leave the run length "
        "undefined: set one of them to a positive value.",
    )
    _require(
        trainer.num_iterations > 0 or trainer.num_iterations == -1,
        f"trainer.num_iterations={trainer.num_iterations} must be positive, or -1 to derive it.",
    )


def _check_batch(trainer: DictConfig, sequence_len: int, world_size: int) -> None:
    _positive(trainer, "trainer", ["device_batch_size", "total_batch_size", "eval_tokens", "log_every"])
    tokens_per_micro_step = trainer.device_batch_size * sequence_len * world_size
    _require(
        trainer.total_batch_size % tokens_per_micro_step == 0,
        f"trainer.total_batch_size={trainer.total_batch_size} is not divisible by device_batch_size x "
        f"sequence_len x world_size = {trainer.device_batch_size} x {sequence_len} x {world_size}.",
    )
    _require(
        trainer.eval_tokens >= tokens_per_micro_step,
        f"trainer.eval_tokens={trainer.eval_tokens} is smaller than one evaluation batch: device_batch_size "
        f"x sequence_len x world_size = {trainer.device_batch_size} x {sequence_len} x {world_size} "
        f"= {tokens_per_micro_step} tokens.",
    )
    _require(trainer.grad_clip >= 0, f"trainer.grad_clip={trainer.grad_clip} must be >= 0 (0 disables clipping).")
    _require(
        isinstance(trainer.keep_last, int) and trainer.keep_last >= 2,
        f"trainer.keep_last={trainer.keep_last} must be at least 2 (the newest checkpoint may be the one being written).",
    )
    peak = trainer.peak_flops
    _require(peak is None or peak > 0, f"trainer.peak_flops={peak} must be a positive FLOP/s figure or null.")


def _check_device(trainer: DictConfig) -> None:
    _require(trainer.device in DEVICES, f"trainer.device={trainer.device} is not one of {', '.join(DEVICES)}.")
    _require(trainer.dtype in DTYPES, f"trainer.dtype={trainer.dtype} is not one of {', '.join(DTYPES)}.")
    _require(
        trainer.device != "cuda" or torch.cuda.is_available(),
        "trainer.device=cuda was asked for, but PyTorch sees no CUDA device on this machine.",
    )
    _require(
        trainer.device != "mps" or torch.backends.mps.is_available(),
        "trainer.device=mps was asked for, but PyTorch sees no MPS device on this machine.",
    )


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Raise UserError naming the first offending key; return silently if the config is usable
    by world_size data-parallel ranks."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as error:  # an interpolation pointing nowhere, a resolver on bad input, ...
        raise UserError(f"the config does not resolve: {error}".replace("\n", " ")) from None
    _check_model(cfg.model)
    _check_optimizer(cfg.optimizer)
    _check_schedule(cfg.trainer)
    _check_batch(cfg.trainer, cfg.model.sequence_len, world_size)
    _check_device(cfg.trainer)
    mode = cfg.logger.get("mode", "disabled")
    _require(mode in LOGGER_MODES, f"logger.mode={mode} is not one of {', '.join(LOGGER_MODES)}.")
    _require(
        isinstance(cfg.resume, str) and cfg.resume != "",
        f"resume={cfg.resume} must be auto, none or the path of a checkpoint or run dir.",
    )
    vocab_size = cfg.tokenizer.vocab_size
    _require(
        isinstance(vocab_size, int) and vocab_size > 256 + 9,
        f"tokenizer.vocab_size={vocab_size} must exceed 265 (256 byte tokens plus 9 special tokens).",
    )


def resolved_container(cfg: DictConfig) -> dict:
    """The fully resolved config as plain containers, for logging and checkpoints."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_cli(overrides: list[str]) -> DictConfig:
    """conf/config.yaml with command-line overrides, for tools that share train.py's keys (e.g.
    `python -m nanochat.data.download data=fineweb_edu data.num_shards=8`). A bad override is a
    UserError, not a traceback."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except HydraException as error:
        raise UserError(str(error).replace("\n", " ")) from None


def run_cli(main, argv: list[str] | None = None) -> None:
    """Run main(cfg) on the composed config; a UserError becomes one line on stderr and exit code 2."""
    try:
        main(compose_cli(sys.argv[1:] if argv is None else argv))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def instantiate_node(node: DictConfig):
    """hydra.utils.instantiate for library command-line tools, which do not import Hydra themselves."""
    from hydra.utils import instantiate

    return instantiate(node)


# What train.py asks of the running Hydra job.


def hydra_run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def is_sweep_job() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def task_overrides() -> list[str]:
    """The job's command-line overrides, minus resume= (a resumed run is the same run)."""
    return [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]


def sweep_group(logger: DictConfig) -> dict:
    """Every job of a sweep joins one W&B group named after the sweep dir, unless logger.group is set."""
    if not is_sweep_job() or logger.get("group"):
        return {}
    return {"group": Path(HydraConfig.get().sweep.dir).name}


class SharedRunDir(Callback):
    """Under torchrun every rank runs Hydra, and `${now:...}` in hydra.run.dir / hydra.sweep.dir
    would give ranks that start a second apart different dirs. Every rank takes rank 0's resolved
    timestamps instead (Hydra caches resolver results per config, and copies that cache into each
    sweep job's config), and only rank 0 writes Hydra's .hydra/ files. A no-op in a single process."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._agree(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._agree(config, "sweep")

    @staticmethod
    def _agree(config: DictConfig, mode: str) -> None:
        str(config.hydra[mode].dir)  # resolve it here, filling this rank's resolver cache
        OmegaConf.set_cache(config, broadcast_object(OmegaConf.get_cache(config)))
        if not is_main():
            with read_write(config.hydra):
                config.hydra.output_subdir = None


def as_user_error(error: BaseException) -> UserError | None:
    """The UserError behind an exception, if any: Hydra wraps what a component raises inside
    instantiate() in its own InstantiationException."""
    while error is not None:
        if isinstance(error, UserError):
            return error
        error = error.__cause__ or error.__context__
    return None


def discard_if_untouched(run_dir: Path) -> None:
    """A rejected config leaves no run behind: drop the dir Hydra made if it holds only Hydra's files."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(run_dir)
