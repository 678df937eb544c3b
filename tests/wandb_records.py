"""Read an offline W&B run (the run-<id>.wandb file) back as protobuf records, for tests.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB
blocks of records, each with a 7-byte header (crc32, length, type) and split across blocks as
FULL, or FIRST / MIDDLE... / LAST pieces. Each reassembled record is a wandb Record protobuf.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    ident, magic, _version = HEADER.unpack_from(data)
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER.size
    while pos + RECORD_HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < RECORD_HEADER.size:  # a block's tail too small for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        pos += RECORD_HEADER.size
        pending += data[pos : pos + length]
        pos += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(run_dir: Path) -> tuple[wandb_internal_pb2.RunRecord, list[dict]]:
    """The run record and the logged history rows of the single offline W&B run under run_dir."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = read_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    return run, history
