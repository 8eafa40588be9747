"""Read the summary of an offline W&B run without syncing it (the W&B test reads what a run logged).

An offline run keeps its records in ``run-<id>.wandb``: LevelDB-log framing (32 KiB blocks, 7-byte
record headers) around ``wandb_internal_pb2.Record`` protobufs. Current wandb releases no longer ship
a Python reader for it, so this module decodes the framing and lets wandb's own protobuf classes parse
the records.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["iter_records", "read_offline_summary"]

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    """Every ``Record`` protobuf of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path} is not a W&B run file")
    pos, buf = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            continue
        buf += chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def read_offline_summary(run_dir: str | Path) -> dict[str, Any]:
    """The final summary of an offline run folder (``wandb/offline-run-*``) as a flat dict."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    summary: dict[str, Any] = {}
    for record in iter_records(files[0]):
        if record.WhichOneof("record_type") != "summary":
            continue
        for item in record.summary.update:
            key = item.key or "/".join(item.nested_key)
            if key:
                summary[key] = json.loads(item.value_json)
        for item in record.summary.remove:
            summary.pop(item.key or "/".join(item.nested_key), None)
    return summary
