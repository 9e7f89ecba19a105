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

__all__ = ["decide", "ALG_NAMES", "tree_children", "simulate_bcast_once"]

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
