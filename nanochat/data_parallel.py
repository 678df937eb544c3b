"""The part of an optimizer step after backward(), across data-parallel ranks.

Every rank has run forward and backward on its own micro-batches and holds the full weights and
its local gradients. Then:

    synchronise gradients -> global grad norm (clip) -> optimizer step -> (sharded) gather weights

ReplicatedOptimizers (plain DDP; system.shard_optimizer=false, and any single process)
    all-reduces (averages) every gradient; every rank steps every parameter and keeps the full
    optimizer state.

ShardedOptimizers (ZeRO-2, as nanochat's DistAdamW / DistMuon; system.shard_optimizer=true)
    each rank owns part of the model and keeps optimizer state and reduced gradients only for that
    part:
    - elementwise optimizers (AdamW, ...) own a 1/W slice of rows of every parameter: gradients are
      reduce-scattered, each rank updates its slice (a view into the weight), then the slices are
      all-gathered back into the full weight;
    - Muon orthogonalises whole matrices, so each matrix belongs to one rank (balanced by size), as
      does any parameter whose row count W does not divide: its gradient is reduced onto the owner,
      which updates it and broadcasts it.
    Per rank, optimizer state is ~1/W of the replicated state. The traffic per step equals an
    all-reduce's: a ring all-reduce of N bytes sends 2 N (W-1)/W per rank, a reduce-scatter plus an
    all-gather (or a reduce plus a broadcast) N (W-1)/W each.

Both average gradients over ranks, so a step equals a single process's step on the union of the
ranks' micro-batches (up to float rounding). The optimizers come from nanochat/optim.py unchanged;
sharding only re-points their param groups at the shards this rank owns.
"""

from collections.abc import Sequence

import torch
import torch.distributed as dist

from nanochat.distributed import all_reduce_sum_
from nanochat.optim import load_state_keeping_hyperparameters

# Optimizers whose update of each element depends only on that element's gradient and state, so
# any slice of a parameter can be stepped on its own.
ELEMENTWISE = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _grad_norm(grads: list[torch.Tensor], sum_over_ranks: bool, device: torch.device) -> torch.Tensor:
    """The L2 norm of all gradients (of every rank's, when each rank holds a disjoint part)."""
    squares = torch.zeros((), dtype=torch.float32, device=device)
    if grads:
        squares = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
    if sum_over_ranks:
        all_reduce_sum_(squares)
    return squares.sqrt()


def _clip_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale so the global norm is at most max_norm (torch.nn.utils.clip_grad_norm_'s formula)."""
    if max_norm > 0 and grads:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))


def shards_state(shard_optimizer: bool, world_size: int) -> bool:
    """Whether a run keeps sharded optimizer state: ZeRO-2 only pays off with several ranks, so a
    single process keeps whole-model optimizers whatever system.shard_optimizer says."""
    return shard_optimizer and world_size > 1


def optimizer_state_bytes(optimizers: Sequence[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor held in the optimizers' state on this rank."""
    return sum(
        value.numel() * value.element_size()
        for optimizer in optimizers
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


class ReplicatedOptimizers:
    sharded = False

    def __init__(self, optimizers: list[torch.optim.Optimizer], world_size: int = 1):
        self.optimizers = optimizers
        self.world_size = world_size
        self.params = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
        self.device = self.params[0].device

    def sync_gradients(self) -> None:
        """Average every gradient over the ranks."""
        if self.world_size == 1:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        for work in [dist.all_reduce(g, async_op=True) for g in grads]:
            work.wait()
        torch._foreach_div_(grads, self.world_size)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global grad norm before clipping; clipped to max_norm when max_norm > 0."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = _grad_norm(grads, sum_over_ranks=False, device=self.device)
        _clip_(grads, norm, max_norm)
        return norm

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> list[dict]:
        return [optimizer.state_dict() for optimizer in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        """The saved moments and buffers, under the hyperparameters these optimizers were built with."""
        for optimizer, state in zip(self.optimizers, states, strict=True):
            load_state_keeping_hyperparameters(optimizer, state)


class ShardedOptimizers(ReplicatedOptimizers):
    sharded = True

    def __init__(self, optimizers: list[torch.optim.Optimizer], rank: int, world_size: int):
        """optimizers: freshly built over the full model (no state yet); their param groups are
        re-pointed at this rank's shards."""
        super().__init__(optimizers, world_size)
        self.rank = rank
        self.sliced: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []  # (full weight, my row slice)
        self.owners = assign_owners(optimizers, world_size)  # full weight -> its rank, for the rest
        for optimizer in optimizers:
            if optimizer.state:
                raise ValueError("shard optimizers before their first step: they already hold state")
            for group in optimizer.param_groups:
                mine = []
                for p in group["params"]:
                    if p in self.owners:
                        if self.owners[p] == rank:
                            mine.append(p)
                        continue
                    rows = p.size(0) // world_size
                    # A view of this rank's rows: stepping it updates the weight in place.
                    shard = torch.nn.Parameter(p.detach().narrow(0, rank * rows, rows))
                    self.sliced.append((p, shard))
                    mine.append(shard)
                group["params"] = mine

    def sync_gradients(self) -> None:
        """Sum each gradient onto what this rank owns (and average); drop the rest."""
        works = []
        for full, shard in self.sliced:
            shard.grad = torch.empty_like(shard)
            works.append(_reduce_scatter(shard.grad, full.grad, async_op=True))
        for p, owner in self.owners.items():
            works.append(dist.reduce(p.grad, dst=owner, async_op=True))
        for work in works:
            work.wait()
        for full, _ in self.sliced:
            full.grad = None
        for p, owner in self.owners.items():
            if owner != self.rank:
                p.grad = None  # what a non-owner holds after a reduce is undefined
        torch._foreach_div_(self._owned_grads(), self.world_size)

    def _owned_grads(self) -> list[torch.Tensor]:
        return [shard.grad for _, shard in self.sliced] + [
            p.grad for p, owner in self.owners.items() if owner == self.rank
        ]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        grads = self._owned_grads()
        norm = _grad_norm(grads, sum_over_ranks=True, device=self.device)  # the ranks hold disjoint parts
        _clip_(grads, norm, max_norm)
        return norm

    def step(self) -> None:
        super().step()
        works = [_all_gather(full.detach(), shard.detach(), async_op=True) for full, shard in self.sliced]
        works += [dist.broadcast(p.detach(), src=owner, async_op=True) for p, owner in self.owners.items()]
        for work in works:
            work.wait()

    def zero_grad(self) -> None:
        super().zero_grad()
        for _, shard in self.sliced:
            shard.grad = None


def assign_owners(optimizers: Sequence[torch.optim.Optimizer], world_size: int) -> dict[torch.nn.Parameter, int]:
    """The rank that owns each parameter that cannot be split into row slices: Muon's matrices
    (orthogonalised whole) and parameters whose row count world_size does not divide. Largest first,
    each to the rank owning the fewest elements so far, so ranks hold about equal state."""
    whole = [
        p
        for optimizer in optimizers
        for group in optimizer.param_groups
        for p in group["params"]
        if not isinstance(optimizer, ELEMENTWISE) or p.size(0) % world_size != 0
    ]
    load = [0] * world_size
    owner_of = {}
    for p in sorted(whole, key=lambda p: -p.numel()):  # stable: the same order on every rank
        owner_of[id(p)] = min(range(world_size), key=lambda r: (load[r], r))
        load[owner_of[id(p)]] += p.numel()
    return {p: owner_of[id(p)] for p in whole}
