"""``python -m mpitools.sync JOB``: the mpisync rank program (rank 0 on the president)."""

# Rank-side module: lean imports only (no rich, click, networkx).
from __future__ import annotations

import time

from .rankio import emit, rank_hosts, rank_main
from .syncrank import run_sync

__all__ = ["main"]


def main(comm, job: dict) -> int:
    """Run one synchronisation; rank 0 emits progress events and the result event."""
    hosts = rank_hosts(job)
    # each target's {"root", "rel"} (confined by the CLI); rank 0, the source, has none
    spec = {**job, "hosts": hosts, "dests": [job["dests"].get(h) for h in hosts]}
    last = [0.0]

    def progress(sent: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.25 or sent >= total:
            last[0] = now
            emit("progress", done=sent, total=total)

    if comm.rank == 0:
        emit("start", ranks=comm.size)
    result = run_sync(comm, spec, progress=progress if comm.rank == 0 else None)
    if comm.rank == 0:
        emit("result", **result)
    return 0


if __name__ == "__main__":
    rank_main(main)
