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

Checkpoints hold each layout's own state (the full state once, or each rank's shard). A run
resumed on another number of ranks, or with sharding switched, converts what was saved into the
full state of every parameter (AdamW rows concatenated back, each Muon matrix's buffer from its
owner) and takes its own part of it: see full_state() and load_full_state().
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


def _full_params(optimizers: Sequence[torch.optim.Optimizer]) -> list[list[torch.nn.Parameter]]:
    """Each optimizer's parameters in state_dict index order (groups in order, params in order)."""
    return [[p for group in optimizer.param_groups for p in group["params"]] for optimizer in optimizers]


def _shard_layout(
    optimizers: Sequence[torch.optim.Optimizer], full: list[list[torch.nn.Parameter]], world_size: int
) -> list[list[list[tuple[int, bool]]]]:
    """For each rank, each optimizer: the (full param index, is a row slice) of its shard's params,
    in the shard's state_dict index order. The same rule ShardedOptimizers re-points groups by."""
    elementwise = [isinstance(optimizer, ELEMENTWISE) for optimizer in optimizers]
    owners = _owners(elementwise, full, world_size)
    layout = [[[] for _ in optimizers] for _ in range(world_size)]
    for o, params in enumerate(full):
        for i, p in enumerate(params):
            for r in range(world_size):
                if id(p) not in owners:
                    layout[r][o].append((i, True))
                elif owners[id(p)] == r:
                    layout[r][o].append((i, False))
    return layout


def _state_by_param(state: dict) -> dict[int, dict]:
    return {int(index): values for index, values in state["state"].items()}


def _state_dict(optimizer: torch.optim.Optimizer, per_param: dict[int, dict]) -> dict:
    """A state_dict for optimizer holding per_param (index -> its state), with the optimizer's own groups."""
    return {"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]}


class ReplicatedOptimizers:
    sharded = False

    def __init__(self, optimizers: list[torch.optim.Optimizer], world_size: int = 1):
        self.optimizers = optimizers
        self.world_size = world_size
        self.full = _full_params(optimizers)
        self.params = [p for params in self.full for p in params]
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

    def full_state(self, saved: list, world_size: int, sharded: bool) -> list[dict[int, dict]]:
        """Each optimizer's state per full param index, from a checkpoint's optimizer state: one
        state_dict list (replicated), or one per rank (sharded over world_size ranks)."""
        if not sharded:
            return [_state_by_param(state) for state in saved]
        layout = _shard_layout(self.optimizers, self.full, world_size)
        full: list[dict[int, dict]] = [{} for _ in self.optimizers]
        for o in range(len(self.optimizers)):
            slices: dict[int, list[dict]] = {}
            for r in range(world_size):
                by_index = _state_by_param(saved[r][o])
                for j, (i, is_slice) in enumerate(layout[r][o]):
                    if j in by_index:
                        if is_slice:
                            slices.setdefault(i, []).append(by_index[j])
                        else:
                            full[o][i] = by_index[j]
            for i, parts in slices.items():
                rows = self.full[o][i].size(0)
                full[o][i] = {
                    key: torch.cat([part[key] for part in parts]) if _rowwise(value, rows // world_size) else value
                    for key, value in parts[0].items()
                }
        return full

    def load_full_state(self, full: list[dict[int, dict]]) -> None:
        """Load full_state()'s result as this layout's own state (see load_state_dict)."""
        self.load_state_dict(
            [_state_dict(opt, per_param) for opt, per_param in zip(self.optimizers, full, strict=True)]
        )


def _rowwise(value, rows: int) -> bool:
    """Whether a state entry is per element of the parameter (split by rows), not a scalar like AdamW's step."""
    return torch.is_tensor(value) and value.ndim >= 1 and value.size(0) == rows


class ShardedOptimizers(ReplicatedOptimizers):
    sharded = True

    def __init__(self, optimizers: list[torch.optim.Optimizer], rank: int, world_size: int):
        """optimizers: freshly built over the full model (no state yet); their param groups are
        re-pointed at this rank's shards."""
        super().__init__(optimizers, world_size)  # self.full: the param lists before re-pointing
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

    def load_full_state(self, full: list[dict[int, dict]]) -> None:
        """This rank's part of every parameter's full state: its rows of AdamW's moments, the Muon
        buffers of the matrices it owns."""
        mine = _shard_layout(self.optimizers, self.full, self.world_size)[self.rank]
        states = []
        for o, optimizer in enumerate(self.optimizers):
            per_param = {}
            for j, (i, is_slice) in enumerate(mine[o]):
                if i not in full[o]:
                    continue
                rows = self.full[o][i].size(0) // self.world_size
                per_param[j] = {
                    key: value.narrow(0, self.rank * rows, rows).clone()
                    if is_slice and _rowwise(value, self.full[o][i].size(0))
                    else value
                    for key, value in full[o][i].items()
                }
            states.append(_state_dict(optimizer, per_param))
        self.load_state_dict(states)


def assign_owners(optimizers: Sequence[torch.optim.Optimizer], world_size: int) -> dict[torch.nn.Parameter, int]:
    """The rank that owns each parameter that cannot be split into row slices: Muon's matrices
    (orthogonalised whole) and parameters whose row count world_size does not divide. Largest first,
    each to the rank owning the fewest elements so far, so ranks hold about equal state."""
    full = _full_params(optimizers)
    owner_of = _owners([isinstance(o, ELEMENTWISE) for o in optimizers], full, world_size)
    return {p: owner_of[id(p)] for params in full for p in params if id(p) in owner_of}


def _owners(elementwise: list[bool], full: list[list[torch.nn.Parameter]], world_size: int) -> dict[int, int]:
    whole = [
        p
        for is_elementwise, params in zip(elementwise, full)
        for p in params
        if not is_elementwise or p.size(0) % world_size
    ]
    load = [0] * world_size
    owner_of = {}
    for p in sorted(whole, key=lambda p: -p.numel()):  # stable: the same order on every rank
        owner_of[id(p)] = min(range(world_size), key=lambda r: (load[r], r))
        load[owner_of[id(p)]] += p.numel()
    return owner_of
