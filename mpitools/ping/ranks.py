"""The `cluster check` MPI job: each rank starts MPI, meets the others, says where it ran."""

# Rank-side module: standard library and mpi4py only (docs/design.md, "Lean ranks").
from __future__ import annotations

import os
import socket
import sys
import time

from mpitools.common.faults import Faults
from mpitools.common.runtime import PeerLost, emit, rank_hosts, rank_main, wait

__all__ = ["main"]

# taken when the module is imported, before rank_main starts MPI: the difference to the
# first line of main is this rank's MPI_Init (and mpi4py's import)
_T0 = time.time()


def main(comm, job: dict) -> int:
    """Barrier, then an allreduce of the ranks; rank 0 emits ``result`` with every rank's report.

    Events (rank 0): ``start`` (time), ``result`` (ok, size, sum, expected, ranks: list of
    {rank, host, hostname, python, init_seconds}, seconds). Works on any intracommunicator.
    Fault point ``ping.start`` (tests keep a rank alive there so it can be killed).
    """
    import array

    from mpi4py import MPI

    t_init = time.time() - _T0
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == 0:
        emit("start", time=time.time(), size=size)
    hosts = rank_hosts(job)
    Faults.of(job, rank).checkpoint("ping.start")
    t0 = time.time()
    send, recv = array.array("l", [rank]), array.array("l", [0])
    try:
        wait(comm.Ibarrier())
        wait(comm.Iallreduce(send, recv, op=MPI.SUM))
    except MPI.Exception as e:
        raise PeerLost(_failed_peer(comm), e.Get_error_string()) from None
    mine = {"rank": rank, "host": hosts[rank] if rank < len(hosts) else None,
            "hostname": socket.gethostname(), "python": sys.executable,
            "pid": os.getpid(), "init_seconds": round(t_init, 4)}
    reports = comm.gather(mine, root=0)
    if rank == 0:
        expected = size * (size - 1) // 2
        emit("result", ok=recv[0] == expected, size=size, sum=recv[0], expected=expected,
             ranks=reports, seconds=round(time.time() - t0, 4))
    return 0


def _failed_peer(comm) -> int | None:
    """The first rank ULFM knows to have failed (None without ULFM or when it knows none)."""
    try:
        failed = comm.Get_failed()
        try:
            if failed.Get_size() == 0:
                return None
            return failed.Translate_ranks([0], comm.Get_group())[0]
        finally:
            failed.Free()
    except Exception:  # no ULFM in this MPI: the launcher falls back on the runtime's words
        return None


if __name__ == "__main__":
    rank_main(main)
