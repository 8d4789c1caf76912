"""`--jsonl FILE`: one kscope.v1.NodeRecord per line, protobuf's canonical JSON mapping.

An L7 line with ``summary`` stands for ``summary.count`` requests (kscope.v1.L7Summary)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import IO

from google.protobuf import json_format

from kscope.v1 import flow_pb2 as pb


class JsonlWriter:
    def __init__(self, path: str) -> None:
        self._fh: IO[str] = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - closed in close()
        self.lines = 0
        self.requests = 0  # L7 requests written: a summary line counts its summary.count

    def _write(self, record: pb.NodeRecord) -> None:
        self._fh.write(json.dumps(json_format.MessageToDict(record), separators=(",", ":")))
        self._fh.write("\n")
        self.lines += 1

    def write_flows(self, flows: Iterable[pb.L4Flow]) -> None:
        for flow in flows:
            self._write(pb.NodeRecord(l4=flow))

    def write_requests(self, requests: Iterable[pb.L7Request]) -> None:
        for req in requests:
            self._write(pb.NodeRecord(l7=req))
            self.requests += req.summary.count if req.HasField("summary") else 1

    def write_stats(self, stats: pb.AgentStats) -> None:
        self._write(pb.NodeRecord(stats=stats))

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
