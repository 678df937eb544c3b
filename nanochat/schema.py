"""The typed shape of the whole config, checked before any work starts.

Two kinds of node:

- Component nodes (model, optimizer, schedule, data, tokenizer, logger) name a `_target_`. Their
  schema is the target's signature: every key must be one of its parameters, every parameter
  without a default must have a value, and each value must fit the parameter's annotation. With
  `_partial_: true` the first parameter is what the trainer passes at build time (the model, for
  an optimizer builder). A new component is therefore checked as soon as it exists.
- Settings nodes (trainer, eval, sample, checkpoint, system) are the dataclasses below; their
  __post_init__ holds each node's own value rules.

The values themselves live in the YAML files only (conf/), so every default is written once:
neither these dataclasses nor the components' config-facing parameters have defaults.
"""

import collections.abc
import dataclasses
import difflib
import importlib
import inspect
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nanochat.errors import InvalidArgument, UserError, named_as, show

COMPONENTS = ("model", "optimizer", "schedule", "data", "tokenizer", "logger")


@dataclass
class TrainerConfig:
    """`trainer`: how long to train, on how big a batch, with what clipping."""

    num_iterations: int  # > 0, or -1: derived from target_flops, else target_param_data_ratio
    target_flops: float
    target_param_data_ratio: float
    total_batch_size: int
    device_batch_size: int
    grad_clip: float
    seed: int
    log_every: int
    skip_nonfinite: int  # steps in a row whose loss or grad norm is not finite that are skipped before stopping
    overfit: bool  # train on the first step's batch over and over (debug=overfit: the loss must fall near zero)

    def __post_init__(self):
        if not (self.num_iterations > 0 or self.num_iterations == -1):
            raise InvalidArgument(
                "{num_iterations} must be positive, or -1 to derive it.", num_iterations=self.num_iterations
            )
        if self.num_iterations == -1 and self.target_flops <= 0 and self.target_param_data_ratio <= 0:
            raise InvalidArgument(
                "{num_iterations}, {target_flops} and {target_param_data_ratio} leave the run length undefined: "
                "set one of them to a positive value.",
                num_iterations=self.num_iterations,
                target_flops=self.target_flops,
                target_param_data_ratio=self.target_param_data_ratio,
            )
        for name in ("device_batch_size", "total_batch_size", "log_every"):
            _require_positive(self, name)
        if self.grad_clip < 0:
            raise InvalidArgument("{grad_clip} must be >= 0 (0 disables clipping).", grad_clip=self.grad_clip)
        if self.skip_nonfinite < 0:
            raise InvalidArgument(
                "{skip_nonfinite} must be >= 0 (0 stops at the first).", skip_nonfinite=self.skip_nonfinite
            )


@dataclass
class EvalConfig:
    """`eval`: validation bits per byte, at step 0, every `every` steps and after the last; CORE
    (nanochat/core_eval.py) every `core_every` steps and after the last, when core_every > 0."""

    every: int  # <= 0: only at step 0 and after the last step
    tokens: int
    core_every: int  # <= 0: no CORE during training
    core_max_per_task: int | None  # examples per task; null: all of them
    core_bundle: str  # an http(s) URL of the eval bundle zip, a local .zip or an unpacked folder
    core_sha256: str | None  # the zip's pinned sha256; null: not checked
    core_cache_dir: str  # where a zip is unpacked (and a URL downloaded)

    def __post_init__(self):
        _require_positive(self, "tokens")
        check_core_source(self.core_bundle, self.core_sha256, self.core_max_per_task)


def check_core_source(
    bundle: str, sha256: str | None, max_per_task: int | None, names=("core_bundle", "core_sha256", "core_max_per_task")
) -> None:
    """The rules of the values core_eval.fetch_bundle and evaluate_core take, as InvalidArgument
    naming them by `names` (the trainer's eval.core_* keys, or python -m nanochat.evaluate's core.*)."""
    bundle_key, sha_key, cap_key = names
    if max_per_task is not None and max_per_task < 1:
        raise InvalidArgument(
            f"{{{cap_key}}} must be a positive number of examples, or null for all of them.", **{cap_key: max_per_task}
        )
    if not bundle.strip():
        raise InvalidArgument(
            f"{{{bundle_key}}} must be an http(s) URL, a .zip file or an eval bundle folder.", **{bundle_key: bundle}
        )
    scheme = bundle.split("://", 1)[0].lower() if "://" in bundle else None
    if scheme is not None and scheme not in ("http", "https"):
        raise InvalidArgument(
            f"{{{bundle_key}}} is not an http:// or https:// URL; downloads accept only those.", **{bundle_key: bundle}
        )
    if sha256 is not None and (len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower())):
        raise InvalidArgument(f"{{{sha_key}}} is not a sha256 digest (64 hex digits), or null.", **{sha_key: sha256})


@dataclass
class SampleConfig:
    """`sample`: text continued from fixed prompts every `every` steps and after the last."""

    every: int  # <= 0: only after the last step
    prompts: list[str]
    tokens: int
    temperature: float  # 0: greedy
    top_k: int | None

    def __post_init__(self):
        _require_positive(self, "tokens")
        if self.temperature < 0:
            raise InvalidArgument("{temperature} must be >= 0 (0 is greedy).", temperature=self.temperature)
        if self.top_k is not None and self.top_k < 1:
            raise InvalidArgument("{top_k} must be positive, or null for no cut.", top_k=self.top_k)


@dataclass
class CheckpointConfig:
    """`checkpoint`: what a run starts from, and when and how many checkpoints it writes."""

    resume: str  # auto | none | the path of a checkpoint, checkpoints dir or run dir
    save_every: int  # <= 0: only after the last step (and on SIGTERM / SIGINT)
    keep_last: int
    accept_changes: list[str]  # config keys a continued run may change deliberately
    write_errors: Literal["stop", "warn"]  # a checkpoint that cannot be written stops the run, or is skipped

    def __post_init__(self):
        if self.resume == "":
            raise InvalidArgument("{resume} must be auto, none or the path of a checkpoint or run dir.", resume="")
        if self.keep_last < 2:
            raise InvalidArgument(
                "{keep_last} must be at least 2 (the newest checkpoint may be the one being written).",
                keep_last=self.keep_last,
            )


@dataclass
class SystemConfig:
    """`system`: where and how the arithmetic runs."""

    device: Literal["auto", "cpu", "cuda", "mps"]
    dtype: Literal["auto", "float32", "bfloat16"]
    compile: bool
    peak_flops: float | None  # FLOP/s that MFU divides by; null: the GPU's datasheet, or measured on a CPU
    shard_optimizer: bool  # under torchrun: ZeRO-2 (true) or every rank keeps all optimizer state
    keep_freed_memory: bool  # CPU runs on glibc: freed buffers stay in the process (nanochat/device.py)
    quiet_ranks: bool  # under torchrun: ranks other than 0 print only warnings and errors

    def __post_init__(self):
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise InvalidArgument("{peak_flops} must be a positive FLOP/s figure or null.", peak_flops=self.peak_flops)


@dataclass
class ProfileConfig:
    """`profile`: torch.profiler over `steps` training steps after `skip` warm-up steps (debug=profile)."""

    steps: int  # 0: no profiling
    skip: int  # steps run unprofiled first: compilation, allocator and caches warm up

    def __post_init__(self):
        for name in ("steps", "skip"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{{{name}}} must be >= 0.", **{name: getattr(self, name)})


@dataclass
class Settings:
    """The settings nodes of one run, as the trainer takes them."""

    trainer: TrainerConfig
    eval: EvalConfig
    sample: SampleConfig
    checkpoint: CheckpointConfig
    system: SystemConfig
    profile: ProfileConfig

    @classmethod
    def from_config(cls, config: dict) -> "Settings":
        nodes = {}
        for node, schema in SETTINGS.items():
            with named_as(node):
                nodes[node] = schema(**config[node])
        return cls(**nodes)


SETTINGS = {
    "trainer": TrainerConfig,
    "eval": EvalConfig,
    "sample": SampleConfig,
    "checkpoint": CheckpointConfig,
    "system": SystemConfig,
    "profile": ProfileConfig,
}
TOP_LEVEL = (*COMPONENTS, *SETTINGS)

# Keys that moved when `trainer` was split by concern: the old name is refused with the new one.
RENAMED = {
    "resume": "checkpoint.resume",
    "trainer.warmup_ratio": "schedule.warmup_ratio",
    "trainer.warmdown_ratio": "schedule.warmdown_ratio",
    "trainer.final_lr_frac": "schedule.final_lr_frac",
    "trainer.eval_every": "eval.every",
    "trainer.eval_tokens": "eval.tokens",
    "trainer.sample_every": "sample.every",
    "trainer.sample_prompts": "sample.prompts",
    "trainer.sample_tokens": "sample.tokens",
    "trainer.save_every": "checkpoint.save_every",
    "trainer.keep_last": "checkpoint.keep_last",
    "trainer.device": "system.device",
    "trainer.dtype": "system.dtype",
    "trainer.compile": "system.compile",
    "trainer.peak_flops": "system.peak_flops",
    "trainer.shard_optimizer": "system.shard_optimizer",
    "trainer.quiet_ranks": "system.quiet_ranks",
}


def _require_positive(settings, name: str) -> None:
    value = getattr(settings, name)
    if value <= 0:
        raise InvalidArgument(f"{{{name}}} must be positive.", **{name: value})


def renamed(key: str) -> str | None:
    """The sentence for an old key name, or None."""
    if key in RENAMED:
        return f"{key} is now {RENAMED[key]} (the config is split by concern; see conf/config.yaml)."
    return None


def check_config(config: dict) -> None:
    """Raise UserError naming the first key that does not fit its schema.

    config: the resolved config as plain containers (without Hydra's own `hydra` node)."""
    _check_keys("", config, TOP_LEVEL, what="the config")
    for node in COMPONENTS:
        check_component(node, config[node])
    for node, schema in SETTINGS.items():
        check_values(
            node, config[node], typing.get_type_hints(schema), required=[f.name for f in dataclasses.fields(schema)]
        )


def check_component(path: str, node) -> None:
    """A `_target_` node against its target's signature."""
    if not isinstance(node, dict) or "_target_" not in node:
        raise UserError(f"{path} must name its class or function in {path}._target_.")
    target = locate(node["_target_"], f"{path}._target_")
    parameters = list(_signature(target).parameters.values())
    if node.get("_partial_"):
        parameters = parameters[1:]  # supplied by the trainer at build time
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in parameters)
    keys = {k: v for k, v in node.items() if k not in ("_target_", "_partial_")}
    if not accepts_any:
        _check_keys(path, keys, [p.name for p in named], what=f"{path} ({node['_target_']})")
    hints = _type_hints(target)
    check_values(
        path,
        keys,
        {p.name: hints[p.name] for p in named if p.name in hints},
        required=[p.name for p in named if p.default is p.empty],
        owner=node["_target_"],
    )


def check_values(path: str, node: dict, hints: dict, required: list[str], owner: str | None = None) -> None:
    """path "" is the top level (a command-line tool's own keys)."""
    if not owner:
        _check_keys(path, node, list(hints), what=path or "the config")
    prefix = f"{path}." if path else ""
    for name in required:
        if name not in node:
            raise UserError(
                f"{prefix}{name} needs a value{f' ({owner} requires it)' if owner else ''}: set {prefix}{name}=<value>."
            )
    for name, value in node.items():
        if name in hints and not fits(value, hints[name]):
            raise UserError(f"{prefix}{name}={show(value)} must be {describe(hints[name])}.")


def settings_from(schema: type, node: dict, path: str = ""):
    """The settings dataclass `schema` built from a plain config node, once every key is one of its
    fields and every value fits its type; UserError naming the first key that does not, or the
    rule of its __post_init__ that fails. path "" is the top level (a command-line tool's keys)."""
    check_values(path, node, typing.get_type_hints(schema), required=[f.name for f in dataclasses.fields(schema)])
    try:
        return schema(**node)
    except InvalidArgument as error:
        raise UserError(error.render(f"{path}." if path else "")) from None


def _check_keys(path: str, node: dict, valid, what: str) -> None:
    for key in node:
        if key in valid:
            continue
        full = f"{path}.{key}" if path else key
        sentence = renamed(full)
        if sentence:
            raise UserError(sentence)
        raise UserError(f"{full} is not a key of {what}; {suggest(key, list(valid), path)}")


def suggest(key: str, valid: list[str], path: str = "") -> str:
    """'did you mean optimizer.lr' for the closest valid keys, else the list of all of them."""
    prefix = f"{path}." if path else ""
    close = closest(key, valid)
    if close:
        return "did you mean " + " or ".join(prefix + k for k in close) + "?"
    return "its keys are " + ", ".join(prefix + k for k in sorted(valid)) + "."


def closest(key: str, valid: list[str], n: int = 3) -> list[str]:
    """Valid keys that look like `key`: similar spelling, or an abbreviation (learning_rate / lr)."""

    def initials(name: str) -> str:
        return "".join(word[0] for word in name.split("_") if word)

    def score(candidate: str) -> float:
        if initials(key) == candidate or initials(candidate) == key:
            return 1.0
        similarity = difflib.SequenceMatcher(None, key, candidate).ratio()
        if key in candidate or candidate in key:
            similarity = max(similarity, 0.7)
        return similarity

    ranked = sorted(((score(c), c) for c in valid), reverse=True)
    return [c for s, c in ranked[:n] if s >= 0.6]


def locate(dotted: str, key: str):
    """The object a `_target_` names (module.attribute, possibly nested)."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            break
        return obj
    raise UserError(f"{key}={dotted} does not name an importable class or function.")


def _signature(target) -> inspect.Signature:
    return inspect.signature(target)


def _type_hints(target) -> dict:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # annotations that do not resolve: keys and required values are still checked
        return {}


def fits(value, annotation) -> bool:
    """Whether a plain config value (from YAML or an override) fits a type annotation."""
    if annotation is typing.Any or annotation is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (Path, os.PathLike) or origin is os.PathLike:
        return isinstance(value, str)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(fits, value, args))
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        item = args[0] if args else typing.Any
        return isinstance(value, (list, tuple)) and all(fits(v, item) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True  # a type the config cannot express: the component checks it itself


def describe(annotation) -> str:
    """How an annotation reads in a sentence: 'an integer', 'one of auto, cpu', 'a number or null'."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [describe(arg) for arg in args if arg is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(show(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    if annotation in names:
        return names[annotation]
    if annotation in (Path, os.PathLike):
        return "a path"
    if origin in (list, tuple, collections.abc.Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
        return f"a list of {_plural(describe(args[0])) if args else 'values'}"
    return str(annotation)


def _plural(description: str) -> str:
    return {"an integer": "integers", "a number": "numbers", "a string": "strings"}.get(description, description)
