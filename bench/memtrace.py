#!/usr/bin/env python3
"""Run a kscope command under tracemalloc, a snapshot written on each SIGUSR1 (``bench/memory.py``).

    memtrace.py OUT_PREFIX FRAMES kscope-agent|kscope|kscope-processor ARGS...

Snapshot k goes to ``OUT_PREFIX.k`` (``tracemalloc.Snapshot.dump``). tracemalloc costs memory of its
own (~ a pointer-sized record per live block and its frames), so RSS is measured in a run without it;
this run says where the Python heap goes. The handler runs in the main thread between bytecodes: the
agent's loop waits in short steps, so a snapshot is taken within one L7 drain period.
"""

from __future__ import annotations

import signal
import sys
import tracemalloc
from types import FrameType


def main() -> int:
    prefix, frames, command, *args = sys.argv[1:]
    tracemalloc.start(int(frames))
    taken = 0

    def dump(_sig: int, _frame: FrameType | None) -> None:
        nonlocal taken
        tracemalloc.take_snapshot().dump(f"{prefix}.{taken}")
        taken += 1
        print(f"memtrace_snapshot {prefix}.{taken - 1}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGUSR1, dump)
    if command == "kscope-processor":
        from cluster_processor.main import main as processor_main

        return processor_main(args)
    from node_exporter import cli

    return cli.agent_main(args) if command == "kscope-agent" else cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
