"""MPI_Bcast as Open MPI's ``coll/tuned`` runs it: the fixed decision rule, then the tree.

The rule is ``ompi_coll_tuned_bcast_intra_dec_fixed`` in Open MPI 5.0's
ompi/mca/coll/tuned/coll_tuned_decision_fixed.c: by communicator size and message bytes
it picks 1 basic_linear, 2 chain, 5 binary_tree, 6 binomial, 7 knomial (radix 4, the
``coll_tuned_bcast_knomial_radix`` default), 8 scatter_allgather (binomial scatter,
recursive-doubling allgather) or 9 scatter_allgather_ring; segment size 0 (one message
per edge). The Userstage path (mpitools/stage/ranks.py ``bcast``) calls MPI_Bcast once per
``--chunk`` (4 MiB by default) after rank 0 has read that chunk from the spool over HTTP.
"""

from __future__ import annotations

__all__ = ["decide", "ALG_NAMES", "tree_children", "simulate_bcast_once", "simulate_bcast_stream"]

ALG_NAMES = {1: "basic_linear", 2: "chain", 3: "pipeline", 4: "split_binary_tree",
             5: "binary_tree", 6: "binomial", 7: "knomial", 8: "scatter_allgather",
             9: "scatter_allgather_ring"}

# (communicator size below, [(bytes below, algorithm), ..., (None, algorithm)])
_RULE = [
    (4, [(32, 3), (256, 5), (512, 3), (1024, 7), (32768, 1), (131072, 5), (262144, 2),
         (524288, 1), (1048576, 6), (None, 5)]),
    (8, [(64, 5), (128, 6), (2048, 5), (8192, 6), (1048576, 1), (None, 2)]),
    (16, [(8, 7), (64, 5), (4096, 7), (16384, 5), (32768, 6), (None, 1)]),
    (32, [(4096, 7), (1048576, 6), (None, 8)]),
    (64, [(2048, 6), (None, 7)]),
    (128, [(None, 7)]),
    (256, [(2, 6), (16384, 5), (32768, 1), (65536, 5), (None, 7)]),
    (1024, [(16384, 7), (32768, 4), (None, 7)]),
    (2048, [(524288, 7), (None, 8)]),
    (4096, [(262144, 7), (None, 8)]),
    (None, [(8192, 7), (16384, 5), (262144, 7), (None, 8)]),
]


def decide(ranks: int, nbytes: int, library: str = "openmpi") -> int:
    """Open MPI 5.0 coll/tuned's MPI_Bcast algorithm number for ``ranks`` and ``nbytes``;
    ``library="mpich2"``: what the paper reports of MPICH2 on Chiba City ("MPI for
    system software", section 4.2: "a minimal spanning tree" up to four nodes, "for more
    than four nodes ... a more sophisticated scatter/allgather algorithm"; binomial
    tree, else scatter + ring allgather, MPICH2's long-message broadcast)."""
    if library == "mpich2":
        return 6 if ranks <= 4 else 9
    for below, arms in _RULE:
        if below is None or ranks < below:
            for limit, alg in arms:
                if limit is None or nbytes < limit:
                    return alg
    raise AssertionError("unreachable")


def tree_children(alg: int, size: int, radix: int = 4) -> list[list[int]]:
    """Children of each rank (root 0) in the tree of algorithm ``alg`` (1, 2, 4, 5, 6, 7)."""
    kids: list[list[int]] = [[] for _ in range(size)]
    if alg == 1:
        kids[0] = list(range(1, size))
    elif alg in (2, 3):
        for v in range(size - 1):
            kids[v].append(v + 1)
    elif alg in (4, 5):
        for v in range(size):
            kids[v] = [c for c in (2 * v + 1, 2 * v + 2) if c < size]
    elif alg == 6:
        for v in range(size):
            mask = 1
            while mask < size and not v & mask:
                if v + mask < size:
                    kids[v].append(v + mask)
                mask <<= 1
    elif alg == 7:
        for v in range(size):
            mask = 1
            while mask < size and v % (mask * radix) == 0:
                for j in range(1, radix):
                    if v + j * mask < size:
                        kids[v].append(v + j * mask)
                mask *= radix
    else:
        raise ValueError(f"algorithm {alg} is not a tree")
    return kids


def _tree(sim, hosts, nbytes, alg) -> None:
    kids = tree_children(alg, len(hosts))

    def deliver(v: int) -> None:
        for c in kids[v]:
            sim.send(hosts[v], hosts[c], nbytes, lambda c=c: deliver(c))

    deliver(0)
    sim.loop()


def _scatter(sim, hosts, nbytes) -> list[int]:
    """Binomial scatter: rank v ends with block v (the blocks of its subtree pass through)."""
    p = len(hosts)
    block = -(-nbytes // p)
    mask = 1
    while mask < p:
        mask <<= 1
    mask >>= 1
    while mask >= 1:  # the largest subtree first, as ompi_coll_base_bcast_intra_scatter_allgather
        msgs = []
        for v in range(0, p, 2 * mask):
            dst = v + mask
            if dst < p:
                blocks = min(mask, p - dst)
                msgs.append((hosts[v], hosts[dst], blocks * block))
        sim.exchange(msgs)
        mask >>= 1
    return [block] * p


def _allgather_doubling(sim, hosts, block) -> None:
    p = len(hosts)
    pof2 = 1
    while pof2 * 2 <= p:
        pof2 *= 2
    dist = 1
    while dist < pof2:  # recursive doubling among the first pof2 ranks
        msgs = []
        for v in range(pof2):
            msgs.append((hosts[v], hosts[v ^ dist], dist * block))
        sim.exchange(msgs)
        dist *= 2
    extra = [(hosts[v - pof2], hosts[v], (p - 1) * block) for v in range(pof2, p)]
    sim.exchange(extra)  # the ranks beyond a power of two get the rest from a partner


def _allgather_ring(sim, hosts, block) -> None:
    p = len(hosts)
    for _ in range(p - 1):
        sim.exchange([(hosts[v], hosts[(v + 1) % p], block) for v in range(p)])


def simulate_bcast_once(sim, hosts: list[str], nbytes: int,
                        library: str = "openmpi") -> tuple[int, float]:
    """One MPI_Bcast of ``nbytes`` from hosts[0] (``library``: see ``decide``);
    (algorithm, simulated seconds)."""
    alg = decide(len(hosts), nbytes, library)
    t0 = sim.clock
    if len(hosts) < 2:
        return alg, 0.0
    if alg in (8, 9):
        blocks = _scatter(sim, hosts, nbytes)
        (_allgather_doubling if alg == 8 else _allgather_ring)(sim, hosts, blocks[0])
    else:
        _tree(sim, hosts, nbytes, alg)
    return alg, sim.clock - t0


def simulate_bcast_stream(sim, src: str, hosts: list[str], total: int, chunk: int,
                          alg: int, ahead: int = 2, budget: int | None = None) -> dict:
    """``total`` bytes as one MPI_Bcast per ``chunk`` from hosts[0] down the tree of
    ``alg`` (a tree algorithm: 1, 2, 5, 6, 7), rank 0 reading each chunk from ``src``
    (the spool over HTTP, at most ``ahead`` chunks ahead of the broadcast).

    MPI_Bcast does not synchronise: a rank returns once it has its chunk and has sent it
    to its children, and calls the next, so chunks follow each other down the tree (rank
    1 forwards chunk k while rank 0 sends it chunk k + 1). A message of 4 MiB goes by
    rendezvous: a parent's send of chunk k starts once the child has entered its k-th
    MPI_Bcast (its (k-1)-th returned). Long streams: the first chunks are simulated (the
    event ``budget``, pipeline.EVENT_BUDGET) and the rest extrapolated at the period of
    the last ones. Returns {"seconds", "chunks", "simulated_chunks", "extrapolated"}."""
    from .pipeline import EVENT_BUDGET

    p, n = len(hosts), max(1, -(-total // chunk))
    k_sim = n if n * p <= (budget or EVENT_BUDGET) else max(8, min(n, (budget or EVENT_BUDGET) // p))
    kids = tree_children(alg, p) if p > 1 else [[]]
    parent = [None] * p
    for v, cs in enumerate(kids):
        for c in cs:
            parent[c] = v
    got = [0] * p           # chunks each rank holds (rank 0: read from src)
    fin = [-1] * p          # the last chunk whose MPI_Bcast returned on each rank
    sent = [0] * p          # chunks each rank has had sent to it
    busy = [False] * p      # a message to this rank in flight
    todo = [len(kids[v]) for v in range(p)]
    left = [p] * k_sim      # ranks still inside each chunk's MPI_Bcast
    ends: list[float] = []
    t0 = sim.clock
    before = sim.byte_marks()
    reading = [False, 0]    # a read in flight, chunks read

    def size(k: int) -> int:
        return min(chunk, total - k * chunk)

    def finish(v: int, k: int) -> None:
        fin[v] = k
        todo[v] = len(kids[v])
        left[k] -= 1
        if not left[k]:
            ends.append(sim.clock - t0)
        poke(v)

    def edge(v: int, c: int) -> None:
        k = sent[c]
        if busy[c] or k >= k_sim or got[v] <= k or fin[v] != k - 1 or fin[c] < k - 1:
            return
        busy[c] = True

        def arrived() -> None:
            busy[c] = False
            sent[c] = got[c] = k + 1
            todo[v] -= 1
            if not todo[v]:
                finish(v, k)
            if kids[c]:
                poke(c)
            else:
                finish(c, k)

        sim.send(hosts[v], hosts[c], size(k), arrived)

    def poke(v: int) -> None:
        for c in kids[v]:
            edge(v, c)
        if parent[v] is not None:
            edge(parent[v], v)
        if v == 0:
            if p == 1 and got[0] > fin[0] + 1:
                finish(0, fin[0] + 1)
            read()

    def read() -> None:
        if reading[0] or reading[1] >= k_sim or reading[1] - (fin[0] + 1) > ahead:
            return
        reading[0] = True

        def done() -> None:
            reading[0] = False
            reading[1] += 1
            got[0] = reading[1]
            poke(0)

        sim.send(src, hosts[0], size(reading[1]), done)

    read()
    sim.loop()
    t = ends[-1]
    if k_sim < n:
        back = max(1, k_sim // 4)
        t += (n - k_sim) * (ends[-1] - ends[-1 - back]) / back
        sim.scale_bytes(before, n / k_sim)
    return {"seconds": t, "chunks": n, "simulated_chunks": k_sim,
            "extrapolated": k_sim < n}
