"""Everything the project asks of Hydra: the resolvers the YAML files use, building a node with
`hydra.utils.instantiate`, composing conf/ for the command-line tools (those that take train.py's
keys, and those with their own conf/tools/<name>.yaml), the running job's dir and overrides, and
the check of a whole command line before Hydra starts a job.

This is the only library module that imports Hydra; components take plain arguments.
"""

import itertools
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from hydra.errors import HydraException, InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from nanochat.distributed import broadcast_object, is_main, report
from nanochat.errors import InvalidArgument, UserError
from nanochat.schema import renamed, suggest
from nanochat.tracking import run_name

# Used by conf/base/gpt.yaml to express nanochat's depth rule.
OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)
OmegaConf.register_new_resolver("ceil_div", lambda a, b: -(-a // b), replace=True)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PRIMARY_CONFIG = "config"

# The config groups `python train.py --help` lists, each with one line; their choices are the YAML
# files of conf/<group>/ (files whose name starts with _ are bases, not choices), each described by
# the first sentence of its leading comment.
HELP_GROUPS = {
    "model": "the architecture and its size (nanochat's depth rule: width = 64 x n_layer)",
    "optimizer": "the optimizer recipe",
    "schedule": "the learning-rate schedule over the run",
    "data": "the pretraining corpus",
    "logger": "where metrics go besides metrics.jsonl; several at once: logger=[wandb,tensorboard,csv]",
    "experiment": "a preset applied over everything else, e.g. experiment=d20_speedrun",
    "debug": "a quick check, applied last: debug=fast | overfit | profile",
    "hydra/launcher": "how the jobs of a sweep (-m) run; default: one after another in this process",
}
BUILTIN_CHOICES = {"hydra/launcher": {"basic": "Hydra's default: the jobs one after another, in this process."}}


def describe_config_file(path: Path, limit: int = 110) -> str:
    """The first sentence of a YAML file's leading comment (a package header left out), cut to limit characters."""
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            words.append(text)
    text = " ".join(w for w in words if w)
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    if len(sentence) > limit:
        sentence = sentence[: limit - 1].rsplit(" ", 1)[0] + "…"
    return sentence


def group_choices(group: str, conf_dir: Path = CONF_DIR) -> dict[str, str]:
    """{choice: description} of a config group, bases (files starting with _) left out."""
    choices = dict(BUILTIN_CHOICES.get(group, {}))
    natural = lambda path: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.stem)]  # noqa: E731
    for path in sorted((conf_dir / group).glob("*.yaml"), key=natural):
        if not path.stem.startswith("_"):
            choices[path.stem] = describe_config_file(path)
    return choices


def groups_help(conf_dir: Path = CONF_DIR) -> str:
    """The config groups, their choices and one line each, as `python train.py --help` shows them."""
    lines = []
    for group, what in HELP_GROUPS.items():
        lines.append(f"{group}: {what}")
        choices = group_choices(group, conf_dir)
        width = max(map(len, choices), default=0)
        lines += [f"  {choice.ljust(width)}  {description}" for choice, description in choices.items()]
        lines.append("")
    return "\n".join(lines).rstrip().replace("$", "$$")  # Hydra fills the help in with string.Template


OmegaConf.register_new_resolver("nanochat_groups", lambda: groups_help(), replace=True)


def resolved(cfg: DictConfig) -> dict:
    """The config as plain resolved containers, without Hydra's own node; a value left at ??? or
    an interpolation that points nowhere is one sentence."""
    try:
        container = OmegaConf.to_container(without_hydra(cfg), resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        key = error.full_key
        raise UserError(f"{key} needs a value (it is ??? in the YAML): set {key}=<value>.") from None
    except OmegaConfBaseException as error:  # an interpolation pointing nowhere, a resolver on bad input, ...
        raise UserError(f"the config does not resolve: {_first_line(error)}") from None
    return container


def build(path: str, node, **kwargs):
    """hydra.utils.instantiate(node, **kwargs), with a component's InvalidArgument named by the
    node's keys (model.n_head=3, not n_head=3) and any UserError it raises passed through."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = as_user_error(error)
        if isinstance(cause, InvalidArgument):
            raise UserError(cause.render(f"{path}.")) from None
        if cause is not None:
            raise cause from None
        raise


def compose_cli(overrides: list[str], config_name: str = PRIMARY_CONFIG, config_dir: Path | None = None) -> DictConfig:
    """conf/config.yaml (or another primary config, e.g. one of sweeps/) with command-line
    overrides, for tools that share train.py's keys (e.g. `python -m nanochat.data.download
    data=fineweb_edu data.num_shards=8`). A bad override is one sentence, not a traceback."""
    search = [] if config_dir is None else [f"hydra.searchpath=[file://{CONF_DIR}]"]
    try:
        with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=[*search, *overrides], return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(explain_compose_error(error, overrides, config_name, config_dir)) from None


def choices_with_key(group: str, key: str, config_dir: Path | None) -> list[str]:
    """The choices of config group `group` whose own YAML has `key` at its top level (the project's
    conf/ and, for a primary config elsewhere, its folder)."""
    files: dict[str, Path] = {}
    for folder in (CONF_DIR, config_dir):
        if group and folder is not None and (folder / group).is_dir():
            files.update({p.stem: p for p in (folder / group).glob("*.yaml") if not p.stem.startswith("_")})
    return sorted(name for name, path in files.items() if key in OmegaConf.load(path))


def explain_compose_error(error: Exception, overrides: list[str], config_name: str, config_dir: Path | None) -> str:
    """Hydra's multi-line composition errors as one sentence naming the key (or group) and value."""
    message = str(error)
    existing = re.search(r"Could not append to config\. An item is already at '([^']+)'", message)
    if existing:  # +key=value for a key the config already has
        key = existing.group(1)
        where = key.rpartition(".")[0] or "the config"
        return f"{key} is already a key of {where}: set it without the leading +, as {key}=<value>."
    unknown = re.search(r"Could not (?:override|delete|append to config)[^']*'([^']+)'", message)
    if unknown:
        key = unknown.group(1).lstrip("+~")
        sentence = renamed(key)
        if sentence:
            return sentence
        parent, _, name = key.rpartition(".")
        others = [o for o in overrides if not o.lstrip("+~").startswith(f"{key}=") and o.lstrip("+~") != key]
        try:
            cfg = compose_cli(others, config_name, config_dir)
            node = OmegaConf.select(cfg, parent) if parent else cfg
            valid = [k for k in node.keys() if k != "hydra"] if isinstance(node, DictConfig) else []
        except UserError:
            valid = []
        where = parent or "the config"
        hint = suggest(name, valid, parent) if valid else "check its spelling."
        other_choices = choices_with_key(parent, name, config_dir)
        if other_choices:  # e.g. optimizer.lr under adamw_muon: a key of optimizer=adamw
            having = " and ".join(f"{parent}={choice}" for choice in other_choices)
            having += " has it" if len(other_choices) == 1 else " have it"
            return f"{key} is not a key of {where}; {having}{', or ' + hint if hint.startswith('did you') else '.'}"
        return f"{key} is not a key of {where}; {hint}"
    missing_choice = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
    if missing_choice:
        group, choice = missing_choice.groups()
        options = re.findall(r"^\t(\S+)$", message.split("Available options", 1)[-1], flags=re.MULTILINE)
        options = [o for o in options if not o.startswith("_")]
        return f"{group}={choice} is not a choice of {group}; the choices are {', '.join(options)}."
    unloadable = re.search(r"Could not load '([^']+)/([^'/]+)'", message)
    if unloadable:  # a wrong name inside a list of choices, e.g. logger=[wandb,tensorbord]
        group, choice = unloadable.groups()
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))
        if options:
            return f"{group}={choice} is not a choice of {group}; the choices are {', '.join(options)}."
    return f"the command line does not compose: {_first_line(error)}"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def run_cli(main: Callable[[DictConfig], None], argv: list[str] | None = None) -> None:
    """Run main(cfg) on the composed config; a UserError becomes one line on stderr and exit code 2."""
    try:
        main(compose_cli(sys.argv[1:] if argv is None else argv))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def run_tool(name: str, main: Callable[[str, dict], None], argv: list[str] | None = None) -> None:
    """`python -m nanochat.<name> <run dir or checkpoint> [key=value ...]`: main(location, settings)
    with conf/tools/<name>.yaml under the overrides, in train.py's override grammar (an unknown key
    names the closest ones), resolved to plain containers. A UserError becomes one line on stderr
    and exit code 2 (under torchrun said by rank 0 alone: a setting's mistake is every rank's, and a
    failure of one rank reaches rank 0 through distributed.together); -h / --help prints the keys
    with their defaults."""
    argv = sys.argv[1:] if argv is None else argv
    config_file = CONF_DIR / "tools" / f"{name}.yaml"
    usage = f"usage: python -m nanochat.{name} <run dir or checkpoint> [key=value ...]"
    try:
        if argv[:1] in (["-h"], ["--help"]):
            print(f"{usage}\n\nKeys and their defaults ({config_file}):\n\n{config_file.read_text()}")
            return
        if not argv or ("=" in argv[0] and not Path(argv[0]).exists()):
            raise UserError(f"the first argument must be a run dir or checkpoint folder ({usage}).")
        for override in argv[1:]:
            _check_single_value(override)
        main(argv[0], resolved(compose_cli(argv[1:], config_name=f"tools/{name}")))
    except UserError as error:
        if is_main():
            report(str(error))
        sys.exit(2)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's flush cannot fail again
        sys.exit(1)


def _check_single_value(override: str) -> None:
    """A tool's override must parse to one value. Free text (a prompt) often does not: Hydra's
    grammar reads an unquoted comma as a sweep and refuses most punctuation and non-ASCII letters,
    and its own message for that is several lines about sweeps."""
    try:
        parsed = OverridesParser.create().parse_override(override)
    except HydraException:
        parsed = None
    if parsed is None or parsed.is_sweep_override():
        key, _, value = override.partition("=")
        quoted = "'" + value.replace("'", "\\'") + "'"
        raise UserError(
            f"{override} does not parse as one value in Hydra's override grammar (as in train.py): quote it, "
            f'e.g. {key}="{quoted}" in the shell.'
        )


def check_command_line(argv: list[str], check: Callable[[DictConfig, Path | None], None]) -> None:
    """Compose the config of every job this command line would run, as Hydra would, and check(cfg,
    run_dir) each one (run_dir is None for the jobs of a sweep). Raises UserError naming the first
    mistake, before Hydra makes a run dir or writes .hydra/.

    A sweep's values come from its overrides and from hydra.sweeper.params: lists, choices and
    ranges are checked value by value (every combination, up to 64 of them; beyond that each value
    once), Optuna's intervals at both ends."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.experimental_rerun:
        return  # Hydra prints something and trains nothing
    config_name = args.config_name or PRIMARY_CONFIG
    config_dir = Path(args.config_dir).resolve() if args.config_dir else None
    if args.config_path:
        config_dir = (CONF_DIR.parent / args.config_path).resolve()
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(args.overrides)
    except HydraException as error:
        raise UserError(f"the command line does not parse: {_first_line(error)}") from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = {o.get_key_element(): _sweep_values(o) for o in parsed if o.is_sweep_override()}
    if sweeps and not args.multirun:
        key = next(iter(sweeps))
        raise UserError(f"{key} has several values ({', '.join(sweeps[key])}): sweeps need -m (--multirun).")
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts and not any(o.get_key_element().lstrip("+") == "hydra.run.dir" for o in parsed):
        raise UserError(
            f"torchrun --max-restarts={restarts} needs a fixed hydra.run.dir=<dir>: a restarted job resumes from the "
            "checkpoints of the one that died, which a new dated run dir would not hold."
        )
    if not args.multirun:
        cfg = compose_cli(fixed, config_name, config_dir)
        check(cfg, Path(cfg.hydra.run.dir))
        return
    params = compose_cli(fixed, config_name, config_dir).hydra.sweeper.get("params") or {}
    for key, values in params.items():
        if key not in sweeps and not any(o.get_key_element() == key for o in parsed):
            sweeps[key] = _sweep_values(parser.parse_override(f"{key}={values}"))
    for combination in _combinations(list(sweeps.items())):
        check(compose_cli([*fixed, *combination], config_name, config_dir), None)


def _sweep_values(override) -> list[str]:
    if isinstance(override.value(), IntervalSweep):
        interval = override.value()
        return [str(interval.start), str(interval.end)]
    if override.is_sweep_override():
        try:
            return list(override.sweep_string_iterator())
        except HydraException:  # glob(): Hydra expands it against the group's files; not checked here
            return []
    return [override.get_value_element_as_str()]


def _combinations(sweeps: list[tuple[str, list[str]]], limit: int = 64) -> list[list[str]]:
    sweeps = [(key, values) for key, values in sweeps if values]
    if not sweeps:
        return [[]]
    choices = [[f"{key}={value}" for value in values] for key, values in sweeps]
    total = 1
    for options in choices:
        total *= len(options)
    if total <= limit:
        return [list(c) for c in itertools.product(*choices)]
    longest = max(map(len, choices))
    return [[options[i % len(options)] for options in choices] for i in range(longest)]


# What train.py asks of the running Hydra job.


def hydra_run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def is_sweep_job() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def task_overrides() -> list[str]:
    """The job's command-line overrides, minus checkpoint.resume= (a resumed run is the same run)."""
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+").startswith("checkpoint.resume=")]


def sweep_group() -> str | None:
    """The W&B group of a sweep's jobs: the sweep dir's name (None for a single run)."""
    return Path(HydraConfig.get().sweep.dir).name if is_sweep_job() else None


def job_name(hydra_node: DictConfig | None = None) -> str:
    """The W&B run name of the running job (or of a composed config's `hydra` node): its model and
    optimizer choices and overrides, plus the sweep's name and job number for a sweep job (see
    nanochat.tracking.run_name)."""
    hydra_node = HydraConfig.get() if hydra_node is None else hydra_node
    choices = OmegaConf.to_container(hydra_node.runtime.choices)
    overrides = [o for o in hydra_node.overrides.task if not o.lstrip("+").startswith("checkpoint.resume=")]
    sweep = None
    if hydra_node.mode == RunMode.MULTIRUN:
        sweep = (Path(hydra_node.sweep.dir).name, int(hydra_node.job.num))
    return run_name(choices, overrides, sweep)


def without_hydra(cfg: DictConfig) -> DictConfig:
    """A copy of a composed config without Hydra's own node (compose_cli returns it with one)."""
    if "hydra" not in cfg:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra")
    return cfg


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
    instantiate() in its own InstantiationException. A file or directory the run cannot create,
    read or write (a read-only or virtual file system, no permission, a full disk) is one too."""
    while error is not None:
        if isinstance(error, UserError):
            return error
        if isinstance(error, OSError) and error.filename and error.strerror:
            return UserError(f"cannot create or write {error.filename}: {error.strerror}.")
        error = error.__cause__ or error.__context__
    return None


def discard_if_untouched(run_dir: Path) -> None:
    """A rejected config leaves no run behind: drop the dir Hydra made if it holds only Hydra's files."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log", ".lock"}:
        shutil.rmtree(run_dir)
