"""Pretrain a nanochat GPT: compose the Hydra config, validate it, build every component, train.

    python train.py                                   # tiny model on Shakespeare, CPU, minutes
    python train.py model=d12 optimizer=adamw_muon    # nanochat's d12 and optimizer recipe
    python train.py -m optimizer.lr=1e-4,3e-4         # a sweep: one run dir and W&B run per job
"""

import shutil
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nanochat.config import resolved_container, validate
from nanochat.data.loader import TokenLoader
from nanochat.device import peak_flops, resolve_device, resolve_dtype
from nanochat.distributed import require_single_process
from nanochat.errors import UserError
from nanochat.model import GPT
from nanochat.trainer import Trainer, TrainerConfig


def build_and_fit(cfg: DictConfig) -> float:
    validate(cfg)
    require_single_process()
    run_dir = HydraConfig.get().runtime.output_dir
    config = TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype, resolve_device(config.device))
    torch.manual_seed(config.seed)

    corpus = instantiate(cfg.data)
    corpus.prepare()
    for name, bpb in corpus.compression_baselines().items():
        print(f"reference on this validation text: {name} {bpb:.3f} bits per byte")
    tokenizer = instantiate(cfg.tokenizer, corpus=corpus)

    with torch.device("meta"):
        model = GPT(instantiate(cfg.model))
    model.to_empty(device=device)
    model.init_weights()
    optimizers = instantiate(cfg.optimizer)(model)

    batch = dict(tokenizer=tokenizer, batch_size=config.device_batch_size, sequence_len=model.config.sequence_len)
    train_batches = iter(TokenLoader(corpus.files("train"), seed=config.seed, **batch))
    make_val_batches = lambda: iter(TokenLoader(corpus.files("val"), shuffle=False, loop=False, **batch))  # noqa: E731

    peak, peak_note = peak_flops(device, dtype, config.peak_flops)
    print(peak_note)
    resolved = resolved_container(cfg)
    tracker = instantiate(cfg.logger, _partial_=True)(run_dir=run_dir, run_config=resolved)
    trainer = Trainer(
        config,
        model,
        optimizers,
        train_batches,
        make_val_batches,
        tokenizer,
        tracker,
        run_dir,
        device,
        dtype,
        peak,
        checkpoint_meta={"config": resolved, "tokenizer": tokenizer.fingerprint()},
    )
    print(trainer.describe())
    try:
        final = trainer.fit()
    finally:
        tracker.finish()
    print(f"done in {final['wall_time']:.0f}s: val bpb {final['val/bpb']:.4f}, run dir {run_dir}")
    return final["val/bpb"]


def discard_if_untouched(run_dir: Path) -> None:
    """A rejected config leaves no run behind: drop the dir Hydra made if it holds only Hydra's files."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(run_dir)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        return build_and_fit(cfg)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        discard_if_untouched(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(2)


if __name__ == "__main__":
    main()
