"""Pretrain a nanochat GPT: compose the Hydra config, validate it, build every component, train.

python train.py                                   # tiny model on Shakespeare, CPU, minutes
python train.py model=d12 optimizer=adamw_muon    # nanochat's d12 and optimizer recipe
python train.py -m optimizer.lr=1e-4,3e-4         # a sweep: one run dir and W&B run per job
python train.py hydra.run.dir=<run dir>           # resume that run from its newest checkpoint
torchrun --standalone --nproc_per_node=8 train.py model=d20 optimizer=adamw_muon   # 8 GPUs, one run dir
"""

import os
import shlex
import sys
import traceback

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from nanochat.checkpoint import (
    check_layout_matches,
    check_model_matches,
    check_tokenizer_matches,
    load_newest_readable,
    resume_candidates,
)
from nanochat.config import (
    as_user_error,
    discard_if_untouched,
    hydra_run_dir,
    is_sweep_job,
    resolved_container,
    sweep_group,
    task_overrides,
    validate,
)
from nanochat.data.loader import TokenLoader
from nanochat.data_parallel import shards_state
from nanochat.device import peak_flops, resolve_device, resolve_dtype
from nanochat.distributed import (
    RankFailed,
    broadcast_,
    check_same_config,
    init_from_env,
    is_main,
    launch_command,
    lost_peer,
    main_first,
    rank,
    shutdown,
    together,
    world_size,
)
from nanochat.errors import UserError
from nanochat.model import GPT
from nanochat.tokenizer import check_vocab_matches
from nanochat.tracking import SilentTracker
from nanochat.trainer import Trainer, TrainerConfig


def prepare_data(cfg: DictConfig):
    """The corpus on disk and its tokenizer: downloaded, converted or trained on first use."""
    corpus = instantiate(cfg.data)
    corpus.prepare()
    for name, bpb in corpus.compression_baselines().items():
        print(f"reference on this validation text: {name} {bpb:.3f} bits per byte")
    tokenizer = instantiate(cfg.tokenizer, corpus=corpus)
    check_vocab_matches(tokenizer, cfg.model.vocab_size)
    return corpus, tokenizer


def build_and_fit(cfg: DictConfig) -> float:
    # Under torchrun every rank runs this; see nanochat/distributed.py for together() and main_first().
    ranks = world_size()
    with together("checking the config"):
        validate(cfg, ranks)
    resolved = resolved_container(cfg)
    check_same_config(resolved)
    config = TrainerConfig(**resolved["trainer"])
    if config.quiet_ranks and not is_main():
        sys.stdout = open(os.devnull, "w")
    run_dir = hydra_run_dir()
    with together("looking for the checkpoint to resume from"):
        candidates = resume_candidates(cfg.resume, run_dir)
    checkpoint = load_newest_readable(candidates)
    with together("checking the checkpoint"):
        if checkpoint is not None:
            check_layout_matches(checkpoint, ranks, shards_state(config.shard_optimizer, ranks))
            check_model_matches(checkpoint, resolved["model"])
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    torch.manual_seed(config.seed)

    corpus, tokenizer = main_first("preparing the data and the tokenizer", lambda: prepare_data(cfg))
    tokenizer_identity = {"vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint()}
    # Continuing this run (not starting a new one from another run's checkpoint): same W&B run,
    # and the local logs cut back to where the checkpoint was taken.
    same_run = checkpoint is not None and run_dir.resolve() in checkpoint.path.resolve().parents
    overrides = task_overrides()
    with together("building the model, the optimizers and the data loaders"):
        if checkpoint is not None:
            check_tokenizer_matches(checkpoint, tokenizer_identity)
        with torch.device("meta"):
            model = GPT(instantiate(cfg.model))
        model.to_empty(device=device)
        model.init_weights()
        optimizers = instantiate(cfg.optimizer)(model)
        batch = dict(
            tokenizer=tokenizer,
            batch_size=config.device_batch_size,
            sequence_len=model.config.sequence_len,
            rank=rank(),
            world_size=ranks,
        )
        train_loader = TokenLoader(corpus.files("train"), seed=config.seed, **batch)
        make_val_batches = lambda: TokenLoader(corpus.files("val"), shuffle=False, loop=False, **batch)  # noqa: E731
        # Only rank 0 logs: one metrics.jsonl and one W&B run per run dir.
        tracker = SilentTracker()
        if is_main():
            tracker = instantiate(cfg.logger, _partial_=True)(
                run_dir=run_dir,
                run_config=resolved,
                run_id=checkpoint.meta["wandb_run_id"] if same_run else None,
                log_offsets=checkpoint.meta["log_offsets"] if same_run else None,
                overrides=overrides,
                **sweep_group(cfg.logger),
            )
    broadcast_(list(model.parameters()))  # one set of initial weights, whatever each rank's RNG did
    peak, peak_note = peak_flops(device, dtype, config.peak_flops)
    print(peak_note)
    with together("restoring the checkpoint"):
        trainer = Trainer(
            config,
            model,
            optimizers,
            train_loader,
            make_val_batches,
            tokenizer,
            tracker,
            run_dir,
            device,
            dtype,
            peak,
            checkpoint_meta={"config": resolved, "tokenizer": tokenizer_identity},
            resume_hint=shlex.join([*launch_command(), "train.py", f"hydra.run.dir={run_dir}", *overrides]),
            world_size=ranks,
        )
        if checkpoint is not None:
            trainer.restore(checkpoint)
            print(f"resumed from {checkpoint.path} at step {checkpoint.step}")
    print(trainer.describe())
    try:
        final = trainer.fit()
    finally:
        tracker.finish()
    if "stopped_by" in final:  # also ends a sweep: the user or the scheduler asked to stop
        sys.exit(0)
    print(f"done in {final['wall_time']:.0f}s: val bpb {final['val/bpb']:.4f}, run dir {run_dir}")
    return final["val/bpb"]


def report(message: str) -> None:
    """One line on stderr; under torchrun it names the rank."""
    where = f"[rank {rank()}] " if world_size() > 1 else ""
    print(f"error: {where}{message}", file=sys.stderr)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        return build_and_fit(cfg)
    except Exception as error:
        user_error = as_user_error(error)
        if user_error is not None:
            if is_main() or not isinstance(user_error, RankFailed):  # rank 0 reports the others' failures
                report(str(user_error))
            if is_main():
                discard_if_untouched(hydra_run_dir())
            if not is_sweep_job():
                sys.exit(2)
        elif lost_peer(error):
            report(
                f"lost contact with another rank ({str(error).splitlines()[0]}); that rank's own error is above, "
                "and torchrun's summary names it."
            )
            sys.exit(1)
        elif not is_sweep_job():
            raise
        else:
            traceback.print_exc()
    # Only a sweep job gets here: one failed job must not end the sweep.
    print(f"sweep job {HydraConfig.get().job.num} failed ({hydra_run_dir()}); continuing", file=sys.stderr)
    return float("nan")


if __name__ == "__main__":
    try:
        init_from_env()  # before Hydra, so that every rank can take rank 0's run dir
    except UserError as error:
        report(str(error))
        sys.exit(2)
    try:
        main()
    except SystemExit as exit_request:  # also a run stopped by a signal, which exits 0
        shutdown(finished=exit_request.code in (0, None))
        raise
    shutdown(finished=True)
