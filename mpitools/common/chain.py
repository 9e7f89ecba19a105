"""The one pipelined chain: a stream of frames down the ranks of a communicator.

Rank 0 of the communicator produces frames; rank i receives each frame from rank i-1,
forwards it to rank i+1 and then hands it to its consumer, so every link of a chain
ordered town by town carries the data once and the stream's bytes reach the last rank one
frame behind the first. Frames are at most ``max_frame`` bytes; an empty message with
``TAG_END`` ends the stream. Every wait is one ``Test`` followed by a short sleep
(:func:`mpitools.common.runtime.wait`): on hosts whose ranks share cores, a spinning wait
starves the ranks that have work, and each test runs Open MPI's progress engine
(docs/design.md, "Waiting without spinning").

Used by stage (64 KiB segments of an archive), mpisync (frames of file pieces, one chain
per group of targets) and, through :class:`Sender` alone, collect (each node's stream to
the home server).
"""

# Rank-side module: standard library, mpi4py and mpitools.common.runtime only. mpi4py.MPI is
# imported when a chain is made, so that rank_main sets the thread level first.
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

from mpitools.common.runtime import PeerLost, wait

__all__ = ["TAG_DATA", "TAG_END", "EAGER_FRAME", "Sender", "Chain", "chain_send",
           "chain_frames", "chain_receive"]

TAG_DATA = 71
TAG_END = 72
# The largest frame Open MPI's TCP transport sends eagerly: its eager limit (64 KiB)
# counts its own headers, so a frame of exactly 64 KiB went by rendezvous, whose reply
# waits for the receiver's next poll (docs/design.md, "Waiting without spinning").
EAGER_FRAME = (64 << 10) - 128

Idle = Callable[[], None] | None


class Sender:
    """Non-blocking sends to one rank ``dest``, at most ``depth`` in flight.

    Each frame's buffer is kept alive until its send completes. ``peer`` names ``dest`` in
    a :class:`PeerLost` (default ``dest``). ``end`` flushes and sends the empty end mark
    (tag ``end_tag``).
    """

    def __init__(self, comm, dest: int, *, tag: int = TAG_DATA, end_tag: int = TAG_END,
                 depth: int = 2, peer: int | None = None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm, self.dest, self.tag, self.end_tag = comm, dest, tag, end_tag
        self.depth = max(1, depth)
        self.peer = dest if peer is None else peer
        self.pending: deque = deque()  # (request, buffer) oldest first
        self.sent = 0  # bytes

    def progress(self) -> None:
        """Test the oldest sends, dropping completed ones (an ``idle`` callback)."""
        try:
            while self.pending and self.pending[0][0].Test():
                self.pending.popleft()
        except self.MPI.Exception as e:
            raise PeerLost(self.peer, e.Get_error_string()) from None

    def room(self, idle: Idle = None, free: int = 1) -> None:
        """Wait until at most ``depth - free`` sends are in flight."""
        while len(self.pending) > self.depth - free:
            wait(self.pending[0][0], idle, self.peer)
            self.progress()  # drops it (a completed request tests true again)

    def send(self, frame, idle: Idle = None) -> None:
        """Post one frame (bytes-like) once there is room; ``idle`` runs while waiting."""
        self.room(idle)
        buf = memoryview(frame).cast("B")
        self.pending.append((self._isend(buf, self.tag), buf))
        self.sent += buf.nbytes

    def flush(self, idle: Idle = None) -> None:
        """Wait for every send in flight."""
        self.room(idle, free=self.depth)

    def end(self) -> None:
        """Flush, then send the end mark and wait for it."""
        self.flush()
        wait(self._isend(memoryview(b""), self.end_tag), None, self.peer)

    def _isend(self, buf: memoryview, tag: int):
        try:
            return self.comm.Isend([buf, self.MPI.BYTE], dest=self.dest, tag=tag)
        except self.MPI.Exception as e:
            raise PeerLost(self.peer, e.Get_error_string()) from None


class Chain:
    """One rank's side of the chain over ``comm`` (collective: every rank makes one).

    Rank 0 calls :meth:`send` per frame, then :meth:`end`; every other rank iterates
    :meth:`frames` to the end. ``depth``: sends in flight on every link (rank 0 waits for
    the oldest beyond it); the other ranks rotate ``depth + 1`` buffers of ``max_frame``
    bytes and keep a receive posted in each free one, so the next frames arrive while
    this one is consumed. ``world[i]`` names comm rank i in a :class:`PeerLost` (the rank
    the launcher knows); by default the comm's own ranks. :meth:`progress` keeps sends
    and receives moving and is the ``idle`` callback for a consumer that waits.
    """

    def __init__(self, comm, *, max_frame: int, depth: int = 2,
                 world: list[int] | None = None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm, self.max_frame, self.depth = comm, max_frame, max(1, depth)
        self.rank = comm.rank
        self._name = (lambda r: r) if world is None else (lambda r: world[r])
        nxt = self.rank + 1
        self.out = (Sender(comm, nxt, depth=self.depth, peer=self._name(nxt))
                    if nxt < comm.size else None)
        self._bufs: list[memoryview] = []
        self._recvs: deque = deque()  # (request, status), in frame order
        self._posted = 0  # index of the next frame to post a receive for
        self._released = -1  # frames up to this one are no longer the consumer's
        self._forwarded = 0  # frames handed to ``out``
        self._limit = 0  # the highest frame index a receive may be posted for

    # -- rank 0 ----------------------------------------------------------------------------
    def send(self, frame, idle: Idle = None) -> None:
        """Rank 0: send one frame down the chain (nothing to do for a chain of one);
        ``idle`` runs while it waits for room (not this chain's :meth:`progress`: rank 0
        has no receives, so that would only test the send waited for a second time)."""
        if self.out is not None:
            self.out.send(frame, idle)

    def end(self) -> None:
        """Rank 0: end the stream once every frame has left."""
        if self.out is not None:
            self.out.end()

    @property
    def sent(self) -> int:
        """Bytes this rank has sent down the chain."""
        return self.out.sent if self.out is not None else 0

    # -- every other rank ------------------------------------------------------------------
    def frames(self, count: int | None = None) -> Iterator[memoryview]:
        """Each frame, forwarded before it is yielded; valid until the next is requested.

        The stream ends when rank 0 ends it; iterate to the end so the chain completes.
        With ``count`` (the number of frames rank 0 sends) receives are posted up to
        ``depth`` frames ahead; without it, one frame ahead: a receive posted past the end
        of a stream would take the first frame of whatever follows on ``comm``.
        Raises RuntimeError when more than ``count`` frames arrive.
        """
        prev = self._name(self.rank - 1)
        self._bufs = [memoryview(bytearray(self.max_frame)) for _ in range(self.depth + 1)]
        i = 0
        while True:
            self._released = i - 1  # the consumer has let go of frame i - 1
            self._limit = i if count is None else count
            self._post_free()  # frame i at least: its buffer's last send is done (depth)
            req, status = self._recvs.popleft()
            wait(req, self.progress, prev, status=status)
            if status.Get_tag() == TAG_END:
                if self.out is not None:
                    self.out.end()
                return
            if i == count:
                raise RuntimeError(f"chain: more than the {count} frames announced")
            self._limit = i + 1 if count is None else count
            frame = self._bufs[i % len(self._bufs)][:status.Get_count(self.MPI.BYTE)]
            self._post_free()
            if self.out is not None:
                self.out.send(frame)
            self._forwarded += 1
            yield frame
            if self.out is not None:
                # finish this frame's forward before taking the next one: on the testbed
                # (8 nodes, 20 Mb/s, 64 KiB frames, same run) leaving it in flight while the
                # next receive was waited for cost 0.90 -> 0.85 of line rate; meanwhile
                # only receives are posted (the send waited for is tested once a wake)
                self.out.flush(self._post_free)
            i += 1

    def progress(self) -> None:
        """Test the sends in flight and post receives into the buffers they free."""
        if self.out is not None:
            self.out.progress()
        if self._bufs:
            self._post_free()

    def _post_free(self) -> None:
        # frame k lands in buffer k % n, free once frame k - n is released by the consumer
        # and its forward has completed (sends complete in order: frames below ``done``);
        # nothing is posted past ``_limit``, the last frame the stream can still have
        n = len(self._bufs)
        done = self._forwarded - (len(self.out.pending) if self.out is not None else 0)
        MPI = self.MPI
        while (self._posted <= self._limit and self._posted - n <= self._released
               and self._posted - n < done):
            status = MPI.Status()
            try:
                req = self.comm.Irecv([self._bufs[self._posted % n], MPI.BYTE],
                                      source=self.rank - 1, tag=MPI.ANY_TAG)
            except MPI.Exception as e:
                raise PeerLost(self._name(self.rank - 1), e.Get_error_string()) from None
            self._recvs.append((req, status))
            self._posted += 1


def chain_send(comm, frames: Iterable[bytes | bytearray | memoryview], *, depth: int = 2,
               world: list[int] | None = None) -> int:
    """Rank 0: send every frame down the chain and end it; returns bytes sent (the frames'
    total, also for a chain of one). ``world`` as in :class:`Chain`."""
    chain = Chain(comm, max_frame=0, depth=depth, world=world)
    total = 0
    for frame in frames:
        chain.send(frame)
        total += memoryview(frame).nbytes
    chain.end()
    return total


def chain_frames(comm, max_frame: int, world: list[int] | None = None) -> Iterator[memoryview]:
    """Every other rank: the frames of the stream (see :meth:`Chain.frames`)."""
    return Chain(comm, max_frame=max_frame, world=world).frames()


def chain_receive(comm, max_frame: int, consume: Callable[[memoryview], None]) -> int:
    """Every other rank: receive, forward, then ``consume`` each frame; returns bytes."""
    total = 0
    for frame in chain_frames(comm, max_frame):
        consume(frame)
        total += len(frame)
    return total
