"""TokenLoader: the exact token stream, the shift by one, rank striding, determinism, resume."""

import itertools
import json
import random

import pyarrow.parquet as pq
import pytest
import torch

from nanochat.data.corpus import write_shards
from nanochat.data.loader import LaneLoader, Prefetcher, TokenLoader, ValidationRows, merge_lane_states
from nanochat.errors import UserError

B, T = 4, 16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three shards, 14 row groups of up to 8 documents; documents from 1 to ~120 words long."""
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    docs = [f"doc {i}: " + " ".join(rng.choices(words, k=rng.choice([1, 5, 30, 120]))) for i in range(110)]
    return write_shards(docs, tmp_path_factory.mktemp("loader"), docs_per_row_group=8, docs_per_shard=40)


@pytest.fixture(scope="module")
def tok(shakespeare_tokenizer):
    return shakespeare_tokenizer


def _stream(tok, row_groups) -> list[int]:
    """<|bos|> + tokens of every document of the given row groups, in order."""
    stream = []
    for path, index in row_groups:
        for text in pq.ParquetFile(path).read_row_group(index).column("text").to_pylist():
            stream += [tok.bos_id, *tok.encode(text)]
    return stream


def _flat(batches, which: int) -> list[int]:
    return torch.cat([batch[which].reshape(-1) for batch in batches]).tolist()


def test_batches_are_int64_cpu_of_the_right_shape(files, tok):
    inputs, targets = next(TokenLoader(files, tok, B, T))
    for x in (inputs, targets):
        assert x.shape == (B, T) and x.dtype == torch.int64 and x.device.type == "cpu" and x.is_contiguous()


def test_stream_is_bos_plus_documents_shifted_by_one(files, tok):
    loader = TokenLoader(files, tok, B, T, loop=False, shuffle=False)
    batches = list(loader)
    stream = _stream(tok, [(f, g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)])
    n = len(batches) * B * T
    assert len(batches) == (len(stream) - 1) // (B * T)  # only the final partial batch is dropped
    assert _flat(batches, 0) == stream[:n]
    assert _flat(batches, 1) == stream[1 : n + 1]
    for (x, y), (next_x, _) in zip(batches, batches[1:] + [(None, None)]):
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y[:-1, -1], x[1:, 0])  # across row boundaries
        if next_x is not None:
            assert y[-1, -1] == next_x[0, 0]  # across batch boundaries
    with pytest.raises(StopIteration):
        next(loader)


def test_epochs_follow_the_seeded_shuffle(files, tok):
    loader = TokenLoader(files, tok, B, T, seed=3)
    all_pairs = sorted((f, g) for f in files for g in range(pq.ParquetFile(f).num_row_groups))
    orders = [loader.row_groups(epoch) for epoch in range(3)]
    for order in orders:
        assert sorted(order) == all_pairs
    assert orders[0] != orders[1] != orders[2]
    assert orders[0] == TokenLoader(files, tok, B, T, seed=3).row_groups(0)
    assert orders[0] != TokenLoader(files, tok, B, T, seed=4).row_groups(0)
    assert TokenLoader(files, tok, B, T, shuffle=False).row_groups(5) == [(f, g) for f, g in sorted(all_pairs)]

    stream = sum((_stream(tok, order) for order in orders), [])
    n_batches = (len(stream) - 1) // (B * T)
    batches = list(itertools.islice(loader, n_batches))  # runs well into the third epoch
    assert loader.state_dict()["epoch"] == 2
    assert _flat(batches, 0) == stream[: n_batches * B * T]


def test_ranks_read_disjoint_row_groups_covering_everything(files, tok):
    for world_size in (2, 3):
        loaders = [TokenLoader(files, tok, B, T, rank=r, world_size=world_size, loop=False) for r in range(world_size)]
        orders = [loader.row_groups(0) for loader in loaders]
        seen = [pair for order in orders for pair in order]
        assert len(seen) == len(set(seen)) == 14
        assert max(map(len, orders)) - min(map(len, orders)) <= 1
        for loader, order in zip(loaders, orders):
            batches = list(loader)
            assert _flat(batches, 0) == _stream(tok, order)[: len(batches) * B * T]


def test_same_arguments_same_batches(files, tok):
    first = list(itertools.islice(TokenLoader(files, tok, B, T, seed=7), 30))
    second = list(itertools.islice(TokenLoader(files, tok, B, T, seed=7), 30))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))


@pytest.mark.parametrize("skip", [0, 1, 2, 5, 13, 60, 150, 250])
def test_state_dict_resumes_exactly(files, tok, skip):
    loader = TokenLoader(files, tok, 4, 32, seed=1)
    for _ in range(skip):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # plain data survives any serialisation
    expected = list(itertools.islice(loader, 40))
    resumed = TokenLoader(files, tok, 4, 32, seed=1)
    resumed.load_state_dict(state)
    actual = list(itertools.islice(resumed, 40))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, actual))


def test_state_dict_records_positions_inside_a_row_group(files, tok):
    loader = TokenLoader(files, tok, 4, 32, seed=1)
    states = []
    for _ in range(250):
        next(loader)
        states.append(loader.state_dict())
    assert any(s["row_group"] > 0 and s["document"] > 0 for s in states)
    assert states[-1]["epoch"] > 0  # so the resume test's larger skips cross an epoch boundary
    # Between batches only the tail of the last document taken is buffered, never a row group.
    longest_doc = max(len(tok.encode(text)) + 1 for f in files for text in pq.read_table(f)["text"].to_pylist())
    assert max(len(s["buffer"]) for s in states) <= longest_doc


def test_state_from_another_stream_is_rejected(files, tok):
    state = TokenLoader(files, tok, B, T, rank=0, world_size=2).state_dict()
    with pytest.raises(UserError, match="world_size=2"):
        TokenLoader(files, tok, B, T).load_state_dict(state)


def test_empty_file_list_is_a_user_error(tok):
    with pytest.raises(UserError, match="empty list"):
        TokenLoader([], tok, B, T)


def test_more_ranks_than_row_groups_is_a_user_error(files, tok):
    with pytest.raises(UserError, match="world_size=16"):
        TokenLoader(files, tok, B, T, rank=0, world_size=16)


# LaneLoader: the rows of an optimizer step, whatever the world size and micro-batch split.

LANES = 8  # rows per optimizer step; the fixture has 14 row groups


def lane_loader(files, tok, lanes: range, batch_size: int) -> LaneLoader:
    return LaneLoader(files, tok, num_lanes=LANES, lanes=lanes, batch_size=batch_size, sequence_len=T, seed=5)


def steps_of(loaders: list[LaneLoader], micro_steps: int, steps: int) -> list[torch.Tensor]:
    """The inputs of each optimizer step, rows in lane order, as ranks x micro-steps produce them."""
    out = []
    for _ in range(steps):
        out.append(torch.cat([next(loader)[0] for loader in loaders for _ in range(micro_steps)]))
    return out


@pytest.mark.parametrize(
    "world_size, batch_size",
    [(2, 4), (2, 2), (4, 1), (8, 1), (1, 2)],
    ids=["2 ranks x 4 rows", "2 ranks x 2 rows x 2 micro-steps", "4 ranks x 1 row x 2", "8 ranks x 1 row", "1 x 2 x 4"],
)
def test_every_split_of_a_step_reads_the_same_rows(files, tok, world_size, batch_size):
    reference = steps_of([lane_loader(files, tok, range(LANES), LANES)], 1, 25)
    per_rank = LANES // world_size
    loaders = [lane_loader(files, tok, range(r * per_rank, (r + 1) * per_rank), batch_size) for r in range(world_size)]
    split = steps_of(loaders, per_rank // batch_size, 25)
    assert all(torch.equal(a, b) for a, b in zip(reference, split))


def test_row_l_of_every_step_is_lane_ls_own_stream(files, tok):
    steps = steps_of([lane_loader(files, tok, range(LANES), LANES)], 1, 12)
    for lane in (0, 3, 7):
        own = TokenLoader(files, tok, 1, T, rank=lane, world_size=LANES, seed=5)
        assert all(torch.equal(step[lane], next(own)[0][0]) for step in steps)
        assert len({pair for epoch in range(2) for pair in own.row_groups(epoch)}) > len(own.row_groups(0))


def test_lane_positions_saved_by_some_ranks_resume_on_others(files, tok):
    two_ranks = [lane_loader(files, tok, range(0, 4), 4), lane_loader(files, tok, range(4, 8), 2)]
    for _ in range(9):  # 9 steps: rank 0 in one micro-step of 4 rows, rank 1 in two of 2
        next(two_ranks[0]), next(two_ranks[1]), next(two_ranks[1])
    saved = json.loads(json.dumps(merge_lane_states([loader.state_dict() for loader in two_ranks])))
    one_process = lane_loader(files, tok, range(LANES), 8)
    one_process.load_state_dict(saved)
    uninterrupted = lane_loader(files, tok, range(LANES), 8)
    for _ in range(9):
        next(uninterrupted)
    assert all(torch.equal(a, b) for a, b in zip(steps_of([uninterrupted], 1, 20), steps_of([one_process], 1, 20)))


def test_too_few_row_groups_for_the_rows_of_a_step_is_one_sentence(files, tok):
    with pytest.raises(UserError, match="has 14 parquet row groups, fewer than the 16 rows of an optimizer step"):
        LaneLoader(files, tok, num_lanes=16, lanes=range(16), batch_size=16, sequence_len=T, seed=0)


def test_validation_rows_are_split_over_ranks_without_loss_or_repeat(files, tok):
    rows = ValidationRows(files, tok, num_rows=11, sequence_len=T)
    stream = _stream(tok, [(f, g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)])
    assert rows.inputs.reshape(-1).tolist() == stream[: 11 * T] and len(rows) == 11
    for world_size in (1, 2, 3):
        batches = [list(rows.batches(r, world_size, 2)) for r in range(world_size)]
        assert len({len(b) for b in batches}) == 1  # every rank runs the same number of batches
        real = [row for rank_batches in batches for x, y in rank_batches for row, targets in zip(x, y) if targets[0] >= 0]
        assert sorted(r.tolist() for r in real) == sorted(r.tolist() for r in rows.inputs)
        padding = [targets for rank_batches in batches for _, y in rank_batches for targets in y if targets[0] < 0]
        assert all((targets == -1).all() for targets in padding)


def test_prefetcher_hands_out_the_loaders_batches_with_their_positions(files, tok):
    plain = TokenLoader(files, tok, B, T, seed=1)
    prefetched = Prefetcher(TokenLoader(files, tok, B, T, seed=1), pin_memory=False)
    try:
        assert prefetched.state_dict() == plain.state_dict()
        for _ in range(25):  # past several row groups
            expected, batch = next(plain), next(prefetched)
            assert all(torch.equal(a, b) for a, b in zip(expected, batch, strict=True))
            # The position after the batches handed out, although the thread has made more.
            assert prefetched.state_dict() == plain.state_dict()
    finally:
        prefetched.close()


def test_prefetcher_resumes_from_a_position_and_refuses_one_once_started(files, tok):
    loader = TokenLoader(files, tok, B, T, seed=1)
    for _ in range(7):
        next(loader)
    resumed = Prefetcher(TokenLoader(files, tok, B, T, seed=1), pin_memory=False)
    resumed.load_state_dict(loader.state_dict())
    try:
        assert all(torch.equal(a, b) for a, b in zip(next(loader), next(resumed), strict=True))
        with pytest.raises(RuntimeError, match="after batches were prepared ahead"):
            resumed.load_state_dict(loader.state_dict())
    finally:
        resumed.close()


def test_prefetcher_ends_like_its_loader(files, tok):
    expected = list(TokenLoader(files, tok, B, T, loop=False, shuffle=False))
    prefetched = Prefetcher(TokenLoader(files, tok, B, T, loop=False, shuffle=False), pin_memory=False)
    batches = list(prefetched)
    prefetched.close()
    assert len(batches) == len(expected)
    with pytest.raises(StopIteration):
        next(prefetched)
