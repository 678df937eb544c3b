"""The training loop: grad accumulation, schedules, clipping, metrics, evaluation, samples, checkpoints.

One optimizer step (see DESIGN.md, "Data flow of one step"):
    grad_accum micro-steps of forward + backward on loss / grad_accum
    -> global grad norm (always measured; clipped only when grad_clip > 0)
    -> lr multiplier and Muon momentum for this step -> every optimizer steps -> zero grads
    -> train/* metrics to metrics.jsonl (and W&B) and a progress line
The loop runs num_iterations + 1 times so that evaluation and sampling happen after the last update.

A checkpoint taken after update s-1 holds everything the next steps depend on (weights, optimizer
states, loader position, RNG states, loss EMA, clocks), so a run resumed from it continues exactly
as if it had never stopped: on a CPU its losses are bitwise the uninterrupted run's. SIGTERM and
SIGINT finish the step in flight, write such a checkpoint and return.
"""

import itertools
import random
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanochat.checkpoint import Checkpoint, remove_stale_temporaries, save_checkpoint
from nanochat.device import autocast, synchronize
from nanochat.evaluation import evaluate_bpb, sample_completions
from nanochat.metrics import LossEMA, StepClock, format_duration, mfu_percent
from nanochat.optim import apply_schedule, lr_multiplier


@dataclass
class TrainerConfig:
    """The `trainer.` keys of the Hydra config, as plain values."""

    num_iterations: int = -1
    target_flops: float = -1.0
    target_param_data_ratio: float = 20
    total_batch_size: int = 524288
    device_batch_size: int = 32
    grad_clip: float = 1.0
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    eval_every: int = 250
    eval_tokens: int = 10 * 524288
    sample_every: int = -1
    sample_prompts: list[str] = field(default_factory=lambda: ["The capital of France is"])
    sample_tokens: int = 32
    save_every: int = -1
    keep_last: int = 2
    seed: int = 42
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    log_every: int = 1
    peak_flops: float | None = None


def resolve_num_iterations(config: TrainerConfig, flops_per_token: float, num_params: int) -> int:
    """Explicit steps if given, else a FLOPs budget, else a tokens-per-parameter ratio (nanochat's order)."""
    if config.num_iterations > 0:
        return config.num_iterations
    if config.target_flops > 0:
        steps = round(config.target_flops / (flops_per_token * config.total_batch_size))
    else:
        steps = int(config.target_param_data_ratio * num_params) // config.total_batch_size
    return max(1, steps)


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients before clipping; if max_norm > 0 and the norm exceeds
    it, every gradient is rescaled so that the norm becomes max_norm."""
    with_grad = [p for p in parameters if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in with_grad])


def is_due(step: int, every: int) -> bool:
    return every > 0 and step > 0 and step % every == 0


def rng_states() -> dict:
    """Every RNG the run could draw from, as tensors and plain containers (weights_only-loadable)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {k: torch.from_numpy(np.asarray(v)) for k, v in numpy_state["state"].items()}
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(states["numpy"])
    numpy_state["state"] = {k: v.numpy() for k, v in numpy_state["state"].items()}
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class Trainer:
    def __init__(
        self,
        config: TrainerConfig,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        train_loader,
        make_val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
        tokenizer,
        tracker,
        run_dir: str | Path,
        device: torch.device,
        dtype: torch.dtype,
        peak_flops: float | None,
        checkpoint_meta: dict,
        resume_hint: str = "",
        world_size: int = 1,
    ):
        self.config = config
        self.model = model  # the uncompiled module: its state_dict and generate() are what we save and sample
        self.forward = torch.compile(model) if config.compile else model
        self.optimizers = optimizers
        self.train_loader = train_loader  # an iterator of (inputs, targets) with state_dict()
        self.make_val_batches = make_val_batches
        self.tokenizer = tokenizer
        self.token_bytes = tokenizer.token_bytes()
        self.tracker = tracker
        self.run_dir = Path(run_dir)
        self.device = device
        self.dtype = dtype
        self.peak_flops = peak_flops
        self.checkpoint_meta = checkpoint_meta
        self.resume_hint = resume_hint
        self.world_size = world_size

        self.sequence_len = model.config.sequence_len
        tokens_per_micro_step = config.device_batch_size * self.sequence_len * world_size
        self.grad_accum_steps = config.total_batch_size // tokens_per_micro_step
        self.eval_steps = config.eval_tokens // tokens_per_micro_step
        self.flops_per_token = model.estimate_flops()
        self.num_iterations = resolve_num_iterations(config, self.flops_per_token, model.num_params())
        self.loss_ema = LossEMA(beta=0.9)
        self.clock = StepClock(skip=10)
        self.min_val_bpb = float("inf")
        self.start_step = 0
        self.stop_signal: int | None = None

    def describe(self) -> str:
        c = self.config
        tokens = c.total_batch_size * self.num_iterations
        return "\n".join(
            [
                f"parameters: {self.model.num_params():,} | FLOPs per token: {self.flops_per_token:.3e}",
                f"steps: {self.num_iterations:,} x {c.total_batch_size:,} tokens = {tokens:,} tokens "
                f"({tokens / self.model.num_params():.2f} tokens per parameter, "
                f"{self.flops_per_token * tokens:.3e} FLOPs)",
                f"micro-batch {c.device_batch_size} x {self.sequence_len} x {self.world_size} ranks, "
                f"grad accumulation {self.grad_accum_steps}",
                f"device {self.device}, {str(self.dtype).removeprefix('torch.')}"
                f"{' autocast' if self.dtype != torch.float32 else ''}, compile={c.compile}",
            ]
        )

    def evaluate(self) -> float:
        batches = itertools.islice(self.make_val_batches(), self.eval_steps)
        return evaluate_bpb(self.forward, batches, self.token_bytes, self.device, self.dtype)

    def sample(self, step: int) -> None:
        c = self.config
        samples = sample_completions(self.model, self.tokenizer, c.sample_prompts, c.sample_tokens, seed=c.seed)
        for prompt, completion in samples:
            print(f"  sample | {prompt!r} -> {completion!r}")
        self.tracker.log_samples(step, samples)

    def save(self, step: int) -> Path:
        """Checkpoint the state after `step` updates: what the next update needs, and nothing later."""
        payload = {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "trainer": {"loader": self.train_loader.state_dict(), "rng": rng_states()},
        }
        meta = {
            **self.checkpoint_meta,
            "loss_ema": self.loss_ema.state_dict(),
            "min_val_bpb": self.min_val_bpb if self.min_val_bpb < float("inf") else None,
            "clock": self.clock.state_dict(),
            "wandb_run_id": self.tracker.run_id,
            "log_offsets": self.tracker.offsets(),
        }
        return save_checkpoint(self.run_dir / "checkpoints", step, payload, meta, self.config.keep_last)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from a checkpoint written by save(): the next update is checkpoint.step."""
        self.model.load_state_dict(checkpoint.payload["model"])
        for optimizer, state in zip(self.optimizers, checkpoint.payload["optimizers"], strict=True):
            optimizer.load_state_dict(state)
        self.train_loader.load_state_dict(checkpoint.payload["trainer"]["loader"])
        set_rng_states(checkpoint.payload["trainer"]["rng"])
        meta = checkpoint.meta
        self.loss_ema.load_state_dict(meta["loss_ema"])
        self.min_val_bpb = meta["min_val_bpb"] if meta["min_val_bpb"] is not None else float("inf")
        self.clock.load_state_dict(meta["clock"])
        self.start_step = checkpoint.step

    def train_step(self, step: int) -> dict:
        c = self.config
        self.clock.start()
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.grad_accum_steps):
            inputs, targets = next(self.train_loader)
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with autocast(self.device, self.dtype):
                loss = self.forward(inputs, targets)
            (loss / self.grad_accum_steps).backward()
            loss_sum += loss.detach()
        grad_norm = clip_gradients(list(self.model.parameters()), c.grad_clip)
        lrm = lr_multiplier(step, self.num_iterations, c.warmup_ratio, c.warmdown_ratio, c.final_lr_frac)
        apply_schedule(self.optimizers, step, lrm)
        for optimizer in self.optimizers:
            optimizer.step()
        self.model.zero_grad(set_to_none=True)
        train_loss = (loss_sum / self.grad_accum_steps).item()  # .item() also waits for the device
        synchronize(self.device)
        dt = self.clock.stop(step)
        tok_per_sec = c.total_batch_size / dt
        metrics = {
            "train/loss": train_loss,
            "train/loss_ema": self.loss_ema.update(train_loss),
            "train/grad_norm": grad_norm.item(),
            "train/lrm": lrm,
            "train/tok_per_sec": tok_per_sec,
            "train/dt": dt,
            "total_training_time": self.clock.total_time,
            "total_training_flops": self.flops_per_token * c.total_batch_size * (step + 1),
        }
        if self.peak_flops is not None:
            metrics["train/mfu"] = mfu_percent(self.flops_per_token, tok_per_sec, self.peak_flops, self.world_size)
        return metrics

    def progress_line(self, step: int, metrics: dict) -> str:
        eta = self.clock.eta_seconds(self.num_iterations - step - 1, metrics["train/dt"])
        mfu = f" | mfu {metrics['train/mfu']:.1f}%" if "train/mfu" in metrics else ""
        return (
            f"step {step + 1:5d}/{self.num_iterations} ({100 * (step + 1) / self.num_iterations:5.1f}%) "
            f"| loss {metrics['train/loss']:.4f} ema {metrics['train/loss_ema']:.4f} "
            f"| gnorm {metrics['train/grad_norm']:.3f} | lrm {metrics['train/lrm']:.2f} "
            f"| {metrics['train/tok_per_sec']:,.0f} tok/s{mfu} | dt {metrics['train/dt'] * 1000:.0f}ms "
            f"| eta {format_duration(eta)}"
        )

    def _on_stop_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # asked twice: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.stop_signal = signum
        print(
            f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
            "(send it again to stop at once).",
            flush=True,
        )

    def fit(self) -> dict:
        """Train up to num_iterations updates; returns the final metrics (val/bpb among them).

        final["stopped_by"] is the signal's name when SIGTERM/SIGINT cut the run short."""
        c = self.config
        final: dict = {}
        wall_start = time.perf_counter()
        remove_stale_temporaries(self.run_dir / "checkpoints")
        previous_handlers = {sig: signal.signal(sig, self._on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.model.train()
        try:
            for step in range(self.start_step, self.num_iterations + 1):
                last_step = step == self.num_iterations
                if last_step or step == 0 or is_due(step, c.eval_every):
                    val_bpb = self.evaluate()
                    self.min_val_bpb = min(self.min_val_bpb, val_bpb)
                    self.tracker.log({"val/bpb": val_bpb, "val/min_bpb": self.min_val_bpb}, step=step)
                    print(f"step {step:5d} | val bpb {val_bpb:.4f} (min {self.min_val_bpb:.4f})")
                    final["val/bpb"] = val_bpb
                if last_step or is_due(step, c.sample_every):
                    self.sample(step)
                if last_step:
                    break
                metrics = self.train_step(step)
                final.update(metrics)
                if step % c.log_every == 0 or step == self.num_iterations - 1:
                    self.tracker.log(metrics, step=step)
                    print(self.progress_line(step, metrics), flush=True)
                done = step + 1
                if done == self.num_iterations or is_due(done, c.save_every) or self.stop_signal is not None:
                    print(f"saved checkpoint {self.save(done)}")
                if self.stop_signal is not None:
                    final["stopped_by"] = signal.Signals(self.stop_signal).name
                    print(f"stopped after {done} of {self.num_iterations} steps; resume with:\n  {self.resume_hint}")
                    break
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        final["wall_time"] = time.perf_counter() - wall_start
        final["min_val_bpb"] = self.min_val_bpb
        return final
