"""Two-rank runs from joining the process group to leaving it, as train.py lives them: a model
built on the meta device, sharded AdamW + Muon steps with their collectives, an evaluation's
all-reduce, then shutdown() and the interpreter's own exit.

    python tests/teardown_probe.py                      # one rank, as torchrun starts it
    python tests/teardown_probe.py --launches 30        # 30 two-rank launches, two at a time

Each rank prints which of the process group's threads are left after shutdown(). With
--launches, this process imports torch once and forks the ranks of every launch (a rank is a
real process that exits through interpreter finalization, where a torn-down Gloo thread would
abort it); it prints each rank's exit status and fails if any rank did not exit 0.
"""

import argparse
import importlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nanochat.data_parallel import ShardedOptimizers
from nanochat.distributed import all_reduce_sum_, init_from_env, rank, shutdown, world_size
from nanochat.model import GPT
from nanochat.optim import adamw_muon

CONF = Path(__file__).resolve().parents[1] / "conf"


def gloo_threads() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        except FileNotFoundError:  # the thread ended between the listing and the read
            continue
    return sorted(name for name in names if "gloo" in name)


def gloo_threads_left(bound_s: float = 2.0) -> list[str]:
    """The gloo threads still there after shutdown(). pthread_join returns once the kernel has
    cleared the thread's id, a moment before it drops the thread from /proc/self/task (on this
    machine about 1 joined thread in 100 is still listed right after the join), so a joined
    thread may be seen once; this looks again until the listing is empty, for at most bound_s.
    A thread that was not joined lives until the interpreter exits, far past the bound."""
    deadline = time.monotonic() + bound_s
    while (left := gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def run_rank() -> None:
    init_from_env()
    with torch.device("meta"):
        model = GPT(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model.to_empty(device="cpu")
    model.init_weights()
    yaml = OmegaConf.to_container(OmegaConf.load(CONF / "optimizer" / "adamw_muon.yaml"))
    optimizers = ShardedOptimizers(
        adamw_muon(model, **{k: v for k, v in yaml.items() if not k.startswith("_")}), rank(), world_size()
    )
    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(rank()))
    for _ in range(3):
        model(tokens, tokens).backward()
        optimizers.sync_gradients()
        optimizers.clip_grad_norm_(1.0)
        optimizers.step()
        optimizers.zero_grad()
    loss = model(tokens, tokens).detach()
    all_reduce_sum_(loss)
    me, before = rank(), gloo_threads()
    shutdown(finished=True)
    print(f"rank {me}: gloo threads before shutdown {before}, after {gloo_threads_left()}", flush=True)


def fork_rank(rank_: int, port: int) -> int:
    pid = os.fork()
    if pid == 0:  # the rank: runs, then leaves through the interpreter's normal exit
        os.environ.update(RANK=str(rank_), LOCAL_RANK=str(rank_), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        raise SystemExit(run_rank())
    return pid


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


def launch_many(launches: int, at_once: int) -> int:
    importlib.import_module("torch._dynamo")  # what init_from_env imports, once here for all the ranks
    torch.set_num_threads(1)  # as torchrun gives each rank; and no thread pool exists before the forks
    failures = 0
    for first in range(0, launches, at_once):
        pids = [
            fork_rank(r, port) for port in [free_port() for _ in range(min(at_once, launches - first))] for r in (0, 1)
        ]
        for pid in pids:
            outcome = describe(os.waitpid(pid, 0)[1])
            failures += outcome != "exit 0"
            print(f"launch rank pid {pid}: {outcome}", flush=True)
    print(f"{launches} launches, {failures} rank(s) did not exit 0", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--launches", type=int, default=0)
    parser.add_argument("--at-once", type=int, default=2)
    args = parser.parse_args()
    sys.exit(launch_many(args.launches, args.at_once) if args.launches else run_rank())
