"""From a composed config to a run ready to train: every component built from its `_target_`, the
data and tokenizer prepared, the checkpoint to start from restored, the tracker started.

    check(cfg)                       cheap: the schema, every component built (the model on the meta
                                     device), the rules between nodes; a mistake is one UserError
    assemble(cfg, run_dir, ...)      check, plan the resume, then do the work: Run.fit() trains

train.py calls both (check first for every job of the command line, before Hydra makes a run dir);
tests call them in-process on configs composed with nanochat.config.compose_cli. Under torchrun
every rank runs assemble(); see nanochat/distributed.py for together() and main_first().
"""

import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from nanochat.checkpoint import Checkpoint, check_model_matches, check_tokenizer_matches, load_newest_readable
from nanochat.config import build, check_command_line, resolved, without_hydra
from nanochat.core_eval import EvalBundle, fetch_bundle, task_examples
from nanochat.data.loader import LaneLoader, ValidationRows
from nanochat.device import (
    PRECISION_PROBE_ROWS,
    check_available,
    keep_freed_memory,
    peak_flops,
    resolve_device,
    resolve_dtype,
)
from nanochat.distributed import (
    broadcast_,
    broadcast_object,
    check_same_config,
    is_main,
    launch_command,
    main_first,
    rank,
    together,
    world_size,
)
from nanochat.errors import UserError, named_as
from nanochat.interface import LanguageModel
from nanochat.logs import RunLog, log
from nanochat.muon import resolve_ns_bf16_matmul, resolve_ns_dtype
from nanochat.resume import ResumePlan, plan_resume, record_invocation
from nanochat.run_dir import RunDirLock, check_creatable, check_not_in_use
from nanochat.schema import Settings, check_config
from nanochat.tokenizer import check_vocab_matches
from nanochat.tracking import SilentTracker
from nanochat.trainer import Trainer


@dataclass
class Components:
    """What check() built: cheap objects, nothing allocated, downloaded or opened yet."""

    config: dict  # the resolved config, as plain containers
    settings: Settings
    model: LanguageModel  # on the meta device
    optimizer: object  # builder(model) -> list of torch optimizers
    schedule: object  # schedule(step, num_iterations) -> lr multiplier
    data: object  # a corpus (nanochat/data/corpus.py ParquetCorpus)
    tokenizer: object  # nanochat.tokenizer.TokenizerSpec
    logger: object  # nanochat.tracking.Tracker, not started


def check(cfg: DictConfig, world_size: int = 1) -> Components:
    """Validate the composed config for world_size data-parallel ranks; UserError names the first
    offending key and value."""
    config = resolved(cfg)
    check_config(config)
    with torch.device("meta"):
        model = build("model", cfg.model)
    if not isinstance(model, LanguageModel):
        raise UserError(
            f"model._target_={cfg.model._target_} does not build a language model with the interface of "
            "nanochat/interface.py (sequence_len, width, init_weights, param_groups, num_params, estimate_flops, "
            "forward, generate)."
        )
    optimizer = build("optimizer", cfg.optimizer)
    with named_as("optimizer"):
        optimizer(model)  # the builder checks its arguments, on the meta model
    components = Components(
        config=config,
        settings=Settings.from_config(config),
        model=model,
        optimizer=optimizer,
        schedule=build("schedule", cfg.schedule),
        data=build("data", cfg.data),
        tokenizer=build("tokenizer", cfg.tokenizer),
        logger=build("logger", cfg.logger),
    )
    _check_across_nodes(components, world_size)
    return components


def _check_across_nodes(c: Components, world_size: int) -> None:
    trainer, sequence_len = c.settings.trainer, c.model.sequence_len
    tokens_per_micro_step = trainer.device_batch_size * sequence_len * world_size
    if trainer.total_batch_size % tokens_per_micro_step:
        raise UserError(
            f"trainer.total_batch_size={trainer.total_batch_size} is not divisible by device_batch_size x "
            f"sequence_len x world_size = {trainer.device_batch_size} x {sequence_len} x {world_size}."
        )
    if c.settings.eval.tokens < sequence_len:
        raise UserError(
            f"eval.tokens={c.settings.eval.tokens} is less than one row of model.sequence_len={sequence_len} tokens."
        )
    core = c.settings.eval
    if core.core_every > 0 and "://" not in core.core_bundle and not Path(core.core_bundle).expanduser().exists():
        raise UserError(
            f"eval.core_bundle={core.core_bundle} is neither an http(s) URL nor an existing .zip file or eval "
            "bundle folder."
        )
    model_vocab = c.config["model"].get("vocab_size")  # a model that names its vocabulary so
    if model_vocab is not None:
        check_vocab_matches(c.tokenizer.vocab_size, model_vocab)
    check_available(c.settings.system.device, "system.device")


def preflight(cfg: DictConfig, run_dir: Path | None, world_size: int = 1) -> None:
    """Everything train.py checks before Hydra starts a job: check(cfg), and for a single run whose
    dir holds checkpoints, that continuing it is allowed (run_dir None: a sweep job, checked when it starts)."""
    components = check(cfg, world_size)
    if run_dir is not None:
        check_creatable(run_dir, "hydra.run.dir")
        check_not_in_use(run_dir)
        plan_resume(components.config, run_dir)


def check_jobs(argv: list[str], world_size: int = 1) -> None:
    """preflight() for every job the command line argv (train.py's) would run, before Hydra starts."""
    check_command_line(argv, lambda cfg, run_dir: preflight(without_hydra(cfg), run_dir, world_size))


class Run:
    """An assembled training run: fit() trains it, says how it ended, then closes its tracker and
    its train.log and frees its run dir."""

    def __init__(self, trainer: Trainer, tracker, lock: RunDirLock | None, run_log: RunLog | None = None):
        self.trainer = trainer
        self.tracker = tracker
        self.lock = lock
        self.run_log = run_log

    def fit(self) -> dict:
        try:
            final = self.trainer.fit()
            if "stopped_by" not in final:
                log.info(
                    f"done in {final['wall_time']:.0f}s: val bpb {final['val/bpb']:.4f} (min {final['min_val_bpb']:.4f}), "
                    f"run dir {self.trainer.run_dir}"
                )
            return final
        except Exception as error:  # train.py reports it on the terminal; the log keeps it too
            if self.run_log is not None:
                what = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
                self.run_log.to_file(f"error: {what}")
            raise
        finally:
            self.tracker.finish()
            if self.run_log is not None:
                self.run_log.close()
            if self.lock is not None:
                self.lock.release()


def git_state(repo: Path = Path(__file__).resolve().parents[1]) -> dict:
    """The commit the code runs from and whether the work tree differs from it (None outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    if commit.returncode != 0:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def matmul_weight_shapes(model: LanguageModel) -> list[tuple[int, int]]:
    """The [out, in] shapes of the weights a forward pass multiplies by: the block matrices and
    the output head (the token embedding is a lookup). Read off the meta model: nothing allocated."""
    groups = model.param_groups()
    return [tuple(p.shape) for p in groups["matrices"] + groups["unembedding"] if p.ndim == 2]


def _precision_at_start(checkpoint: Checkpoint | None, device: torch.device) -> dict | None:
    """The precision a continued run measured when it started (dtype, ns_dtypes, ns_bf16_matmuls), if
    it continues on the same kind of device; None for a new run or another device, which measure afresh."""
    saved = checkpoint.meta.get("autocast") if checkpoint is not None else None
    return saved if saved is not None and saved["device"] == device.type else None


def _autocast_dtype(components: Components, device: torch.device, checkpoint: Checkpoint | None) -> torch.dtype:
    """system.dtype, with `auto` decided once per run: a CPU's measurement (resolve_dtype) is rank
    0's for every rank, and a run resumed on the same kind of device keeps the dtype it was
    measured with, so that its steps are the ones it would have taken without stopping."""
    settings = components.settings
    saved = _precision_at_start(checkpoint, device)
    if settings.system.dtype == "auto" and saved is not None:
        log.info(f"system.dtype=auto: {saved['dtype']}, as measured when the run started")
        return getattr(torch, saved["dtype"])
    name = None
    if is_main():
        rows = min(settings.trainer.device_batch_size * components.model.sequence_len, PRECISION_PROBE_ROWS)
        dtype, note = resolve_dtype(settings.system.dtype, device, matmul_weight_shapes(components.model), rows)
        if note:
            log.info(note)
        name = str(dtype).removeprefix("torch.")
    return getattr(torch, broadcast_object(name))


def _newton_schulz_precision(optimizers, device: torch.device, checkpoint: Checkpoint | None) -> dict:
    """Every ns_dtype=auto of a Muon group, then every ns_bf16_matmul=auto of a group that runs bf16,
    decided once per run, as system.dtype is: rank 0's measurement for every rank (replicated ranks
    must take the same steps), and a run continued on the same kind of device keeps what it started
    with. Returns the choices, for the checkpoint."""
    saved = _precision_at_start(checkpoint, device) or {}
    groups = [g for opt in optimizers for g in opt.param_groups if "ns_dtype" in g]
    ns_dtypes = _decide_once(
        [g for g in groups if g["ns_dtype"] == "auto"],
        "ns_dtype",
        lambda g: resolve_ns_dtype("auto", g["params"], g["ns_steps"]),
        saved.get("ns_dtypes"),
    )
    bf16_groups = [g for g in groups if g["ns_dtype"] == "bfloat16" and g["ns_bf16_matmul"] == "auto"]
    ns_bf16_matmuls = _decide_once(
        bf16_groups,
        "ns_bf16_matmul",
        lambda g: resolve_ns_bf16_matmul("auto", g["params"], g["ns_steps"]),
        # a run started before the option existed multiplied natively
        saved.get("ns_bf16_matmuls", ["native"] * len(bf16_groups)) if saved else None,
    )
    return {"ns_dtypes": ns_dtypes, "ns_bf16_matmuls": ns_bf16_matmuls}


def _decide_once(groups: list[dict], key: str, measure: Callable[[dict], str], saved: list[str] | None) -> list[str]:
    """Sets group[key] of every group to what the continued run chose (saved), or else to rank 0's
    measure(group), on every rank."""
    if saved is not None and len(saved) == len(groups):
        chosen = saved
    else:
        chosen = broadcast_object([measure(g) for g in groups] if is_main() else None)
    for group, value in zip(groups, chosen, strict=True):
        group[key] = value
    return chosen


def _prepare_data(components: Components):
    """The corpus on disk and its tokenizer: downloaded, converted or trained on first use."""
    corpus = components.data
    corpus.prepare()
    for name, bpb in corpus.compression_baselines().items():
        log.info(f"reference on this validation text: {name} {bpb:.3f} bits per byte")
    return corpus, components.tokenizer.load_or_train(corpus)


def _fetch_core_bundle(settings: Settings) -> EvalBundle:
    """The eval bundle CORE runs on, fetched or unpacked on first use (under main_first: one rank
    downloads, the others find it), with every task's capped examples checked now rather than
    at the first CORE step."""
    e = settings.eval
    bundle = fetch_bundle(e.core_bundle, cache_dir=e.core_cache_dir, sha256=e.core_sha256, show_progress=is_main())
    try:
        for task in bundle.select():
            task_examples(bundle, task, e.core_max_per_task)
    except UserError as error:  # the cap is too small for a task's few-shot draw
        raise UserError(str(error).replace("(max_per_task=", "(eval.core_max_per_task=")) from None
    return bundle


def _describe_start(plan: ResumePlan, checkpoint: Checkpoint) -> str:
    what = "continuing this run" if plan.continuing else "starting a new run"
    if not plan.differences:
        return f"resumed from {checkpoint.path} at step {checkpoint.step} ({what}, same config)"
    return (
        f"resumed from {checkpoint.path} at step {checkpoint.step} ({what} with this run's settings); the config "
        f"differs from the checkpoint's in {plan.describe_differences()}"
    )


def assemble(
    cfg: DictConfig,
    run_dir: str | Path,
    overrides: list[str] = (),
    sweep_group: str | None = None,
    name: str | None = None,
) -> Run:
    """Build the run cfg describes in run_dir (the job's overrides are kept as W&B tags, in the
    resume hint and in invocations.jsonl; name is the W&B run's when conf/logger sets none, see
    nanochat.tracking.run_name); every rank calls this under torchrun."""
    run_dir = Path(run_dir)
    with together("checking the config"):
        components = check(cfg, world_size())
    with together("taking the run dir"):
        lock = RunDirLock(run_dir) if is_main() else None  # one live run per run dir
    run_log = RunLog(run_dir, rank(), components.settings.system.quiet_ranks)
    try:
        run = _assemble(components, run_dir, list(overrides), sweep_group, name, lock)
        run.run_log = run_log
        return run
    except BaseException:
        run_log.close()
        if lock is not None:
            lock.release()
        raise


def _assemble(
    components: Components, run_dir: Path, overrides: list[str], sweep_group: str | None, name: str | None, lock
) -> Run:
    ranks = world_size()
    config, settings = components.config, components.settings
    check_same_config(config)
    if settings.system.quiet_ranks and not is_main():
        sys.stdout = open(os.devnull, "w")
    with together("looking for the checkpoint to resume from"):
        plan = plan_resume(config, run_dir)
    checkpoint = load_newest_readable(plan.candidates)
    model_differences = ", ".join(
        f"{key} ({saved} in the checkpoint, {now} now)"
        for key, saved, now in plan.differences
        if key.startswith("model.")
    )
    with together("checking the checkpoint"):
        if checkpoint is not None:
            check_model_matches(checkpoint, components.model, model_differences)
    device = resolve_device(settings.system.device)
    allocator_note = keep_freed_memory(settings.system.keep_freed_memory, device)  # before any large tensor
    if allocator_note:
        log.info(allocator_note)
    dtype = _autocast_dtype(components, device, checkpoint)
    torch.manual_seed(settings.trainer.seed)

    corpus, tokenizer = main_first("preparing the data and the tokenizer", lambda: _prepare_data(components))
    core_bundle = None
    if settings.eval.core_every > 0:
        core_bundle = main_first("fetching the CORE eval bundle", lambda: _fetch_core_bundle(settings))
    tokenizer_identity = {"vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint()}
    with together("building the model, the optimizers and the data loaders"):
        if checkpoint is not None:
            check_tokenizer_matches(checkpoint, tokenizer_identity)
        model = components.model
        model.to_empty(device=device)
        model.init_weights()
        optimizers = components.optimizer(model)
        loop, sequence_len = settings.trainer, model.sequence_len
        rows_per_step = loop.total_batch_size // sequence_len  # one lane each (see LaneLoader)
        rows_per_rank = rows_per_step // ranks
        train_loader = LaneLoader(
            corpus.files("train"),
            tokenizer,
            num_lanes=rows_per_step,
            lanes=range(rank() * rows_per_rank, (rank() + 1) * rows_per_rank),
            batch_size=loop.device_batch_size,
            sequence_len=sequence_len,
            seed=loop.seed,
        )
        validation = ValidationRows(corpus.files("val"), tokenizer, settings.eval.tokens // sequence_len, sequence_len)
        make_val_batches = lambda: validation.batches(rank(), ranks, loop.device_batch_size)  # noqa: E731
        # Only rank 0 logs: one metrics.jsonl and one W&B run per run dir (started below, once the
        # trainer knows the run's derived figures).
        tracker = components.logger if is_main() else SilentTracker()
    broadcast_(list(model.parameters()))  # one set of initial weights, whatever each rank's RNG did
    ns_precision = _newton_schulz_precision(optimizers, device, checkpoint)

    def measure_peak() -> tuple[float | None, str]:
        shapes, rows = matmul_weight_shapes(model), settings.trainer.device_batch_size * model.sequence_len
        return peak_flops(device, dtype, settings.system.peak_flops, shapes, rows=rows)

    peak, peak_note = measure_peak()
    log.info(peak_note)
    measured = settings.system.peak_flops is None and device.type != "cuda"
    with together("restoring the checkpoint"):
        trainer = Trainer(
            settings,
            model,
            optimizers,
            components.schedule,
            train_loader,
            make_val_batches,
            tokenizer,
            tracker,
            run_dir,
            device,
            dtype,
            peak,
            checkpoint_meta={
                "config": config,
                "tokenizer": tokenizer_identity,
                "autocast": {"device": device.type, "dtype": str(dtype).removeprefix("torch."), **ns_precision},
            },
            resume_hint=shlex.join([*launch_command(), "train.py", f"hydra.run.dir={run_dir}", *overrides]),
            world_size=ranks,
            core_bundle=core_bundle,
            remeasure_peak=(lambda: measure_peak()[0]) if measured else None,
        )
        if checkpoint is not None:
            restored_data = trainer.restore(checkpoint, same_data=checkpoint.meta["config"]["data"] == config["data"])
            log.info(_describe_start(plan, checkpoint))
            if not restored_data:
                log.info("the data differs from the checkpoint's: reading it from the start")
    with together("starting the loggers"):
        if is_main():
            _start_logging(tracker, trainer, run_dir, config, plan, checkpoint, overrides, sweep_group, name, ranks)
    log.info(trainer.describe())
    return Run(trainer, tracker, lock)


def _start_logging(tracker, trainer: Trainer, run_dir, config, plan, checkpoint, overrides, sweep_group, name, ranks):
    """Rank 0: the invocation record, then metrics.jsonl and the backends, with the derived figures."""
    record_invocation(run_dir, overrides, plan, checkpoint, ranks)
    continuing = checkpoint is not None and plan.continuing
    tracker.start(
        run_dir=run_dir,
        run_config=config,
        run_id=checkpoint.meta["wandb_run_id"] if continuing else None,
        log_offsets=checkpoint.meta["log_offsets"] if continuing else None,
        overrides=overrides,
        default_group=sweep_group,
        default_name=name,
        derived={**trainer.derived(), "torch_version": torch.__version__, **git_state()},
        device_type=trainer.device.type,
        start_step=trainer.start_step,
    )
    backends = ", ".join(["metrics.jsonl", *tracker.backends])
    log.info(f"logging to {backends} in {run_dir}; console in {run_dir / 'train.log'}")
