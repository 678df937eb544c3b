"""ZeRO-2 sharded optimizers against plain data parallelism, in two Gloo processes on the CPU."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from configs import build_optimizers

from nanochat.data_parallel import ReplicatedOptimizers, ShardedOptimizers, assign_owners, optimizer_state_bytes
from nanochat.model import GPT, GPTConfig

RECIPES = ["adamw", "adamw_muon"]
# Each spawned rank builds its own Muon here, so ns_dtype=auto would be measured (and could be
# decided) per rank; train.py decides it once for all ranks (nanochat/assemble.py). Fixed here.
PINNED = {"adamw": {}, "adamw_muon": {"ns_dtype": "float32"}}
WORLD = 2
STEPS = 3


def tiny_model() -> GPT:
    torch.manual_seed(0)
    model = GPT.from_config(GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128))
    model.init_weights()
    return model


def step_both_ways(rank: int, init_file: str, optimizer: str, results: str) -> None:
    """One replicated and one sharded copy of the model take the same steps on this rank's
    gradients (different on each rank); what each ends with is saved for the test to compare."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    replicated_model = tiny_model()
    sharded_model = copy.deepcopy(replicated_model)
    replicated = ReplicatedOptimizers(build_optimizers(replicated_model, optimizer, **PINNED[optimizer]), WORLD)
    sharded = ShardedOptimizers(build_optimizers(sharded_model, optimizer, **PINNED[optimizer]), rank, WORLD)
    norms = []
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(1000 * step + rank)
        for a, b in zip(replicated_model.parameters(), sharded_model.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=generator) * 1e-2
            b.grad = a.grad.clone()
        step_norms = []
        for optimizers in (replicated, sharded):
            optimizers.sync_gradients()
            step_norms.append(optimizers.clip_grad_norm_(max_norm=0.5).item())
            optimizers.step()
            optimizers.zero_grad()
        norms.append(step_norms)
    torch.save(
        {
            "replicated": replicated_model.state_dict(),
            "sharded": sharded_model.state_dict(),
            "norms": norms,
            "replicated_state_bytes": optimizer_state_bytes(replicated.optimizers),
            "sharded_state_bytes": optimizer_state_bytes(sharded.optimizers),
        },
        f"{results}/rank{rank}.pt",
    )
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=RECIPES)
def outcome(request, tmp_path_factory) -> list[dict]:
    """What each of the two ranks ended with, for one optimizer recipe."""
    results = tmp_path_factory.mktemp(f"zero_{request.param}")
    mp.spawn(step_both_ways, args=(str(results / "rendezvous"), request.param, str(results)), nprocs=WORLD)
    return [torch.load(results / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow  # spawns two processes
def test_sharded_steps_give_every_rank_the_weights_of_replicated_steps(outcome):
    for rank_outcome in outcome:
        for name, weight in rank_outcome["replicated"].items():
            torch.testing.assert_close(rank_outcome["sharded"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    for name, weight in outcome[0]["sharded"].items():
        assert torch.equal(weight, outcome[1]["sharded"][name]), f"ranks disagree on {name} after the all-gather"


@pytest.mark.slow  # spawns two processes
def test_sharded_grad_norm_is_the_global_norm_on_every_rank(outcome):
    for step in range(STEPS):
        replicated, sharded = outcome[0]["norms"][step]
        assert sharded == pytest.approx(replicated, rel=1e-5)
        assert outcome[1]["norms"][step] == outcome[0]["norms"][step]
        assert replicated > 0.5  # the clipping above did something


@pytest.mark.slow  # spawns two processes
def test_optimizer_state_per_rank_is_about_half_when_sharded_over_two_ranks(outcome):
    replicated = outcome[0]["replicated_state_bytes"]
    assert outcome[1]["replicated_state_bytes"] == replicated
    per_rank = [o["sharded_state_bytes"] for o in outcome]
    print(f"optimizer state per rank: replicated {replicated:,} B, sharded {per_rank} B")
    for sharded in per_rank:
        assert sharded == pytest.approx(replicated / WORLD, rel=0.05)
    # Up to AdamW's scalar step counter kept per shard, the shards add up to the whole.
    assert sum(per_rank) == pytest.approx(replicated, rel=0.01)


def test_muon_matrices_are_owned_whole_and_balanced_across_ranks():
    model = tiny_model()
    adam, muon = build_optimizers(model, "adamw_muon")
    owners = assign_owners([adam, muon], world_size=4)
    matrices = muon.param_groups[0]["params"]
    assert {id(p) for p in owners} == {id(p) for p in matrices}  # AdamW's rows divide by 4: sliced, not owned
    load = [sum(p.numel() for p, owner in owners.items() if owner == r) for r in range(4)]
    assert max(load) - min(load) <= max(p.numel() for p in matrices)


def test_rows_that_do_not_divide_go_to_one_owner():
    odd = torch.nn.Parameter(torch.zeros(3, 4))
    even = torch.nn.Parameter(torch.zeros(4, 4))
    owners = assign_owners([torch.optim.AdamW([odd, even])], world_size=2)
    assert list(owners) == [odd] and owners[odd] in (0, 1)
