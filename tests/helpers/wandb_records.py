"""Records of an offline W&B run, read from its ``run-<id>.wandb`` file (a LevelDB-style log of protobuf
records; W&B ships no Python reader for it any more), for tests that check what a run logged."""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    pos, pending = _HEADER, b""  # the file starts with a 7-byte ":W&B" header
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk, pos = data[pos + _HEADER : pos + _HEADER + length], pos + _HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            yield pending


class OfflineRun:
    """The run record, config, history rows, metric definitions and artifacts of one offline run directory."""

    def __init__(self, run_dir: Path):
        (path,) = Path(run_dir).glob("run-*.wandb")
        self.records = []
        for payload in _payloads(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            self.records.append(record)

    def of(self, kind: str) -> list:
        return [getattr(r, kind) for r in self.records if r.WhichOneof("record_type") == kind]

    @property
    def run(self):
        return self.of("run")[0]

    @property
    def history(self) -> list[dict]:
        return [
            {item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json) for item in h.item}
            for h in self.of("history")
        ]

    @property
    def metrics(self) -> dict:
        return {m.name or m.glob_name: m for m in self.of("metric")}

    @property
    def config(self) -> dict:
        out = {}
        for c in [self.run.config, *self.of("config")]:
            for item in c.update:
                out[item.nested_key[0] if item.nested_key else item.key] = json.loads(item.value_json)
        return out
