"""The training loop: grad accumulation, schedules, clipping, metrics, evaluation, samples, checkpoints.

One optimizer step (see DESIGN.md, "Data flow of one step"):
    grad_accum micro-steps of forward + backward on loss / grad_accum (on each rank)
    -> gradients averaged over ranks (all-reduced, or reduce-scattered to optimizer shards)
    -> global grad norm (always measured; clipped only when grad_clip > 0)
    -> lr multiplier and Muon momentum for this step -> every optimizer steps -> zero grads
    -> train/* metrics to metrics.jsonl (and W&B) and a progress line, from rank 0
The loop runs num_iterations + 1 times so that evaluation and sampling happen after the last update.

Step numbering, one convention everywhere (console, metrics.jsonl, W&B, TensorBoard, CSV), as in
nanochat: `step s` is the 0-based index of an update. Train metrics at step s describe update s (the
(s+1)-th: its loss, grad norm, lr, timing); evaluation and samples at step s see the weights after s
updates, i.e. before update s (so a run of N steps evaluates at 0, ..., N); checkpoint step_00000s
holds the state after s updates. The x-axes `train/tokens` and `total_training_flops` at step s are
the tokens and FLOPs of the s updates before it, in train and val records alike.

Long phases say what they do: a line as each evaluation, sampling, checkpoint or profile starts
(what, how big) and one with its result and duration as it ends (nanochat/logs.py phase()).

Evaluations: val bpb at step 0, every eval.every steps and at the end; CORE (eval.core_every > 0)
every core_every steps and at the end, not at step 0 (as nanochat's base_train).

Under torchrun every rank runs this loop in step; nanochat/data_parallel.py holds what differs.

Speed (measured by tests/benchmarks/train_throughput.py):
- the next batch is prepared in a background thread (nanochat/data/loader.py Prefetcher), pinned
  and copied non_blocking on CUDA; the micro-step loop never waits for the device, and each step
  waits once, for the loss, the stop flag and the grad norm fetched in one copy;
- with system.compile the model is compiled once, for training: evaluation (val bpb and CORE) and
  sampling run the uncompiled model, so no second graph is compiled for eval mode, no_grad and
  per-token losses. If compilation fails (no C++ compiler for Inductor on a CPU, no working Triton on a GPU) the run
  says so in one line and trains eager. Optimizers with a compile() method (Muon) compile theirs;
- after the first step in this process the objects alive so far (modules, compiled code, imported
  libraries) are frozen out of Python's garbage collector (gc.freeze), so its full collections
  stop walking them; they are unfrozen when fit() returns.

A checkpoint taken after update s-1 holds everything the next steps depend on (weights, optimizer
states, loader position, RNG states, loss EMA, clocks), so a run resumed from it continues exactly
as if it had never stopped: on a CPU its losses are bitwise the uninterrupted run's. SIGTERM and
SIGINT finish the step in flight, write such a checkpoint and return; under torchrun the ranks agree
at every step whether any of them was signalled, so they all stop after the same step.
"""

import gc
import json
import math
import random
import signal
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from nanochat.checkpoint import (
    TOKENIZER_FILE,
    Checkpoint,
    load_rank_files,
    remove_stale_temporaries,
    save_checkpoint,
)
from nanochat.core_eval import EvalBundle, evaluate_core, longest_prompt
from nanochat.data.loader import Prefetcher, RepeatFirst, merge_lane_states
from nanochat.data_parallel import ReplicatedOptimizers, ShardedOptimizers, shards_state
from nanochat.device import CompiledOrEager, autocast
from nanochat.distributed import RankFailed, all_reduce_sum_, is_main, rank
from nanochat.errors import UserError
from nanochat.evaluation import evaluate_bpb, sample_completions
from nanochat.logs import log, phase
from nanochat.metrics import LossEMA, StepClock, format_duration, mfu_percent
from nanochat.optim import apply_schedule
from nanochat.schema import Settings, TrainerConfig


def resolve_num_iterations(config: TrainerConfig, flops_per_token: float, num_params: int) -> int:
    """Explicit steps if given, else a FLOPs budget, else a tokens-per-parameter ratio (nanochat's order)."""
    if config.num_iterations > 0:
        return config.num_iterations
    if config.target_flops > 0:
        steps = round(config.target_flops / (flops_per_token * config.total_batch_size))
    else:
        steps = int(config.target_param_data_ratio * num_params) // config.total_batch_size
    return max(1, steps)


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
        settings: Settings,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        schedule: Callable[[int, int], float],
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
        core_bundle: EvalBundle | None = None,
        remeasure_peak: Callable[[], float] | None = None,
    ):
        """model: any nanochat/interface.py LanguageModel, on its device with its weights set.
        core_bundle: the eval bundle CORE is computed on when settings.eval.core_every > 0.
        remeasure_peak: for a peak measured at start-up (CPU), measures it again (see train_step)."""
        self.settings = settings
        self.config = config = settings.trainer
        self.model = model  # the uncompiled module: what we save, evaluate and sample
        self.forward = CompiledOrEager(model, "the model") if settings.system.compile else model
        self.optimizers = optimizers
        if settings.system.compile:
            for optimizer in optimizers:
                if callable(getattr(optimizer, "compile", None)):
                    optimizer.compile()
        self.schedule = schedule
        if shards_state(settings.system.shard_optimizer, world_size):
            self.step_optimizers = ShardedOptimizers(optimizers, rank(), world_size)
        else:
            self.step_optimizers = ReplicatedOptimizers(optimizers, world_size)
        self.sequence_len = model.sequence_len
        tokens_per_micro_step = config.device_batch_size * self.sequence_len * world_size
        self.grad_accum_steps = config.total_batch_size // tokens_per_micro_step
        if config.overfit:  # one step's micro-batches, every step
            train_loader = RepeatFirst(train_loader, self.grad_accum_steps)
        # an iterator of (inputs, targets) with state_dict(), prepared one batch ahead
        self.train_loader = Prefetcher(train_loader, pin_memory=device.type == "cuda")
        self.make_val_batches = make_val_batches
        self.tokenizer = tokenizer
        self.token_bytes = tokenizer.token_bytes()
        self.tracker = tracker
        self.run_dir = Path(run_dir)
        self.device = device
        self.dtype = dtype
        self.peak_flops = peak_flops
        self.remeasure_peak = remeasure_peak
        self.checkpoint_meta = checkpoint_meta
        self.resume_hint = resume_hint
        self.world_size = world_size
        if settings.eval.core_every > 0 and core_bundle is None:
            raise ValueError("eval.core_every > 0 needs the eval bundle (core_bundle)")
        self.core_bundle = core_bundle

        self.flops_per_token = model.estimate_flops()
        self.num_iterations = resolve_num_iterations(config, self.flops_per_token, model.num_params())
        self.loss_ema = LossEMA(beta=0.9)
        self.clock = StepClock(skip=10)
        self.min_val_bpb = float("inf")
        self.start_step = 0
        self.skipped_steps = 0  # updates not applied because the loss or grad norm was not finite
        self.skipped_in_a_row = 0
        self.stop_signal: int | None = None  # set by a signal handler on this rank
        self.stopping = False  # some rank was signalled before this step's all-reduce
        self.warm = False  # a step has run in this process: compiled, allocator and caches warm

    def derived(self) -> dict:
        """The run's figures that follow from its config and model, for the W&B config."""
        c = self.config
        tokens = c.total_batch_size * self.num_iterations
        return {
            "parameters": self.model.num_params(),
            "flops_per_token": self.flops_per_token,
            "num_iterations": self.num_iterations,
            "grad_accum_steps": self.grad_accum_steps,
            "total_tokens": tokens,
            "total_flops": self.flops_per_token * tokens,
            "tokens_per_parameter": tokens / self.model.num_params(),
            "world_size": self.world_size,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "peak_flops": self.peak_flops,
        }

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
                f"grad accumulation {self.grad_accum_steps}, optimizer state "
                f"{'sharded over' if self.step_optimizers.sharded else 'replicated on'} {self.world_size} ranks",
                f"device {self.device}, {str(self.dtype).removeprefix('torch.')}"
                f"{' autocast' if self.dtype != torch.float32 else ''}, compile={self.settings.system.compile}"
                f"{' (training only: evaluation and samples run eager)' if self.settings.system.compile else ''}",
            ]
        )

    def evaluate(self) -> float:
        # Eager, not self.forward: a compiled model would compile a second graph for evaluation.
        return evaluate_bpb(self.model, self.make_val_batches(), self.token_bytes, self.device, self.dtype)

    def _evaluate_and_log(self, step: int) -> float:
        tokens = self.settings.eval.tokens // self.sequence_len * self.sequence_len
        with phase(f"step {step} val bpb", f"{tokens:,} validation tokens") as done:
            val_bpb = self.evaluate()
            self.min_val_bpb = min(self.min_val_bpb, val_bpb)
            done(f"step {step:5d} | val bpb {val_bpb:.4f} (min {self.min_val_bpb:.4f})")
        self.tracker.log({"val/bpb": val_bpb, "val/min_bpb": self.min_val_bpb, **self._axes(step)}, step=step)
        return val_bpb

    def _axes(self, step: int) -> dict:
        """The x-axes of an evaluation at step, so that it plots against tokens and FLOPs too: the
        tokens and FLOPs of the `step` updates before it."""
        tokens_seen = self.config.total_batch_size * step
        return {"train/tokens": tokens_seen, "total_training_flops": self.flops_per_token * tokens_seen}

    def evaluate_core(self, step: int) -> dict:
        """CORE on every rank (each takes its stride of the examples; the counts are summed), eager
        like evaluate(); logged at step with the x-axes, as val bpb is."""
        settings = self.settings.eval
        cap = settings.core_max_per_task
        tasks = len(self.core_bundle.tasks)
        with phase(
            f"step {step} CORE", f"{tasks} tasks, {'all' if cap is None else f'at most {cap}'} examples each"
        ) as done:
            metrics = evaluate_core(
                self.model,
                self.tokenizer,
                self.core_bundle,
                self.device,
                self.dtype,
                max_per_task=cap,
                max_len=longest_prompt(self.model),
            )
            done(f"step {step:5d} | CORE {metrics['core/metric']:.4f}")
        self.tracker.log({**metrics, **self._axes(step)}, step=step)
        return metrics

    def sample(self, step: int) -> None:
        """Rank 0 only: the weights are the same everywhere."""
        c = self.settings.sample
        if not is_main() or not c.prompts:
            return
        with phase(f"step {step} samples", f"{len(c.prompts)} prompts x {c.tokens} tokens"):
            samples = sample_completions(
                self.model,
                self.tokenizer,
                c.prompts,
                c.tokens,
                temperature=c.temperature,
                top_k=c.top_k,
                seed=self.config.seed,
                device=self.device,
                dtype=self.dtype,
            )
            for prompt, completion in samples:
                log.info(f"  sample | {prompt!r} -> {completion!r}")
        self.tracker.log_samples(step, samples)

    def save(self, step: int) -> Path:
        """Checkpoint the state after `step` updates: what the next update needs, and nothing later.

        The weights (the same on every rank) and replicated optimizer state are rank 0's to write;
        each rank writes its own loader position and RNG states, and its optimizer shard."""
        optimizers = self.step_optimizers.state_dict()
        shared = {"model": self.model.state_dict()}
        per_rank = {"trainer": {"loader": self.train_loader.state_dict(), "rng": rng_states()}}
        (per_rank if self.step_optimizers.sharded else shared)["optimizers"] = optimizers
        meta = {
            **self.checkpoint_meta,
            "loss_ema": self.loss_ema.state_dict(),
            "min_val_bpb": self.min_val_bpb if self.min_val_bpb < float("inf") else None,
            "clock": self.clock.state_dict(),
            "skipped_steps": self.skipped_steps,
            "sharded_optimizer": self.step_optimizers.sharded,
            "wandb_run_id": self.tracker.run_id,
            "log_offsets": self.tracker.offsets(),
        }
        keep_last = self.settings.checkpoint.keep_last
        texts = {TOKENIZER_FILE: self.tokenizer.to_json()}
        return save_checkpoint(self.run_dir / "checkpoints", step, shared, meta, keep_last, per_rank, texts)

    def _save_or_warn(self, step: int) -> None:
        """A checkpoint that cannot be written (disk full, no permission) stops the run with its
        reason, or with checkpoint.write_errors=warn is skipped with a warning; either way the
        checkpoints before it stay as they were (see save_checkpoint)."""
        try:
            with phase(
                f"checkpoint step_{step:06d}", f"{self.model.num_params():,} parameters and the optimizer state"
            ) as done:
                path = self.save(step)
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
                done(f"saved checkpoint {path} ({size / 2**20:.1f} MiB)")
        except UserError as error:
            if self.settings.checkpoint.write_errors == "stop":
                raise
            if is_main():
                warnings.warn(f"{error} Training goes on (checkpoint.write_errors=warn).")

    def restore(self, checkpoint: Checkpoint, same_data: bool = True) -> bool:
        """Continue from a checkpoint written by save(), by any number of ranks: the next update is
        checkpoint.step. The weights and every optimizer's moments and buffers come from the
        checkpoint; the optimizers' hyperparameters (lrs, betas, eps, weight decay, momentum
        schedule) stay this run's. The data continues where it stood if same_data and the saved
        position belongs to this run's streams; otherwise it starts from the beginning. Returns
        whether the data position was restored."""
        self.model.load_state_dict(checkpoint.payload["model"])
        saved_world, saved_sharded = checkpoint.meta["world_size"], checkpoint.meta["sharded_optimizer"]
        if saved_world == self.world_size and saved_sharded == self.step_optimizers.sharded:
            self.step_optimizers.load_state_dict(checkpoint.payload["optimizers"])
            own = checkpoint.payload["trainer"]
            loader, rng = own["loader"], own["rng"]
        else:  # written by another number of ranks, or another optimizer layout: re-split it
            saved = load_rank_files(checkpoint, "optimizers") if saved_sharded else checkpoint.payload["optimizers"]
            self.step_optimizers.load_full_state(self.step_optimizers.full_state(saved, saved_world, saved_sharded))
            ranks = load_rank_files(checkpoint, "trainer")
            loader = merge_lane_states([state["loader"] for state in ranks])
            rng = ranks[rank() if rank() < saved_world else 0]["rng"]  # nothing in training draws from it
        restored_data = same_data and self.train_loader.continues(loader)
        if restored_data:
            self.train_loader.load_state_dict(loader)
        set_rng_states(rng)
        meta = checkpoint.meta
        self.loss_ema.load_state_dict(meta["loss_ema"])
        self.min_val_bpb = meta["min_val_bpb"] if meta["min_val_bpb"] is not None else float("inf")
        self.clock.load_state_dict(meta["clock"])
        self.skipped_steps = meta["skipped_steps"]
        self.start_step = checkpoint.step
        return restored_data

    def _forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            loss = self.forward(inputs, targets)
        (loss / self.grad_accum_steps).backward()
        return loss

    def _first_forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The first micro-step compiles the forward and, lazily, the backward graph; if the
        backward's compilation fails, this micro-step is redone eager (no gradient has been
        accumulated before it). CompiledOrEager already covers a failing forward."""
        try:
            return self._forward_backward(inputs, targets)
        except Exception as error:
            if not (isinstance(self.forward, CompiledOrEager) and self.forward.compiled):
                raise
            self.forward.fall_back(error)
            self.step_optimizers.zero_grad()
            return self._forward_backward(inputs, targets)

    def _micro_step(self, first: bool) -> torch.Tensor:
        """Forward and backward on the next micro-batch; nothing here waits for the device."""
        inputs, targets = next(self.train_loader)
        inputs = inputs.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        return (self._first_forward_backward if first else self._forward_backward)(inputs, targets).detach()

    def train_step(self, step: int) -> dict:
        c = self.config
        self.clock.start()
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(self.grad_accum_steps):
            loss_sum += self._micro_step(first=not self.warm and micro_step == 0)
        self.step_optimizers.sync_gradients()
        grad_norm = self.step_optimizers.clip_grad_norm_(c.grad_clip)
        # One small all-reduce per step: the loss averaged over ranks, and whether any rank was
        # asked to stop (so that all of them stop after this same step). torch.full fills on the
        # device: no host-to-device copy.
        stop_requested = torch.full((), float(self.stop_signal is not None), device=self.device)
        shared = torch.stack([loss_sum / self.grad_accum_steps, stop_requested])
        all_reduce_sum_(shared)
        # The step's one wait for the device: these three numbers come back in one copy.
        loss_total, stop_votes, grad_norm_value = torch.cat([shared, grad_norm.reshape(1).float()]).tolist()
        train_loss = loss_total / self.world_size
        # Decided from the agreed flag only: a signal landing after this all-reduce counts next step.
        self.stopping = stop_votes > 0
        lrm = self.schedule(step, self.num_iterations)
        if math.isfinite(train_loss) and math.isfinite(grad_norm_value):
            apply_schedule(self.optimizers, step, lrm)
            self.step_optimizers.step()
            self.skipped_in_a_row = 0
        else:
            self._skip_nonfinite(step, train_loss, grad_norm_value)
        self.step_optimizers.zero_grad()
        dt = self.clock.stop(step)
        if not self.warm:
            gc.collect()
            gc.freeze()
            self.warm = True
        tok_per_sec = c.total_batch_size / dt
        # Tokens and FLOPs trained on before this update (nanochat's flops_so_far): what the model whose
        # loss this is had seen, and the same figures as the evaluation logged at this step.
        tokens = c.total_batch_size * step
        metrics = {
            "train/loss": train_loss,
            "train/loss_ema": self.loss_ema.update(train_loss)
            if self.skipped_in_a_row == 0
            else self.loss_ema.debiased(),
            "train/grad_norm": grad_norm_value,
            "train/skipped_steps": self.skipped_steps,
            "train/lrm": lrm,
            "train/tok_per_sec": tok_per_sec,
            "train/dt": dt,
            "total_training_time": self.clock.total_time,
            "train/tokens": tokens,
            "total_training_flops": self.flops_per_token * tokens,
        }
        if self.peak_flops is not None:
            mfu = mfu_percent(self.flops_per_token, tok_per_sec, self.peak_flops, self.world_size)
            if mfu > 100 and self.remeasure_peak is not None:
                # This step did more matmul work per second than the measured peak: that figure was
                # taken while the CPU was busy with other work. Measure again now, while it is not.
                previous = self.peak_flops
                self.peak_flops = max(previous, self.remeasure_peak())
                mfu = mfu_percent(self.flops_per_token, tok_per_sec, self.peak_flops, self.world_size)
                log.info(
                    f"step {step} ran above the peak of {previous / 1e9:.1f} GFLOP/s measured earlier (the CPU was "
                    f"busy then); measured again: {self.peak_flops / 1e9:.1f} GFLOP/s, MFU {mfu:.1f}%"
                )
            metrics["train/mfu"] = mfu
        if self.device.type == "cuda":  # the allocator's high-water mark on this rank, since the run started
            metrics["train/max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def _skip_nonfinite(self, step: int, loss: float, norm: float) -> None:
        """Leave the weights and optimizer state as they were; stop once skip_nonfinite steps in a row were skipped."""
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        what = f"the train loss is {loss} and the grad norm {norm}"
        allowed = self.config.skip_nonfinite
        if self.skipped_in_a_row <= allowed:
            warnings.warn(
                f"step {step}: {what}; the update was skipped ({self.skipped_in_a_row} of {allowed} in a row)."
            )
            return
        message = (
            f"step {step}: {what}; the update was not applied and the run stops after {self.skipped_in_a_row} such "
            f"step(s) in a row (trainer.skip_nonfinite={allowed}); the checkpoints before it are kept as they were."
        )
        raise UserError(message) if is_main() else RankFailed(message)

    def close(self) -> None:
        """Stop the batch-prefetching thread and give the frozen objects back to the collector."""
        self.train_loader.close()
        if self.warm:
            gc.unfreeze()

    def progress_line(self, step: int, metrics: dict) -> str:
        eta = self.clock.eta_seconds(self.num_iterations - step - 1, metrics["train/dt"])
        mfu = f" | mfu {metrics['train/mfu']:.1f}%" if "train/mfu" in metrics else ""
        memory = f" | mem {metrics['train/max_memory_gib']:.1f}GiB" if "train/max_memory_gib" in metrics else ""
        # step: the 0-based update index, as in metrics.jsonl and W&B; the percentage is of updates done.
        return (
            f"step {step:5d}/{self.num_iterations} ({100 * (step + 1) / self.num_iterations:5.1f}%) "
            f"| loss {metrics['train/loss']:.4f} ema {metrics['train/loss_ema']:.4f} "
            f"| gnorm {metrics['train/grad_norm']:.3f} | lrm {metrics['train/lrm']:.2f} "
            f"| {metrics['train/tok_per_sec']:,.0f} tok/s{mfu}{memory} | dt {metrics['train/dt'] * 1000:.0f}ms "
            f"| eta {format_duration(eta)}"
        )

    def _on_stop_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # asked twice: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.stop_signal = signum
        log.info(
            f"{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
            "(send it again to stop at once)."
        )

    def _start_profiler(self):
        """torch.profiler over profile.steps training steps after profile.skip (rank 0 only); the
        trace and the operator table land in <run dir>/profile/ as soon as the last one ends."""
        p = self.settings.profile
        if p.steps == 0 or not is_main():
            return None
        first = self.start_step + p.skip
        if first + p.steps > self.num_iterations:
            warnings.warn(
                f"profile.skip={p.skip} + profile.steps={p.steps} from step {self.start_step} run past the last step "
                f"({self.num_iterations - 1}); nothing is profiled."
            )
            return None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        folder = self.run_dir / "profile"

        def write(profiler) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            profiler.export_chrome_trace(str(folder / "trace.json"))
            sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = profiler.key_averages().table(sort_by=sort, row_limit=40)
            (folder / "key_averages.txt").write_text(table + "\n", encoding="utf-8")
            steps = {"first_step": first, "steps": p.steps, "sorted_by": sort}
            (folder / "steps.json").write_text(json.dumps(steps) + "\n", encoding="utf-8")
            log.info(
                f"profile of steps {first}-{first + p.steps - 1}: {folder / 'trace.json'} and {folder / 'key_averages.txt'}"
            )

        log.info(f"profiling steps {first}-{first + p.steps - 1} with torch.profiler ({p.skip} unprofiled steps first)")
        # wait + warmup: the first steps run unprofiled, the last of them with the profiler warming up.
        schedule = torch.profiler.schedule(wait=max(p.skip - 1, 0), warmup=min(p.skip, 1), active=p.steps, repeat=1)
        profiler = torch.profiler.profile(
            activities=activities, schedule=schedule, on_trace_ready=write, record_shapes=True
        )
        profiler.__enter__()
        return profiler

    def fit(self) -> dict:
        """Train up to num_iterations updates; returns the final metrics (val/bpb among them).

        final["stopped_by"] is the signal's name when SIGTERM/SIGINT cut the run short."""
        c = self.config
        every = {"eval": self.settings.eval.every, "sample": self.settings.sample.every}
        core_every = self.settings.eval.core_every
        save_every = self.settings.checkpoint.save_every
        final: dict = {}
        wall_start = time.perf_counter()
        if is_main():
            remove_stale_temporaries(self.run_dir / "checkpoints")
        previous_handlers = {sig: signal.signal(sig, self._on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.model.train()
        profiler = self._start_profiler()
        try:
            for step in range(self.start_step, self.num_iterations + 1):
                last_step = step == self.num_iterations
                if last_step or step == 0 or is_due(step, every["eval"]):
                    final["val/bpb"] = self._evaluate_and_log(step)
                if core_every > 0 and (last_step or is_due(step, core_every)):
                    final.update(self.evaluate_core(step))
                if last_step or is_due(step, every["sample"]):
                    self.sample(step)
                if last_step:
                    break
                if step == self.start_step and not self.warm and isinstance(self.forward, CompiledOrEager):
                    log.info(f"step {step}: torch.compile compiles the model in this step (once; it takes a while)")
                metrics = self.train_step(step)
                if profiler is not None:
                    profiler.step()
                final.update(metrics)
                if step % c.log_every == 0 or step == self.num_iterations - 1:
                    self.tracker.log(metrics, step=step)
                    log.info(self.progress_line(step, metrics))
                done = step + 1
                if done == self.num_iterations or is_due(done, save_every) or self.stopping:
                    self._save_or_warn(done)
                if self.stopping:
                    final["stopped_by"] = signal.Signals(self.stop_signal or signal.SIGTERM).name
                    log.info(f"stopped after {done} of {self.num_iterations} steps; resume with:\n  {self.resume_hint}")
                    break
        finally:
            if profiler is not None:
                profiler.__exit__(None, None, None)
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            self.close()
        final["wall_time"] = time.perf_counter() - wall_start
        final["min_val_bpb"] = self.min_val_bpb
        return final
