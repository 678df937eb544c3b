"""Benchmark: data-parallel training on this machine, and the traffic of nanochat's d20 on 8 GPUs.

    python tests/benchmarks/data_parallel.py [--steps 60] [--repeats 1] [--optimizer adamw]
    python tests/benchmarks/data_parallel.py --skip-throughput        # only the d20 table, seconds

1. Throughput. Trains the same small run (the default d4 on the default Shakespeare data, --batch 8
   sequences of 256 tokens per optimizer step, logger=none, --steps steps) four ways, each in its
   own hydra.run.dir under a temporary folder:
     - `python train.py` with OMP_NUM_THREADS=1, then with OMP_NUM_THREADS=2;
     - `python -m torch.distributed.run --standalone --nproc_per_node=2 train.py` with
       device_batch_size halved (same tokens per step, no grad accumulation either way), with
       system.shard_optimizer=true (ZeRO-2) and =false (plain DDP). torchrun sets
       OMP_NUM_THREADS=1 per worker when it is unset; it is set to 1 explicitly here.
   For each it prints the median train/tok_per_sec of metrics.jsonl over the steps after the first
   10 (tok/s counts every rank's tokens), and the ratios. On a 2-core CPU, 2 processes x 1 thread
   compares fairly with 1 process x 2 threads: both use both cores. --repeats N runs the four N
   times in rounds and reports the median over rounds (the spread shows the machine's noise). The
   data and tokenizer are prepared on first use and cached in the usual place
   (~/.cache/nanochat-hydra, or $NANOCHAT_DATA_DIR). Timings are only as quiet as the machine: the
   load average is printed before and after. About 3 minutes per round on a 2-core CPU.

2. Traffic and optimizer memory, computed, no communication: nanochat's d20 (conf/model/d20.yaml,
   vocab 65,536) with optimizer=adamw_muon, built on the meta device as train.py builds it, and
   wrapped in ShardedOptimizers for each of --world ranks. From its row slices (`.sliced`: AdamW
   parameters, gradients reduce-scattered, weights all-gathered) and whole-matrix owners
   (`.owners`: Muon matrices, gradients reduced onto the owner, weights broadcast from it) it
   prints the bytes each collective moves per optimizer step and the bytes a rank sends with ring
   algorithms ((W-1)/W x N per reduce-scatter / all-gather / reduce / broadcast, 2 (W-1)/W x N per
   all-reduce), against plain DDP's all-reduce of every gradient; and the optimizer state per
   rank, measured with optimizer_state_bytes after one step on meta tensors (AdamW: two fp32
   moments per element of its slice, plus a 4-byte step counter per parameter; Muon: one fp32
   momentum buffer per matrix it owns). Parameters and gradients are fp32. The grad-norm and loss
   all-reduces (a few scalars per step) are left out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanochat.config import compose_cli, instantiate_node
from nanochat.data_parallel import ShardedOptimizers, optimizer_state_bytes
from nanochat.model import GPT

REPO = Path(__file__).resolve().parents[2]
NANOCHAT_D20_PARAMS = 560_988_160  # nanochat's figure for its d20 (vocab 65,536)
SKIP_STEPS = 10  # warm-up steps left out of the median, as total_training_time leaves them out
MiB = 2**20


# --- 1. throughput -------------------------------------------------------------------------------


def command_for(procs: int, overrides: list[str]) -> list[str]:
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    return [sys.executable, *(torchrun if procs > 1 else []), "train.py", *overrides]


def train(command: list[str], threads: int, run_dir: Path) -> list[float]:
    """Run one training command in run_dir; the tok/s of every step after SKIP_STEPS."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(
        [*command, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (exit code {result.returncode}):\n{result.stdout[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/tok_per_sec"] for r in records if "train/tok_per_sec" in r and r["step"] >= SKIP_STEPS]


def throughput(steps: int, batch: int, optimizer: str, model: str, repeats: int) -> None:
    sequence_len = compose_cli([f"model={model}"]).model.sequence_len
    tokens_per_step = batch * sequence_len
    common = [
        f"model={model}",
        f"optimizer={optimizer}",
        "logger=none",
        f"trainer.num_iterations={steps}",
        f"trainer.total_batch_size={tokens_per_step}",
        "eval.every=100000",  # evaluations only at step 0 and at the end, outside the timed steps
        f"eval.tokens={tokens_per_step}",  # one evaluation batch
        "system.peak_flops=1e12",  # skip the CPU peak measurement: MFU is not what is measured here
    ]
    whole, half = f"trainer.device_batch_size={batch}", f"trainer.device_batch_size={batch // 2}"
    runs = [  # name, processes, OMP_NUM_THREADS per process, overrides
        ("1 process x 1 thread", 1, 1, [whole]),
        ("1 process x 2 threads", 1, 2, [whole]),
        ("2 processes x 1 thread, ZeRO-2", 2, 1, [half, "system.shard_optimizer=true"]),
        ("2 processes x 1 thread, DDP", 2, 1, [half, "system.shard_optimizer=false"]),
    ]
    print(
        f"throughput: {model}, optimizer={optimizer}, {batch} x {sequence_len} = {tokens_per_step:,} tokens per "
        f"step, {steps} steps, median tok/s over steps {SKIP_STEPS}..{steps - 1}, {repeats} round(s); "
        f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} before",
        flush=True,
    )
    for name, procs, threads, extra in runs:
        print(f"  {name}: OMP_NUM_THREADS={threads} {' '.join(command_for(procs, common + extra)[1:])}")
    medians: dict[str, list[float]] = {name: [] for name, *_ in runs}
    with tempfile.TemporaryDirectory(prefix="nanochat-dp-benchmark-") as tmp:
        for round_ in range(repeats):  # rounds, so that drift in the machine's speed hits every setting alike
            for i, (name, procs, threads, extra) in enumerate(runs):
                start = time.perf_counter()
                rates = train(command_for(procs, common + extra), threads, Path(tmp) / f"round{round_}_run{i}")
                medians[name].append(statistics.median(rates))
                print(
                    f"  round {round_ + 1}, {name}: {medians[name][-1]:,.0f} tok/s "
                    f"({time.perf_counter() - start:.0f} s wall)",
                    flush=True,
                )
    load = os.getloadavg()[0]
    result = {name: statistics.median(values) for name, values in medians.items()}
    base_1, base_2 = result["1 process x 1 thread"], result["1 process x 2 threads"]
    print(f"\n{'run':<34}{'tok/s':>9}{'min..max over rounds':>22}{'vs 1x1':>9}{'vs 1x2':>9}")
    for name, rate in result.items():
        spread = f"{min(medians[name]):,.0f}..{max(medians[name]):,.0f}"
        print(f"{name:<34}{rate:>9,.0f}{spread:>22}{rate / base_1:>8.2f}x{rate / base_2:>8.2f}x")
    print(f"load average {load:.2f} after (1-minute)\n")


# --- 2. d20 on W GPUs: traffic and optimizer state ------------------------------------------------


def build_d20():
    """nanochat's d20 on the meta device, and a function returning fresh adamw_muon optimizers for it."""
    cfg = compose_cli(["model=d20", "optimizer=adamw_muon", "tokenizer.vocab_size=65536"])
    with torch.device("meta"):
        model = GPT(instantiate_node(cfg.model))
    make_optimizers = instantiate_node(cfg.optimizer)
    return model, lambda: make_optimizers(model)


def step_on_meta(optimizers: list[torch.optim.Optimizer]) -> None:
    """One step of every optimizer on what it holds, with zero (meta) gradients: creates its state."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        optimizer.step()


def state_bytes_by_kind(optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    return {type(optimizer).__name__: optimizer_state_bytes([optimizer]) for optimizer in optimizers}


def traffic(world: int) -> None:
    model, make_optimizers = build_d20()
    cfg = model.config
    params = model.num_params()
    verdict = "matches" if params == NANOCHAT_D20_PARAMS else f"DIFFERS by {params - NANOCHAT_D20_PARAMS:+,}"
    print(
        f"d20: n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, n_head {cfg.n_head}, vocab {cfg.vocab_size:,}: "
        f"{params:,} parameters (nanochat: {NANOCHAT_D20_PARAMS:,}; {verdict})"
    )

    # Rank 0's view: which parameters are split by rows, which are owned whole (the same on every rank).
    sharded = ShardedOptimizers(make_optimizers(), rank=0, world_size=world)
    sliced = sum(full.numel() for full, _ in sharded.sliced) * 4
    owned = sum(p.numel() for p in sharded.owners) * 4
    everything = params * 4
    if sliced + owned != everything:
        print(f"WARNING: sliced {sliced:,} + owned {owned:,} bytes != all parameters {everything:,} bytes")
    ring = (world - 1) / world
    print(
        f"{world} ranks, fp32 gradients and weights ({everything / MiB:,.0f} MiB): {len(sharded.sliced)} AdamW "
        f"parameters split by rows ({sliced / MiB:,.0f} MiB), {len(sharded.owners)} matrices owned whole "
        f"({owned / MiB:,.0f} MiB)"
    )
    zero_sent = ring * (2 * sliced + 2 * owned)
    ddp_sent = 2 * ring * everything
    rows = [
        ("communication per optimizer step (MiB)", "ZeRO-2", "DDP"),
        ("  reduce-scatter grads (AdamW rows)", sliced, None),
        ("  all-gather weights (AdamW rows)", sliced, None),
        ("  reduce grads onto owner (Muon)", owned, None),
        ("  broadcast weights from owner (Muon)", owned, None),
        ("  all-reduce grads (everything)", None, everything),
        (f"  sent per rank, ring ({world - 1}/{world} per op)", zero_sent, ddp_sent),
    ]

    # Optimizer state on each rank, measured after one step on meta tensors.
    per_rank = []
    for r in range(world):
        optimizers = make_optimizers()
        ShardedOptimizers(optimizers, rank=r, world_size=world)  # re-points their groups at rank r's part
        step_on_meta(optimizers)
        per_rank.append(state_bytes_by_kind(optimizers))
    replicated_optimizers = make_optimizers()
    step_on_meta(replicated_optimizers)
    replicated = state_bytes_by_kind(replicated_optimizers)
    rows.append((f"optimizer state per rank (MiB, min / max over {world})", "ZeRO-2", "DDP"))
    for kind in [*replicated, "total"]:
        values = [sum(b.values()) if kind == "total" else b[kind] for b in per_rank]
        full = sum(replicated.values()) if kind == "total" else replicated[kind]
        rows.append((f"  {kind}", (min(values), max(values)), full))

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, str):
            return value
        if isinstance(value, tuple):
            low, high = value
            return f"{low / MiB:,.0f} / {high / MiB:,.0f}"
        return f"{value / MiB:,.0f}"

    for label, zero, ddp in rows:
        print(f"{label:<52}{cell(zero):>14}{cell(ddp):>10}")
    total_zero = [sum(b.values()) for b in per_rank]
    print(
        f"ZeRO-2 keeps {max(total_zero) / sum(replicated.values()):.1%} of the replicated optimizer state on "
        f"its largest rank and sends {zero_sent / ddp_sent:.2f}x DDP's bytes per rank per step"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per throughput run")
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step (the default run's: 8)")
    parser.add_argument("--model", default="d4")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the four runs; medians over rounds")
    parser.add_argument("--optimizer", default="adamw", help="adamw (the default run's) or adamw_muon")
    parser.add_argument("--world", type=int, default=8, help="ranks for the d20 traffic table")
    parser.add_argument("--skip-throughput", action="store_true", help="only the d20 traffic table")
    args = parser.parse_args()
    if args.steps <= SKIP_STEPS:
        parser.error(f"--steps must exceed {SKIP_STEPS}: the first {SKIP_STEPS} steps are not timed")
    if args.batch % 2:
        parser.error("--batch must be even: the 2-process runs take half of it each")
    if not args.skip_throughput:
        throughput(args.steps, args.batch, args.optimizer, args.model, args.repeats)
    traffic(args.world)


if __name__ == "__main__":
    main()
