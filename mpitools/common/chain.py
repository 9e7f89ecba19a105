"""A pipelined chain broadcast of variable-length frames over non-blocking point-to-point.

Rank 0 of the communicator produces frames; rank i receives each frame from rank i-1,
forwards it to rank i+1 and then hands it to its consumer, so every link of a chain
ordered town by town carries the data once and the stream's bytes reach the last rank
one frame behind the first. Waiting is a ``Test`` followed by a short sleep rather than a
blocking call: on hosts whose ranks share cores, a spinning wait starves the ranks that
have work (docs/design.md, "Waiting without spinning").
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterable, Iterator

from mpi4py import MPI

from mpitools.common.runtime import PeerLost

__all__ = ["TAG_DATA", "TAG_END", "wait", "chain_send", "chain_frames", "chain_receive",
           "chain_stream"]

TAG_DATA = 71
TAG_END = 72
_POLL = 0.001  # seconds between tests of a pending request


def wait(req: MPI.Request, status: MPI.Status | None = None, poll: float = _POLL,
         peer: int | None = None) -> None:
    """Complete ``req`` without spinning a core; a failure names ``peer`` (a world rank)."""
    try:
        while not req.Test(status):
            time.sleep(poll)
    except MPI.Exception as e:
        raise PeerLost(peer, e.Get_error_string()) from None


def _world(ranks: list[int] | None, r: int | None) -> int | None:
    return r if ranks is None or r is None else ranks[r]


def chain_send(comm: MPI.Comm, frames: Iterable[bytes | bytearray | memoryview],
               *, depth: int = 2, world: list[int] | None = None) -> int:
    """Root side: send every frame down the chain; returns bytes sent. Ends the stream.

    ``world[i]`` is the world rank of ``comm``'s rank i, so a lost peer is named.
    """
    nxt = _world(world, 1)
    total = 0
    if comm.size < 2:
        for f in frames:
            total += len(f)
        return total
    pending: deque = deque()
    for frame in frames:
        while len(pending) >= depth:
            req, _keep = pending.popleft()
            wait(req, peer=nxt)
        buf = memoryview(frame).cast("B")
        pending.append((comm.Isend([buf, MPI.BYTE], dest=1, tag=TAG_DATA), buf))
        total += buf.nbytes
    while pending:
        req, _keep = pending.popleft()
        wait(req, peer=nxt)
    wait(comm.Isend([bytearray(0), MPI.BYTE], dest=1, tag=TAG_END), peer=nxt)
    return total


def chain_frames(comm: MPI.Comm, max_frame: int,
                 world: list[int] | None = None) -> Iterator[memoryview]:
    """Non-root side: yield each frame after forwarding it down the chain.

    A yielded memoryview is valid until the next frame is requested. Three buffers rotate
    so a buffer is reused only after its forward send has completed, and the next receive
    is already posted while this frame is consumed. The stream ends when rank 0 ends it;
    a consumer must iterate to the end (or call ``drain``) so the chain completes.
    """
    rank, size = comm.rank, comm.size
    prev, nxt = rank - 1, (rank + 1 if rank + 1 < size else None)
    wprev, wnxt = _world(world, prev), _world(world, nxt)
    bufs = [memoryview(bytearray(max_frame)) for _ in range(3)]
    sends: list[MPI.Request | None] = [None, None, None]
    status = MPI.Status()
    i = 0
    req = comm.Irecv([bufs[0], MPI.BYTE], source=prev, tag=MPI.ANY_TAG)
    while True:
        wait(req, status, peer=wprev)
        if status.Get_tag() == TAG_END:
            if nxt is not None:
                for s in sends:
                    if s is not None:
                        wait(s, peer=wnxt)
                wait(comm.Isend([bufs[0][:0], MPI.BYTE], dest=nxt, tag=TAG_END), peer=wnxt)
            return
        n = status.Get_count(MPI.BYTE)
        cur, follow = i % 3, (i + 1) % 3
        if sends[follow] is not None:
            wait(sends[follow], peer=wnxt)
            sends[follow] = None
        req = comm.Irecv([bufs[follow], MPI.BYTE], source=prev, tag=MPI.ANY_TAG)
        if nxt is not None:
            sends[cur] = comm.Isend([bufs[cur][:n], MPI.BYTE], dest=nxt, tag=TAG_DATA)
        yield bufs[cur][:n]
        i += 1


def chain_receive(comm: MPI.Comm, max_frame: int,
                  consume: Callable[[memoryview], None]) -> int:
    """Non-root side: receive, forward, then ``consume`` each frame; returns bytes received."""
    total = 0
    for frame in chain_frames(comm, max_frame):
        consume(frame)
        total += len(frame)
    return total


def chain_stream(comm: MPI.Comm, frames: Iterable[bytes] | None, max_frame: int,
                 consume: Callable[[memoryview], None] | None) -> int:
    """Collective over ``comm``: rank 0 supplies ``frames``, every other rank ``consume``."""
    if comm.rank == 0:
        return chain_send(comm, frames or ())
    return chain_receive(comm, max_frame, consume)
