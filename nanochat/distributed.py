"""Running as one of several torchrun processes: the process group, the few collectives the rest
of the code needs, and how ranks agree on success or failure.

torchrun starts one process per device and gives each RANK, LOCAL_RANK, WORLD_SIZE and the
rendezvous address. `init_from_env()` joins the process group before Hydra starts (so that all
ranks can agree on one run dir): NCCL for CUDA tensors, Gloo for CPU tensors. In a plain single
process nothing is initialised and every helper here is a no-op, so single-process training runs
the same code.

Failure rule: a rank must never wait in a collective that another rank will not reach. Setup code
therefore runs in `together()` blocks: a rank that fails inside one still reaches the agreement at
its end, and every rank then stops with the failing rank's message instead of hanging until a
timeout. A rank that dies later, in the training loop, closes its connections; the others' next
collective fails, and `lost_peer()` recognises that error. torchrun also stops the surviving workers
when one exits with an error.
"""

import contextlib
import datetime
import hashlib
import importlib
import json
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from nanochat.errors import UserError

# How long a collective may wait for the slowest rank: rank 0 may be downloading shards or training
# the tokenizer while the others wait for it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE={world} is set but not {', '.join(missing)}: launch multi-process training with "
            "torchrun (e.g. torchrun --standalone --nproc_per_node=2 train.py)."
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"  # CUDA tensors over NCCL; object collectives and CPU tensors over Gloo
    else:
        backend = "gloo"
    # torch._dynamo, once imported (by torch.compile, and by the first operation on the meta device,
    # where models are built), keeps references to the default process group if one exists by then.
    # destroy_process_group() then cannot free it: Gloo's worker threads outlive it and are torn
    # down during interpreter finalization, where they can abort the process (SIGABRT). Imported
    # first, dynamo holds no such reference, and shutdown() really joins those threads.
    importlib.import_module("torch._dynamo")
    # torchrun --max-restarts keeps its store across attempts, with the keys the dead attempt's
    # ranks left there (their Gloo addresses among them): a restarted attempt that read them would
    # connect to processes that no longer exist. Each attempt meets under its own prefix.
    store, rank_, world_ = next(dist.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"nanochat/attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank_, world_size=world_, timeout=COLLECTIVE_TIMEOUT)


def shutdown(finished: bool) -> None:
    """Leave the process group before the interpreter exits: its threads are joined here, not
    during finalization (see init_from_env). finished: this rank ended normally, so all ranks meet
    at a barrier first and leave together, with no collective of theirs still in flight."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def run_as_rank(main: Callable[[], object], preflight: Callable[[], None] = lambda: None) -> None:
    """A command-line entry point, alone or as one torchrun rank: join the process group, run
    preflight (checks every rank makes alike, so a UserError there is said once, by rank 0, and
    exits 2 before any work), run main, and leave the group through shutdown(), with the closing
    barrier only where main ended normally (a rank that stopped with an error must not wait there
    for ranks that may never come)."""
    try:
        init_from_env()
        preflight()
    except UserError as error:
        if is_main():
            report(str(error))
        shutdown(finished=False)
        sys.exit(2)
    try:
        main()
    except SystemExit as exit_request:  # also a mistake (exit 2) and a run stopped by a signal (exit 0)
        shutdown(finished=exit_request.code in (0, None))
        raise
    shutdown(finished=True)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all ranks, in place."""
    if dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor)


def broadcast_(tensors, src: int = 0) -> None:
    """Overwrite each tensor with rank src's values, in place (not recorded by autograd)."""
    if dist.is_initialized():
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor, src)


def broadcast_object(obj, src: int = 0):
    """Rank src's obj, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's obj, in rank order."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def launch_command() -> list[str]:
    """How this run was started, for the resume hint: python, or torchrun with its process counts."""
    if world_size() == 1:
        return ["python"]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    nodes = world_size() // per_node
    if nodes == 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={per_node}"]
    return ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={per_node}", "--rdzv_endpoint=<host:port>"]


def report(message: str) -> None:
    """An error as one line on stderr; under torchrun it names the rank."""
    where = f"[rank {rank()}] " if world_size() > 1 else ""
    print(f"error: {where}{message}", file=sys.stderr)


class RankFailed(UserError):
    """Another rank's failure, raised on the ranks that did not fail themselves. Rank 0 prints it;
    the failing rank prints its own error."""


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def together(what: str):
    """Run a block on every rank and agree on how it went: if it raised on any rank, every rank raises.

    The block must not contain collectives (a failed rank would skip them). A rank whose own error
    is also rank 0's raises RankFailed, so that one message is printed once, not once per rank.
    """
    if not dist.is_initialized():
        yield
        return
    error = None
    try:
        yield
    except Exception as raised:  # reported to every rank below, then re-raised here
        error = raised
    messages = all_gather_object(None if error is None else _describe(error))
    if error is not None:
        if not is_main() and messages[0] == messages[rank()]:
            raise RankFailed(messages[0]) from error
        raise error
    failed = [(r, message) for r, message in enumerate(messages) if message is not None]
    if failed:
        first, message = failed[0]
        raise RankFailed(f"rank {first} failed while {what}: {message}")


def main_first(what: str, work):
    """work() on rank 0, then on the first rank of every other node, then on the rest: the first run
    downloads or builds what the later ones find ready (data shards, the tokenizer), whether the
    nodes share a filesystem or each has its own. Returns work()'s result on every rank."""
    result = None
    turns = (is_main(), not is_main() and local_rank() == 0, local_rank() != 0)
    for my_turn in turns:
        with together(what):
            if my_turn:
                result = work()
    return result


def config_fingerprint(resolved: dict) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_config(resolved: dict) -> None:
    """Refuse to train when ranks were launched with different configs (e.g. nodes started with
    different overrides): name the first key that differs, with rank 0's value and the other's."""
    fingerprints = all_gather_object(config_fingerprint(resolved))
    if len(set(fingerprints)) == 1:
        return
    configs = all_gather_object(resolved)
    other = next(r for r, fingerprint in enumerate(fingerprints) if fingerprint != fingerprints[0])
    key, ours, theirs = _first_difference(configs[0], configs[other])
    message = (
        f"the ranks were launched with different configs: {key} is {ours!r} on rank 0 and {theirs!r} on rank "
        f"{other}; launch every node with the same overrides."
    )
    raise (UserError if is_main() else RankFailed)(message)


def _first_difference(a, b, prefix: str = "") -> tuple[str, object, object]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip("."), a, b


def lost_peer(error: BaseException) -> bool:
    """Whether error is a collective failing because another rank went away."""
    if isinstance(error, dist.DistError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in message for sign in ("Connection closed by peer", "Connection reset by peer", "NCCL error")
    )
