"""Benchmark: training throughput of any config, in this process, as train.py would run it.

    python tests/benchmarks/train_throughput.py [options] [train.py overrides ...]
    python tests/benchmarks/train_throughput.py --variant "fp32: system.dtype=float32" \\
        --variant "bf16: system.dtype=bfloat16" --rounds 3 [options] [overrides shared by all ...]

One run: the config composed from conf/ with the overrides (train.py's syntax) plus `logger=none`,
no evaluation, samples or checkpoints before the end, `checkpoint.resume=none` and
`trainer.num_iterations` = warm-up + timed steps, is assembled by nanochat.assemble exactly as
train.py assembles it (allocator settings, dtype choice, data and tokenizer prepared on first use,
compile), in a temporary run dir. The benchmark then calls Trainer.train_step for --warmup steps
(compilation, allocator and cache warm-up; not timed) and --steps timed steps, and measures:

- tok/s: tokens per optimizer step x timed steps / their summed wall time (train/dt, which waits
  for the device), and at the median step time; step-time percentiles p10 / p50 / p90 / max;
- model FLOP/s = the model's estimate_flops() per token x tok/s, and MFU against (a) the peak the
  trainer uses (datasheet bf16 on a GPU, measured on a CPU at the run's dtype, or
  system.peak_flops) and (b) the fp32 and bf16 matmul peaks measured in this process after the
  timed steps (square matmuls: 1024 on a CPU, 8192 on a GPU; nanochat/device.py);
- peak RSS (ru_maxrss) and on CUDA torch.cuda.max_memory_allocated; minor page faults and system
  CPU time per timed step (the cost of memory handed back to the kernel and faulted in again);
- the first step's time (with compile: the cold compilation) and the run's start-up time.

It prints a table, and the same figures as one JSON object on the last line (or into --json).

Variants (--variant "name: overrides", two or more, and --rounds N): each variant runs in a fresh
process per round (allocator settings and compiled graphs do not leak between them), interleaved
round by round (A B C, then B C A, ...) so that the machine's load drifts over all of them alike.
The table gives each variant's median over rounds, every round's tok/s, and the ratio of medians
to the first variant. Overrides outside the variants apply to all of them.

--loss-head plain swaps GPT's chunked loss head (nanochat/loss_head.py) for nanochat's head in one
piece (lm_head, .float(), softcap, F.cross_entropy over the full logits), to measure what chunking
saves in time and peak memory; a variant may carry it too ("plain: --loss-head=plain").

Threads: torch's default (one per core), or --threads N (torch.set_num_threads in the run, and
OMP_NUM_THREADS for variant processes). The load average is printed before and after: on a shared
machine only ratios within one interleaved comparison mean something.
"""

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nanochat.model
from nanochat.assemble import assemble
from nanochat.config import compose_cli, without_hydra
from nanochat.device import measure_matmul_flops, synchronize

REPO = Path(__file__).resolve().parents[2]
# What keeps evaluation, samples and checkpoints out of the timed steps (fit() is never called,
# so they would not run anyway; these also keep assemble() from reading or writing checkpoints).
QUIET = ["logger=none", "eval.every=-1", "sample.every=-1", "checkpoint.save_every=-1", "checkpoint.resume=none"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def plain_loss_head(hidden, weight, targets, softcap, reduction, chunk_tokens):
    """nanochat's head in one piece: the full [tokens, vocab] fp32 logits, softcapped, then F.cross_entropy."""
    logits = F.linear(hidden, weight).float()
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


def measure(overrides: list[str], steps: int, warmup: int, threads: int | None, loss_head: str) -> dict:
    """One run in this process; the figures described in the module docstring."""
    if threads:
        torch.set_num_threads(threads)
    if loss_head == "plain":
        nanochat.model.softcapped_cross_entropy = plain_loss_head
    start = time.perf_counter()
    all_overrides = [*QUIET, *overrides, f"trainer.num_iterations={warmup + steps}"]
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as run_dir:
        run = assemble(without_hydra(compose_cli(all_overrides)), run_dir, all_overrides)
        trainer = run.trainer
        trainer.model.train()
        startup_s = time.perf_counter() - start
        dts, losses = [], []
        usage_before = None
        for step in range(warmup + steps):
            if step == warmup:
                usage_before = resource.getrusage(resource.RUSAGE_SELF)
                if trainer.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(trainer.device)
            metrics = trainer.train_step(step)
            dts.append(metrics["train/dt"])
            losses.append(metrics["train/loss"])
        usage = resource.getrusage(resource.RUSAGE_SELF)
        trainer.close()
        run.tracker.finish()
    device = trainer.device
    synchronize(device)
    size = 8192 if device.type == "cuda" else 1024
    peaks = {str(dtype).removeprefix("torch."): measure_matmul_flops(device, dtype, size) for dtype in PEAK_DTYPES}
    timed = dts[warmup:]
    tokens_per_step = trainer.config.total_batch_size
    tok_per_sec = tokens_per_step * len(timed) / sum(timed)
    flops_per_sec = trainer.flops_per_token * tok_per_sec
    result = {
        "overrides": overrides,
        "loss_head": loss_head,
        "device": str(device),
        "dtype": str(trainer.dtype).removeprefix("torch."),
        "compile": trainer.settings.system.compile,
        "threads": torch.get_num_threads(),
        "tokens_per_step": tokens_per_step,
        "warmup_steps": warmup,
        "timed_steps": len(timed),
        "tok_per_sec": tok_per_sec,
        "tok_per_sec_at_median_step": tokens_per_step / statistics.median(timed),
        "step_s": {"p10": percentile(timed, 0.1), "p50": percentile(timed, 0.5), "p90": percentile(timed, 0.9)},
        "step_s_max": max(timed),
        "first_step_s": dts[0],
        "startup_s": startup_s,
        "flops_per_token": trainer.flops_per_token,
        "model_flops_per_sec": flops_per_sec,
        "matmul_peak_flops": peaks,
        "mfu_percent_vs_measured": {name: 100 * flops_per_sec / peak for name, peak in peaks.items()},
        "trainer_peak_flops": trainer.peak_flops,
        "mfu_percent": 100 * flops_per_sec / trainer.peak_flops if trainer.peak_flops else None,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
        "minor_faults_per_step": (usage.ru_minflt - usage_before.ru_minflt) / len(timed),
        "system_cpu_s_per_step": (usage.ru_stime - usage_before.ru_stime) / len(timed),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    if device.type == "cuda":
        result["cuda_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


PEAK_DTYPES = (torch.float32, torch.bfloat16)


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def describe_run(r: dict) -> str:
    peaks = r["matmul_peak_flops"]
    rows = [
        ("config", " ".join(r["overrides"]) or "(defaults)"),
        ("loss head", r["loss_head"]),
        ("device / dtype / compile", f"{r['device']} / {r['dtype']} / {r['compile']} on {r['threads']} threads"),
        ("tok/s", f"{r['tok_per_sec']:,.0f} (at the median step: {r['tok_per_sec_at_median_step']:,.0f})"),
        (
            "step time p10 / p50 / p90 / max",
            " / ".join(f"{1000 * r['step_s'][q]:.1f}" for q in ("p10", "p50", "p90"))
            + f" / {1000 * r['step_s_max']:.1f} ms"
            f" over {r['timed_steps']} steps after {r['warmup_steps']} warm-up",
        ),
        ("first step / start-up", f"{r['first_step_s']:.2f} s / {r['startup_s']:.2f} s"),
        ("model FLOP/s", f"{r['model_flops_per_sec'] / 1e9:,.2f} GFLOP/s ({r['flops_per_token']:.3e} FLOPs per token)"),
        (
            "matmul peak fp32 / bf16",
            f"{peaks['float32'] / 1e9:,.1f} / {peaks['bfloat16'] / 1e9:,.1f} GFLOP/s (measured in this process)",
        ),
        (
            "MFU vs fp32 / bf16 peak",
            f"{r['mfu_percent_vs_measured']['float32']:.1f}% / {r['mfu_percent_vs_measured']['bfloat16']:.1f}%",
        ),
        ("MFU as the trainer logs it", "n/a" if r["mfu_percent"] is None else f"{r['mfu_percent']:.1f}%"),
        ("peak RSS", f"{r['peak_rss_mib']:,.0f} MiB"),
        (
            "minor faults / sys CPU per step",
            f"{r['minor_faults_per_step']:,.0f} / {1000 * r['system_cpu_s_per_step']:.0f} ms",
        ),
        ("loss first / last", f"{r['first_loss']:.4f} / {r['last_loss']:.4f}"),
    ]
    if "cuda_max_memory_allocated_mib" in r:
        rows.append(("CUDA max memory allocated", f"{r['cuda_max_memory_allocated_mib']:,.0f} MiB"))
    return table(rows)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition(":")
    if not sep or not name.strip():
        sys.exit(f'--variant {text!r} must read "name: override override ..."')
    return name.strip(), shlex.split(overrides)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def compare(variants: list[tuple[str, list[str]]], common: list[str], args) -> dict:
    """Each variant in a fresh process per round, interleaved; medians and ratios."""
    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"load average before: {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="train_throughput_compare_") as scratch:
        for round_index in range(args.rounds):
            shift = round_index % len(variants)
            for name, overrides in variants[shift:] + variants[:shift]:
                out = Path(scratch) / f"{name}_{round_index}.json"
                command = [sys.executable, __file__, "--steps", str(args.steps), "--warmup", str(args.warmup)]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                options = [o for o in overrides if o.startswith("--")]  # e.g. --loss-head=plain
                settings = [o for o in overrides if not o.startswith("--")]
                command += [*options, "--json", str(out), "--", *common, *settings]
                done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(
                        f"variant {name} failed (exit code {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
                    )
                results[name].append(json.loads(out.read_text()))
                print(f"round {round_index + 1} {name}: {results[name][-1]['tok_per_sec']:,.0f} tok/s", flush=True)
    print(f"load average after: {load_average()}")
    summary = {}
    baseline = None
    for name, runs in results.items():
        median = statistics.median(r["tok_per_sec"] for r in runs)
        baseline = baseline or median
        summary[name] = {
            "tok_per_sec_median": median,
            "tok_per_sec_rounds": [r["tok_per_sec"] for r in runs],
            "ratio_to_first": median / baseline,
            "mfu_vs_fp32_peak_median": statistics.median(r["mfu_percent_vs_measured"]["float32"] for r in runs),
            "step_p50_ms_median": 1000 * statistics.median(r["step_s"]["p50"] for r in runs),
            "first_step_s_median": statistics.median(r["first_step_s"] for r in runs),
            "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in runs),
            "minor_faults_per_step_median": statistics.median(r["minor_faults_per_step"] for r in runs),
            "dtype": runs[0]["dtype"],
            "overrides": dict(variants)[name],
        }
    width = max(len(name) for name in summary)
    print(
        f"\n{'variant':<{width}}  {'tok/s (median)':>14}  {'ratio':>6}  {'MFU fp32':>8}  {'first step':>10}  "
        f"{'peak RSS':>9}  {'faults/step':>11}  rounds"
    )
    for name, s in summary.items():
        rounds = ", ".join(f"{v:,.0f}" for v in s["tok_per_sec_rounds"])
        print(
            f"{name:<{width}}  {s['tok_per_sec_median']:>14,.0f}  {s['ratio_to_first']:>6.3f}  "
            f"{s['mfu_vs_fp32_peak_median']:>7.1f}%  {s['first_step_s_median']:>9.1f}s  "
            f"{s['peak_rss_mib_median']:>6,.0f}MiB  {s['minor_faults_per_step_median']:>11,.0f}  {rounds}"
        )
    return {"common_overrides": common, "rounds": args.rounds, "variants": summary, "runs": results}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model=d12 system.compile=true")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--variant", action="append", default=[], help='"name: overrides"; two or more compare')
    parser.add_argument("--rounds", type=int, default=3, help="rounds of interleaved variants (default 3)")
    parser.add_argument("--loss-head", choices=["chunked", "plain"], default="chunked", help="see above")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here instead of printing it")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        sys.exit("--steps and --warmup must be at least 1")
    if args.variant:
        if len(args.variant) < 2:
            sys.exit("--variant needs at least two variants to compare")
        result = compare([parse_variant(v) for v in args.variant], args.overrides, args)
    else:
        result = measure(args.overrides, args.steps, args.warmup, args.threads, args.loss_head)
        print(describe_run(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    else:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
