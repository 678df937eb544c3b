"""Benchmark: save and load time of a full d12 training checkpoint on this machine.

    python tests/benchmarks/checkpoint_save_load.py [--depth 12] [--repeats 3]

Builds nanochat's d12 (vocab 65,536) with the adamw_muon optimizers, takes one step so that every
optimizer state exists (AdamW moments, Muon momentum buffers), then times save_checkpoint (with its
fsyncs) and load_checkpoint, printing the median of the repeats and the checkpoint's size.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nanochat.checkpoint import load_checkpoint, save_checkpoint
from nanochat.config import build, compose_cli
from nanochat.model import GPT


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    width = 64 * args.depth
    heads = -(-width // 128)
    model = GPT(sequence_len=64, vocab_size=65536, n_layer=args.depth, n_head=heads, n_kv_head=heads, n_embd=width)
    optimizers = build("optimizer", compose_cli(["optimizer=adamw_muon"]).optimizer)(model)
    model(torch.randint(0, 65536, (1, 64)), torch.randint(0, 65536, (1, 64))).backward()
    for optimizer in optimizers:
        optimizer.step()
    payload = {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers]}

    save_times, load_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for step in range(args.repeats):
            start = time.perf_counter()
            path = save_checkpoint(Path(tmp), step, payload, {"config": {}}, keep_last=2)
            save_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_checkpoint(path)
            load_times.append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in path.iterdir())
    print(
        f"d{args.depth} checkpoint ({model.num_params():,} params, {size / 2**30:.2f} GiB): "
        f"save {statistics.median(save_times):.2f} s, load {statistics.median(load_times):.2f} s "
        f"(median of {args.repeats}, CPU, {torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
