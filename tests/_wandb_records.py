"""Read what an offline wandb run stored, for the tests: its `run-<id>.wandb` file.

wandb (0.19 to 0.31) writes every record of an offline run to that one file: a 7-byte header
(`:W&B`, magic, version), then LevelDB-log framing (32 KiB blocks; each chunk has a 7-byte header:
CRC32C, little-endian length, type FULL/FIRST/MIDDLE/LAST) around protobuf `Record` messages. No
public reader exists (`wandb sync` uploads them from Go), so the tests decode it here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a wandb run file (no :W&B header)")
    out, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        body = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            out.append(body)
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            out.append(pending + body)
        else:  # zero padding at the end of a preallocated block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
    return out


@dataclass
class OfflineRun:
    id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per logged step
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_offline_run(run_dir: Path) -> OfflineRun:
    """`run_dir`: a `.../wandb/offline-run-<time>-<id>` folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    run = OfflineRun()
    for chunk in _chunks(path.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(chunk)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.id, run.name, run.group, run.job_type = (
                rec.run.run_id,
                rec.run.display_name,
                rec.run.run_group,
                rec.run.job_type,
            )
            run.config.update({_key(i): json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    return run
