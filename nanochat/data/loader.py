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
    ):
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

        self._pairs = [(i, g) for i, path in enumerate(self.files) for g in _nonempty_row_groups(path)]
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


def _nonempty_row_groups(path: Path) -> list[int]:
    # Empty row groups are skipped so that every row group read adds at least one token (BOS).
    try:
        with pq.ParquetFile(path) as parquet:
            metadata = parquet.metadata
            return [g for g in range(metadata.num_row_groups) if metadata.row_group(g).num_rows > 0]
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"Cannot read parquet file {path} ({e}).") from e


class Prefetcher:
    """An iterator of a loader's batches, each prepared in a background thread while the step
    before it runs, and on CUDA copied into pinned memory so that .to(device, non_blocking=True)
    is a real asynchronous copy (from pageable memory it waits for the GPU).

    The thread starts at the first next(). state_dict() is the loader's position after the last
    batch handed out (not after the ones prepared ahead), recorded by the thread together with
    each batch, so a checkpoint resumes exactly where training was; load_state_dict() is only
    possible before the first batch. close() stops the thread."""

    def __init__(self, loader: TokenLoader, pin_memory: bool):
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

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("Prefetcher.load_state_dict() after batches were prepared ahead")
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
