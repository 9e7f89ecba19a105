"""The per-method programs the driver actor runs (see models.py). Each returns
{"seconds": whole-command seconds, "phases": {name: seconds}, ...notes}."""

from __future__ import annotations

from .bcast import ALG_NAMES, simulate_bcast_once
from .models import FANOUT, SBCAST_BLOCK, SBCAST_WIDTH, windows
from .pipeline import simulate_pipeline

__all__ = ["chain", "bcast", "transit", "pdcp", "sbcast", "rsync", "mpisync"]

SEGMENT = 64 << 10       # mpitools/stage/driver.py SEGMENT: the chain's message
STAGE_CHUNK = 4 << 20    # mpitools/stage/driver.py DEFAULT_CHUNK: bcast's message, read-ahead
SYNC_FRAME = 64 << 10    # mpitools/sync/driver.py DEFAULT_CHUNK: mpisync's frames
INVENTORY_ENTRY = 64     # bytes per file in the encoded inventory (bench: ~60)


def _ranks(topo, hosts, root=None):
    from topology.placement import place_ranks

    return list(place_ranks(topo, list(hosts), root).hosts)


def _mpi_costs(calib, ranks: int) -> dict:
    return {"launch": calib.cost("launch", ranks), "exit": calib.cost("exit", ranks)}


def _finish(phases: dict) -> dict:
    return {"seconds": sum(phases.values()), "phases": phases}


def chain(sim, topo, job, calib) -> dict:
    """mpitools/stage/ranks.py chain: rank 0 reads the spool over HTTP (read-ahead of one
    --chunk), every rank forwards 64 KiB segments to the next in town order, two
    buffers per rank (the next receive is posted when the send two back completed)."""
    ranks = _ranks(topo, job["hosts"])
    seg = int(job.get("segment") or SEGMENT) if len(ranks) > 1 else int(job.get("chunk") or STAGE_CHUNK)
    ahead = max(2, int(job.get("chunk") or STAGE_CHUNK) // seg)
    path = [topo.president.name] + ranks
    bufs = [0, ahead] + [1 << 60] * (len(ranks) - 1)  # 64 KiB: eager, see pipeline
    r = simulate_pipeline(sim, path, int(job["bytes"]), seg, window=2, buffers=bufs,
                          rate_caps=[None] + [_bytes(calib.node_disk_bps)] * len(ranks))
    phases = {**_mpi_costs(calib, len(ranks)), "transfer": r["seconds"]}
    return {**_finish(phases), "segment": seg, "simulated_segments": r["simulated_segments"],
            "segments": r["segments"], "extrapolated": r["extrapolated"]}


def _bytes(bps):
    return bps / 8 if bps else None


def bcast(sim, topo, job, calib) -> dict:
    """mpitools/stage/ranks.py bcast: one MPI_Bcast per --chunk; rank 0 reads the next chunk
    over HTTP while the current one is broadcast (a read-ahead of two chunks)."""
    ranks = _ranks(topo, job["hosts"])
    pres = topo.president.name
    total, chunk = int(job["bytes"]), int(job.get("chunk") or STAGE_CHUNK)
    n = max(1, -(-total // chunk))
    t = sim.clock
    sim.send(pres, ranks[0], min(chunk, total))
    sim.loop()
    first = sim.clock - t
    before = dict(sim.bytes_by_class)
    t = sim.clock
    if n > 1:
        sim.send(pres, ranks[0], chunk)  # the next chunk arrives meanwhile
    alg, _ = simulate_bcast_once(sim, ranks, min(chunk, total), job.get("mpi") or "openmpi")
    sim.loop()
    period = sim.clock - t
    for c in sim.bytes_by_class:  # every chunk moves the same bytes
        sim.bytes_by_class[c] = before[c] + (sim.bytes_by_class[c] - before[c]) * n
    phases = {**_mpi_costs(calib, len(ranks)), "transfer": first + n * period}
    return {**_finish(phases), "algorithm": f"{alg} {ALG_NAMES[alg]}", "chunks": n,
            "chunk": chunk}


def _window_flows(sim, flows: list[tuple[str, str, float]], fanout: int,
                  rate=None) -> None:
    """Start ``flows`` at most ``fanout`` at a time (pdsh -f), refilling as each ends."""
    queue = list(flows)

    def next_one() -> None:
        if queue:
            a, b, size = queue.pop(0)
            sim.send(a, b, size, next_one, rate)

    for _ in range(min(fanout, len(queue))):
        next_one()


def transit(sim, topo, job, calib) -> dict:
    """legacy_transit/transit.py: tar on the president's disk; the president pushes the
    tar to each destination town's mayor (window -f, written to the mayor's disk);
    barrier; every mayor at once streams it into its nodes' tar -x (window -f each);
    barrier; clean-up (rm on each mayor)."""
    fanout = int(job.get("fanout") or FANOUT)
    pres = topo.president.name
    size = int(job["bytes"])
    towns = topo.towns_of(job["hosts"])
    mayors = [topo.towns[t] for t in towns]
    disk = _bytes(calib.disk_bps)
    phases = {"pack": size / disk if disk else 0.0}
    t = sim.clock
    _window_flows(sim, [(pres, m, size) for m in mayors], fanout, disk)
    sim.loop()
    phases["to_mayors"] = (sim.clock - t) + windows(len(mayors), fanout) * calib.cost("ssh", 1)
    t = sim.clock
    for town, nodes in towns.items():
        _window_flows(sim, [(topo.towns[town], n, size) for n in nodes], fanout,
                      _bytes(calib.node_disk_bps))
    sim.loop()
    most = max(len(v) for v in towns.values())
    phases["unpack"] = ((sim.clock - t) + calib.cost("ssh", 1)  # the agent on each mayor
                        + windows(most, fanout) * calib.cost("ssh", 1))
    phases["cleanup"] = windows(len(mayors), fanout) * calib.cost("ssh", 1)
    return _finish(phases)


def pdcp(sim, topo, job, calib) -> dict:
    """pdcp / clush --copy: the president copies the file to every node over its own
    ssh session, ``-f`` (32) sessions at a time."""
    fanout = int(job.get("fanout") or FANOUT)
    pres = topo.president.name
    hosts = list(job["hosts"])
    t = sim.clock
    _window_flows(sim, [(pres, h, int(job["bytes"])) for h in hosts], fanout,
                  _bytes(calib.node_disk_bps))
    sim.loop()
    phases = {"copy": sim.clock - t,
              "ssh": windows(len(hosts), fanout) * calib.cost("ssh", 1)}
    return _finish(phases)


def sbcast(sim, topo, job, calib) -> dict:
    """Slurm sbcast: the file in blocks, each sent down the slurmd tree (``fanout``, -F) and
    acknowledged before the next; launch as one Slurm step. A level's messages start
    together (its parents got the block at about the same time: their links are alike)."""
    hosts = [topo.president.name] + _ranks(topo, job["hosts"])
    size = int(job["bytes"])
    block = int(job.get("chunk") or SBCAST_BLOCK)
    n = max(1, -(-size // block))
    kids = _kary(len(hosts), int(job.get("fanout") or SBCAST_WIDTH))
    before = dict(sim.bytes_by_class)
    t = sim.clock
    level = [0]
    while level:  # level by level: a wide tree has width^2 messages at its second
        sim.exchange([(hosts[v], hosts[c], min(block, size)) for v in level for c in kids[v]])
        level = [c for v in level for c in kids[v]]
    per = sim.clock - t
    for c in sim.bytes_by_class:
        sim.bytes_by_class[c] = before[c] + (sim.bytes_by_class[c] - before[c]) * n
    phases = {"launch": calib.cost("launch", len(hosts) - 1), "transfer": n * per}
    return _finish(phases)


def _kary(size: int, k: int) -> list[list[int]]:
    return [[c for c in range(k * v + 1, k * v + k + 1) if c < size] for v in range(size)]


def rsync(sim, topo, job, calib) -> dict:
    """legacy_transit/rsync.py: one rsync over ssh per target, ``-f`` at a time; each
    lists every file (both ends) and sends the changed bytes."""
    fanout = int(job.get("fanout") or FANOUT)
    pres = topo.president.name
    targets = list(job["hosts"])
    files = int(job.get("files") or 0)
    t = sim.clock
    _window_flows(sim, [(pres, h, int(job["bytes"])) for h in targets if job["bytes"]],
                  fanout)
    sim.loop()
    rounds = windows(len(targets), fanout)
    phases = {"transfer": sim.clock - t,
              "per_target": rounds * (calib.cost("ssh", 1) + files * calib.rsync_file_s)}
    return _finish(phases)


def mpisync(sim, topo, job, calib) -> dict:
    """mpitools/sync/ranks.py: the root scans and MPI_Bcasts the inventory; targets plan
    and gather need bitmaps; the groups are broadcast; one group's files stream down a
    chain of 64 KiB frames (mpitools/common/chain.py: two sends in flight, three receive buffers);
    barrier; finish and gather."""
    pres = topo.president.name
    ranks = _ranks(topo, job["hosts"], pres)
    files = int(job.get("files") or 0)
    phases = {**_mpi_costs(calib, len(ranks)),
              "scan": 2 * files * calib.scan_file_s}
    t = sim.clock
    inv = max(1, files * INVENTORY_ENTRY)
    simulate_bcast_once(sim, ranks, inv)
    sim.exchange([(r, pres, max(1, files // 8) + 64) for r in ranks[1:]])
    simulate_bcast_once(sim, ranks, 256)
    phases["plan"] = sim.clock - t
    phases["transfer"] = 0.0
    if job["bytes"]:
        r = simulate_pipeline(sim, ranks, int(job["bytes"]), SYNC_FRAME, window=2)
        phases["transfer"] = r["seconds"]
    t = sim.clock
    sim.exchange([(r, pres, 256) for r in ranks[1:]])
    phases["finish"] = sim.clock - t
    return _finish(phases)
