"""Read a W&B run file (`run-<id>.wandb`) back into wandb's own protobuf records.

wandb 0.31 no longer ships a Python reader (the old `wandb.sdk.internal.datastore` moved into
wandb-core, and `wandb sync --view` is gone), but the file format is unchanged: a 7-byte header
(":W&B", magic 0xBEE1, version 0) followed by a LevelDB log (32 KiB blocks of chunks, each with
a CRC32, a length and a FULL/FIRST/MIDDLE/LAST type) whose payloads are serialized
`wandb_internal_pb2.Record` messages. Checksums are verified, so a damaged file fails loudly.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:CHUNK_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B run file"
    records, payload, i = [], b"", CHUNK_HEADER
    while i + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - i % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer: zero padding
            i += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[i:i + CHUNK_HEADER])
        if kind == 0 and length == 0:  # preallocated, not yet written
            break
        chunk = data[i + CHUNK_HEADER:i + CHUNK_HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, f"bad checksum at {i}"
        i += CHUNK_HEADER + length
        payload = chunk if kind in (FULL, FIRST) else payload + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def history(records) -> list[dict]:
    """Each `run.log` call as a dict of decoded values (W&B's `_step`, `_runtime`... included)."""
    return [{_key(item): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def run_record(records):
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return run


def config(records) -> dict:
    """The run's config: what wandb.init received, then every later config update."""
    updates = [run_record(records).config.update]
    updates += [r.config.update for r in records if r.WhichOneof("record_type") == "config"]
    return {_key(item): json.loads(item.value_json) for update in updates for item in update}


def artifacts(records) -> list:
    return [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
