"""Reading what W&B logged offline, for tests: `wandb.Api` needs the network and offline runs
write no summary file, so the run's `.wandb` file (the transaction log `wandb sync` uploads)
is parsed: a 7-byte header (b":W&B", uint16 0xBEE1, version), then 32 KiB blocks of chunks
(crc32 uint32, length uint16, type uint8: 1 full, 2 first, 3 middle, 4 last) holding
serialised `Record` protobufs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (2, 3):
            pending += chunk
            continue
        payload, pending = pending + chunk, b""
        yield wandb_internal_pb2.Record.FromString(payload)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path) -> dict:
    """{"id", "name", "project", "config", "history": [{key: value, "_step": s}, ...]} of the one
    offline run under run_dir/wandb."""
    files = sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    if len(files) != 1:
        raise AssertionError(f"expected one offline W&B run under {run_dir}, found {files}")
    out = {"history": [], "config": {}}
    for record in records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(id=record.run.run_id, name=record.run.display_name,
                       project=record.run.project)
            out["config"].update({_key(i): json.loads(i.value_json)
                                  for i in record.run.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
    return out
