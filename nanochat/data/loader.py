"""Stateful, rank-aware loader turning parquet text shards into (inputs, targets) token batches.

- The token stream is <|bos|> + tokens of each document, documents back to back, so BOS marks
  every document boundary (nanochat's original packing, no padding, nothing cropped).
- A batch takes the next B*T + 1 tokens of the stream: inputs = tokens[:-1], targets = tokens[1:],
  viewed as [B, T]. Rows are consecutive T-token slices, so a row's last target is the next row's
  first input; the stream then advances by B*T, so the extra token opens the next batch. Every
  token is an input once and a target once.
- Reading and sharding work on (file, row group) pairs. Each epoch visits all pairs in the order
  random.Random(seed + epoch) shuffles them to (file order without shuffle); rank r takes every
  world_size-th pair starting at r, so ranks never read the same documents.
- A row group is tokenized in one multi-threaded encode_batch call; documents then move from it
  into the stream only as batches need them. The position is therefore (epoch, row group index,
  document index) plus the few tokens buffered but not yet emitted, which is what state_dict()
  holds: restoring it replays exactly the batches an uninterrupted loader would have produced.
- Prefetcher wraps a loader for training: the next batch is made in a background thread while the
  current step runs (pinned for an asynchronous host-to-GPU copy on CUDA), with positions that
  still belong to the batches handed out.
"""

from __future__ import annotations

import itertools
import queue
import random
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nanochat.errors import UserError


class TokenLoader:
    """Iterator of (inputs, targets), int64 CPU tensors of shape [batch_size, sequence_len]."""

    def __init__(
        self,
        files: list[Path],
        tokenizer,
        batch_size: int,
        sequence_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        loop: bool = True,
        shuffle: bool = True,
        tokenizer_threads: int = 4,
        row_groups: list[tuple[int, int]] | None = None,
    ):
        """row_groups: the files' (file index, row group) pairs with documents, when the caller has
        them already (nonempty_row_groups(files)); read from the footers otherwise."""
        if not files:
            raise UserError("TokenLoader got an empty list of data files; check data.data_dir.")
        if batch_size < 1 or sequence_len < 1:
            raise UserError(f"TokenLoader batch_size={batch_size} and sequence_len={sequence_len} must be positive.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside 0..world_size-1 (world_size={world_size})")
        self.files = [Path(f) for f in files]
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.sequence_len = sequence_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.loop = loop
        self.shuffle = shuffle
        self.tokenizer_threads = tokenizer_threads

        self._pairs = nonempty_row_groups(self.files) if row_groups is None else list(row_groups)
        if len(self._pairs) < world_size:
            raise UserError(
                f"The data has {len(self._pairs)} parquet row groups, fewer than world_size={world_size}, "
                f"so some ranks would get no data."
            )
        # Position: documents [0, _doc) of row group _order[_rg] (epoch _epoch) and everything
        # before them have entered the stream; _buffer holds the stream's not yet emitted tokens.
        self._epoch = 0
        self._rg = 0
        self._doc = 0
        self._buffer = np.empty(0, dtype=np.int64)
        self._order = self.row_groups(0)
        self._cached_key = None
        self._cached_tokens = self._cached_offsets = None

    def row_groups(self, epoch: int) -> list[tuple[Path, int]]:
        """The (file, row group index) pairs this rank reads, in order, in the given epoch."""
        pairs = list(self._pairs)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(pairs)
        return [(self.files[i], g) for i, g in pairs[self.rank :: self.world_size]]

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.batch_size * self.sequence_len
        self._fill(n + 1)
        window = self._buffer[: n + 1]
        inputs = torch.from_numpy(window[:-1].reshape(self.batch_size, self.sequence_len).copy())
        targets = torch.from_numpy(window[1:].reshape(self.batch_size, self.sequence_len).copy())
        self._buffer = self._buffer[n:]
        return inputs, targets

    def _fill(self, needed: int) -> None:
        """Moves whole documents into the buffer until it holds `needed` tokens."""
        while len(self._buffer) < needed:
            if self._rg == len(self._order):
                if not self.loop:
                    raise StopIteration
                self._epoch, self._rg, self._doc = self._epoch + 1, 0, 0
                self._order = self.row_groups(self._epoch)
            tokens, offsets = self._row_group_tokens()
            num_docs = len(offsets) - 1
            # Take the fewest documents that cover the shortfall, as one slice: no per-token work.
            start = offsets[self._doc]
            stop = min(int(np.searchsorted(offsets, start + needed - len(self._buffer))), num_docs)
            self._buffer = np.concatenate([self._buffer, tokens[start : offsets[stop]]])
            if stop == num_docs:
                self._rg, self._doc = self._rg + 1, 0
            else:
                self._doc = stop

    def _row_group_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """All tokens of the current row group (BOS-prefixed documents) and document offsets."""
        key = (self._epoch, self._rg)
        if self._cached_key != key:
            path, index = self._order[self._rg]
            with pq.ParquetFile(path) as parquet:
                texts = parquet.read_row_group(index, columns=["text"]).column("text").to_pylist()
            docs = self.tokenizer.encode_batch(texts, prepend_bos=True, num_threads=self.tokenizer_threads)
            lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
            self._cached_offsets = np.concatenate([[0], np.cumsum(lengths)])
            self._cached_tokens = np.fromiter(
                itertools.chain.from_iterable(docs), dtype=np.int64, count=int(self._cached_offsets[-1])
            )
            self._cached_key = key
        return self._cached_tokens, self._cached_offsets

    def _stream_identity(self) -> dict:
        """What defines the token stream; a saved position is only meaningful for the same one."""
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "num_row_groups": len(self._pairs),
        }

    def state_dict(self) -> dict:
        """The exact stream position as plain ints and a token list (JSON- and torch.save-safe)."""
        return {
            "epoch": self._epoch,
            "row_group": self._rg,
            "document": self._doc,
            "buffer": self._buffer.tolist(),
            **self._stream_identity(),
        }

    def continues(self, state: dict) -> bool:
        """Whether a saved position belongs to this loader's token stream (same files, seed, ranks)."""
        return all(state.get(key) == mine for key, mine in self._stream_identity().items())

    def load_state_dict(self, state: dict) -> None:
        """Resumes at the position state_dict() recorded; the stream must be the same one."""
        for key, mine in self._stream_identity().items():
            if state[key] != mine:
                raise UserError(f"The saved data loader position has {key}={state[key]}; this run has {key}={mine}.")
        self._epoch, self._rg, self._doc = state["epoch"], state["row_group"], state["document"]
        self._order = self.row_groups(self._epoch)
        self._buffer = np.asarray(state["buffer"], dtype=np.int64)
        self._cached_key = None


def nonempty_row_groups(files: list[Path]) -> list[tuple[int, int]]:
    """(file index, row group index) of every row group that holds documents, in file order."""
    return [(i, g) for i, path in enumerate(files) for g in _nonempty_row_groups(path)]


def _nonempty_row_groups(path: Path) -> list[int]:
    # Empty row groups are skipped so that every row group read adds at least one token (BOS).
    try:
        with pq.ParquetFile(path) as parquet:
            metadata = parquet.metadata
            return [g for g in range(metadata.num_row_groups) if metadata.row_group(g).num_rows > 0]
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"Cannot read parquet file {path} ({e}).") from e


class LaneLoader:
    """The rows of optimizer steps, the same whatever the world size and the micro-batch split.

    A step has num_lanes rows (total_batch_size / sequence_len). Lane l is its own packed token
    stream over its own share of the row groups (a TokenLoader striding the epoch's shuffled row
    groups with offset l and stride num_lanes, one row at a time), and row l of every step is the
    next row of lane l. A rank owns a contiguous range of lanes and yields them batch_size at a
    time, in order, so its micro-steps together cover its lanes once per step: 1 process of 8 rows,
    2 ranks of 4, or 2 ranks of 2 rows x 2 accumulation steps all train on the same rows, like
    MosaicML Streaming's elastic determinism. The position is per lane, so a checkpoint's lanes can
    be handed to another number of ranks (state_dict / load_state_dict).
    """

    def __init__(
        self,
        files: list[Path],
        tokenizer,
        num_lanes: int,
        lanes: range,
        batch_size: int,
        sequence_len: int,
        seed: int,
        tokenizer_threads: int = 4,
    ):
        if len(lanes) % batch_size:
            raise ValueError(f"{len(lanes)} lanes do not split into micro-batches of {batch_size} rows")
        files = [Path(f) for f in files]
        row_groups = nonempty_row_groups(files)
        if len(row_groups) < num_lanes:
            raise UserError(
                f"The training data has {len(row_groups)} parquet row groups, fewer than the {num_lanes} rows of an "
                "optimizer step (trainer.total_batch_size / model.sequence_len), which each read their own: use "
                "smaller row groups, or fewer rows per step."
            )
        self.num_lanes = num_lanes
        self.lanes = lanes
        self.batch_size = batch_size
        self.streams = {
            lane: TokenLoader(
                files,
                tokenizer,
                1,
                sequence_len,
                rank=lane,
                world_size=num_lanes,
                seed=seed,
                tokenizer_threads=tokenizer_threads,
                row_groups=row_groups,
            )
            for lane in lanes
        }
        self._next = 0  # index into lanes of the next micro-batch's first lane

    def __iter__(self) -> LaneLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [next(self.streams[lane]) for lane in self.lanes[self._next : self._next + self.batch_size]]
        self._next = (self._next + self.batch_size) % len(self.lanes)
        return torch.cat([inputs for inputs, _ in rows]), torch.cat([targets for _, targets in rows])

    def state_dict(self) -> dict:
        """This rank's lanes' positions, keyed by lane; merge the dicts of all ranks to re-split them."""
        return {
            "num_lanes": self.num_lanes,
            "next": self._next,
            "lanes": {lane: s.state_dict() for lane, s in self.streams.items()},
        }

    def continues(self, state: dict) -> bool:
        """Whether a saved position (holding at least this rank's lanes) is one of this loader's streams."""
        saved = {int(lane): position for lane, position in state["lanes"].items()}
        return state["num_lanes"] == self.num_lanes and all(
            lane in saved and stream.continues(saved[lane]) for lane, stream in self.streams.items()
        )

    def load_state_dict(self, state: dict) -> None:
        """Resume from a state holding (at least) this rank's lanes, e.g. merge_lane_states() of a
        checkpoint written by any number of ranks."""
        if state["num_lanes"] != self.num_lanes:
            raise UserError(
                f"The saved data position has {state['num_lanes']} rows per step and this run has {self.num_lanes} "
                "(trainer.total_batch_size / model.sequence_len)."
            )
        if state["next"] != 0:
            raise ValueError("a data position is saved between optimizer steps, where no lane is half used")
        saved = {int(lane): position for lane, position in state["lanes"].items()}  # JSON keeps keys as strings
        for lane, stream in self.streams.items():
            stream.load_state_dict(saved[lane])


def merge_lane_states(states: list[dict]) -> dict:
    """One state holding every lane, from the LaneLoader states of all the ranks that saved them."""
    lanes = {}
    for state in states:
        lanes.update({int(lane): position for lane, position in state["lanes"].items()})
    return {"num_lanes": states[0]["num_lanes"], "next": 0, "lanes": lanes}


class ValidationRows:
    """The first num_rows rows of sequence_len tokens of the validation split, read once.

    Each row is evaluated on its own (no state carries between rows), so bits per byte is the same
    sum of nats and bytes whichever rank evaluates which row: rank r takes rows r, r + W, ... in
    micro-batches of batch_size, the last one filled with rows whose targets are ignored (-1).
    """

    def __init__(self, files: list[Path], tokenizer, num_rows: int, sequence_len: int, tokenizer_threads: int = 4):
        stream = TokenLoader(
            files, tokenizer, 1, sequence_len, loop=False, shuffle=False, tokenizer_threads=tokenizer_threads
        )
        rows = list(itertools.islice(stream, num_rows))
        if not rows:
            raise UserError(f"The validation split holds fewer than {sequence_len + 1} tokens: nothing to evaluate.")
        self.inputs = torch.cat([inputs for inputs, _ in rows])
        self.targets = torch.cat([targets for _, targets in rows])

    def __len__(self) -> int:
        return len(self.inputs)

    def batches(self, rank: int, world_size: int, batch_size: int):
        """This rank's rows, batch_size at a time; every rank yields the same number of batches."""
        mine = range(rank, len(self), world_size)
        per_rank = -(-len(self) // world_size)
        for start in range(0, per_rank, batch_size):
            index = torch.tensor(mine[start : start + batch_size], dtype=torch.long)
            inputs, targets = self.inputs[index], self.targets[index]
            padding = batch_size - len(index)
            if padding:
                inputs = torch.cat([inputs, torch.zeros(padding, inputs.size(1), dtype=inputs.dtype)])
                targets = torch.cat([targets, torch.full((padding, targets.size(1)), -1, dtype=targets.dtype)])
            yield inputs, targets


class RepeatFirst:
    """The first `count` batches of a loader, over and over (trainer.overfit: one optimizer step's
    micro-batches repeated, so the train loss must fall towards zero). The position it reports is
    the loader's before the first of them, so a checkpoint of an overfitting run resumes on the same batches."""

    def __init__(self, loader, count: int):
        self.loader = loader
        self.count = count
        self._start = loader.state_dict()
        self._batches: list = []
        self._next = 0

    def __iter__(self) -> "RepeatFirst":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self._batches) < self.count:
            self._batches.append(next(self.loader))
            return self._batches[-1]
        batch = self._batches[self._next % self.count]
        self._next += 1
        return batch

    def state_dict(self) -> dict:
        return self._start

    def continues(self, state: dict) -> bool:
        return self.loader.continues(state)

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._start = self.loader.state_dict()


class Prefetcher:
    """An iterator of a loader's batches, each prepared in a background thread while the step
    before it runs, and on CUDA copied into pinned memory so that .to(device, non_blocking=True)
    is a real asynchronous copy (from pageable memory it waits for the GPU).

    The thread starts at the first next(). state_dict() is the loader's position after the last
    batch handed out (not after the ones prepared ahead), recorded by the thread together with
    each batch, so a checkpoint resumes exactly where training was; load_state_dict() is only
    possible before the first batch. close() stops the thread."""

    def __init__(self, loader: TokenLoader | LaneLoader, pin_memory: bool):
        self.loader = loader
        self.pin_memory = pin_memory
        self._state = loader.state_dict()
        # One batch waiting and one in the making: the thread is never more than two ahead.
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self.loader)
                if self.pin_memory:
                    batch = tuple(t.pin_memory() for t in batch)
                self._offer((batch, self.loader.state_dict()))
        except BaseException as error:  # StopIteration at the end of a non-looping loader, or a failure
            self._offer(error)

    def _offer(self, item) -> None:
        """Queue item once there is room, unless close() is called meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put(item)  # every later next() ends the same way
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict:
        return self._state

    def continues(self, state: dict) -> bool:
        return self.loader.continues(state)

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("Prefetcher.load_state_dict() after batches were prepared ahead")
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
