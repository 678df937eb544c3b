"""Benchmark: this project against nanochat's classic base_train at one config, side by side.

    python tests/benchmarks/vs_nanochat.py --nanochat /path/to/nanochat --nanochat-python /path/to/venv/bin/python
        [--rounds 3] [--steps 20] [--warmup 5] [--threads N] [--variants ...]

nanochat is not part of this project and nothing of it is copied here: point --nanochat at a
checkout of its classic version (commit 10231df) with a Python environment of its own:

    git clone https://github.com/karpathy/nanochat /path/to/nanochat
    git -C /path/to/nanochat checkout 10231df
    python3.11 -m venv /path/to/nanochat/.venv
    /path/to/nanochat/.venv/bin/pip install torch==2.13.0 numpy tiktoken tokenizers rustbpe==0.1.0 \\
        pyarrow wandb psutil filelock jinja2 requests pyyaml regex
    # (its rustbpe/ crate and PyPI's rustbpe 0.1.0 are the same trainer; the pip line above avoids
    # building it with maturin. Install the CPU build of torch on a CPU machine.)

The config (--depth 4: 4 layers, 256 wide, 2 heads of 128; 256 tokens of context; one micro-batch
of 8 sequences = 2,048 tokens per step; the same 4,096-token BPE trained on the same text; AdamW for
embedding and lm_head, Muon for the block matrices, nanochat's learning rates; fp32, as both run on
a CPU without autocast) is the same architecture on both sides:

    nanochat:  python -m scripts.base_train --depth=4 --max_seq_len=256 --device_batch_size=8
               --total_batch_size=2048 --device_type=cpu --num_iterations=<warmup+steps>
               --eval_every=100000 --eval_tokens=2048 --core_metric_every=-1 --sample_every=100000
    project:   tests/benchmarks/train_throughput.py optimizer=adamw_muon system.dtype=float32
               (conf's d4 is nanochat's depth-4 model; trainer defaults give 8 x 256 per step)

nanochat's base_train always calls torch.compile (its Newton-Schulz function too): its eager runs
set TORCHDYNAMO_DISABLE=1, which turns every torch.compile into a no-op. nanochat runs Muon's
Newton-Schulz in bf16 on every device; the project's `equal` variants do the same
(optimizer.ns_dtype=bfloat16), with the project's way of multiplying bf16 matrices
(optimizer.ns_bf16_matmul=auto: on a CPU without native bf16, fp32 GEMMs of the bf16 operands,
the same arithmetic); the `native` ones pin torch's bf16 GEMM as nanochat runs it; the `best` ones
take the project's measured choices (ns_dtype=auto, system.dtype=auto). Both sides read the same data: this script copies the project's Shakespeare
shards (train shards, then the validation shard last, as nanochat's dataset expects) into a
nanochat base dir under --work-dir and trains nanochat's tokenizer on them with its
scripts/tok_train.py (--vocab_size=4096).

Timing on both sides: the wall time of each optimizer step as the trainer itself measures it
(nanochat's printed `dt`, the project's train/dt), the first --warmup steps left out; tok/s =
tokens per step x timed steps / summed step time. Each variant runs in a fresh process, variants
interleaved round by round (rotated each round); the table gives medians over rounds and ratios
to nanochat's run of the same compile mode.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
THROUGHPUT = REPO / "tests" / "benchmarks" / "train_throughput.py"
STEP_LINE = re.compile(r"^step (\d+)/\d+ .*\| dt: ([\d.]+)ms", re.MULTILINE)
TOKENS_PER_STEP = 8 * 256
PROJECT = {
    "equal": ["optimizer=adamw_muon", "system.dtype=float32", "optimizer.ns_dtype=bfloat16"],
    "native": [
        "optimizer=adamw_muon",
        "system.dtype=float32",
        "optimizer.ns_dtype=bfloat16",
        "optimizer.ns_bf16_matmul=native",
    ],
    "best": ["optimizer=adamw_muon", "system.dtype=auto", "optimizer.ns_dtype=auto"],
}
VARIANTS = {
    "nanochat eager": ("nanochat", False, None),
    "nanochat compiled": ("nanochat", True, None),
    "project equal eager": ("project", False, "equal"),
    "project equal compiled": ("project", True, "equal"),
    "project native eager": ("project", False, "native"),
    "project native compiled": ("project", True, "native"),
    "project best eager": ("project", False, "best"),
    "project best compiled": ("project", True, "best"),
}


def prepare_nanochat(args, base_dir: Path) -> None:
    """nanochat's base dir: the project's Shakespeare shards and a tokenizer trained by nanochat."""
    shards = base_dir / "base_data"
    if (base_dir / "tokenizer" / "tokenizer.pkl").exists():
        return
    shards.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir)
    files = sorted((data_dir / "train").glob("shard_*.parquet")) + sorted((data_dir / "val").glob("shard_*.parquet"))
    if not files:
        sys.exit(f"no shards under {data_dir}: run `python train.py data.data_dir={data_dir}` once first")
    for index, path in enumerate(files):
        shutil.copy(path, shards / f"shard_{index:05d}.parquet")
    subprocess.run(
        [args.nanochat_python, "-m", "scripts.tok_train", "--vocab_size=4096", "--doc_cap=10000"],
        cwd=args.nanochat,
        env={**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)},
        check=True,
    )


def run_nanochat(args, compiled: bool, base_dir: Path, env: dict) -> list[float]:
    steps = args.warmup + args.steps
    command = [
        args.nanochat_python, "-m", "scripts.base_train", "--depth=4", "--max_seq_len=256",
        "--device_batch_size=8", f"--total_batch_size={TOKENS_PER_STEP}", "--device_type=cpu",
        f"--num_iterations={steps}", "--eval_every=100000", "--eval_tokens=2048",
        "--core_metric_every=-1", "--sample_every=100000",
    ]  # fmt: skip
    env = {**env, "NANOCHAT_BASE_DIR": str(base_dir)}
    if not compiled:
        env["TORCHDYNAMO_DISABLE"] = "1"
    done = subprocess.run(command, cwd=args.nanochat, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"nanochat failed (exit code {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    dts = [float(ms) / 1000 for step, ms in STEP_LINE.findall(done.stdout) if int(step) >= args.warmup]
    if len(dts) != args.steps:
        sys.exit(f"found {len(dts)} timed nanochat steps, expected {args.steps}:\n{done.stdout[-3000:]}")
    return dts


def run_project(args, compiled: bool, settings: str, env: dict, scratch: Path) -> dict:
    out = scratch / "project.json"
    command = [sys.executable, str(THROUGHPUT), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    command += ["--json", str(out), "--", f"data.data_dir={args.data_dir}", f"system.compile={str(compiled).lower()}"]
    done = subprocess.run([*command, *PROJECT[settings]], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"project run failed (exit code {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanochat", type=Path, required=True, help="a checkout of nanochat at 10231df")
    parser.add_argument("--nanochat-python", required=True, help="the Python of nanochat's environment")
    parser.add_argument("--data-dir", default=str(Path.home() / ".cache" / "nanochat-hydra" / "shakespeare"))
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "vs_nanochat")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: one per core)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    base_dir = args.work_dir / "nanochat_base"
    prepare_nanochat(args, base_dir)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results: dict[str, list[float]] = {name: [] for name in args.variants}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            shift = round_index % len(args.variants)
            for name in args.variants[shift:] + args.variants[:shift]:
                side, compiled, settings = VARIANTS[name]
                if side == "nanochat":
                    dts = run_nanochat(args, compiled, base_dir, env)
                    tok_per_sec = TOKENS_PER_STEP * len(dts) / sum(dts)
                else:
                    tok_per_sec = run_project(args, compiled, settings, env, Path(scratch))["tok_per_sec"]
                results[name].append(tok_per_sec)
                print(f"round {round_index + 1} {name}: {tok_per_sec:,.0f} tok/s", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    medians = {name: statistics.median(values) for name, values in results.items()}
    width = max(map(len, medians))
    print(f"\n{'variant':<{width}}  {'tok/s (median)':>14}  {'vs nanochat':>11}  rounds")
    for name, median in medians.items():
        reference = medians.get("nanochat compiled" if VARIANTS[name][1] else "nanochat eager")
        ratio = f"{median / reference:.2f}x" if reference else "n/a"
        rounds = ", ".join(f"{v:,.0f}" for v in results[name])
        print(f"{name:<{width}}  {median:>14,.0f}  {ratio:>11}  {rounds}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": results, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
