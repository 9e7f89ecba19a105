"""The per-method programs the driver actor runs (see models.py). Each returns
{"seconds": whole-command seconds, "phases": {name: seconds}, ...notes}."""

from __future__ import annotations

from .bcast import ALG_NAMES, decide, simulate_bcast_once, simulate_bcast_stream
from .models import FANOUT, SBCAST_BLOCK, SBCAST_WIDTH, SLURM_TREE_WIDTH, windows
from .pipeline import simulate_pipeline

__all__ = ["chain", "bcast", "transit", "pdcp", "sbcast", "rsync", "mpisync", "slurm_span",
           "slurm_split"]

SEGMENT = (64 << 10) - 128     # mpitools/common/chain.py EAGER_FRAME: the chain's message
STAGE_CHUNK = 4 << 20    # mpitools/stage/driver.py DEFAULT_CHUNK: bcast's message, read-ahead
SYNC_FRAME = SEGMENT           # mpitools/sync/driver.py DEFAULT_CHUNK: mpisync's frames
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
    """mpitools/stage/ranks.py bcast: one MPI_Bcast per --chunk; rank 0 reads the chunks
    over HTTP ahead of the broadcast (a queue of two, ranks.py ``_Downloader``). The tree
    algorithms stream chunk after chunk down the tree (bcast.simulate_bcast_stream); the
    scatter + allgather ones involve every rank in every step, one chunk after the
    other."""
    ranks = _ranks(topo, job["hosts"])
    pres = topo.president.name
    total, chunk = int(job["bytes"]), int(job.get("chunk") or STAGE_CHUNK)
    lib = job.get("mpi") or "openmpi"
    alg = decide(len(ranks), min(chunk, total), lib)
    n = max(1, -(-total // chunk))
    if alg not in (8, 9):
        r = simulate_bcast_stream(sim, pres, ranks, total, chunk, alg)
        transfer = r["seconds"]
    else:  # chunk 0 read; chunks 0..n-2 each broadcast while the next is read; the last
        t = sim.clock
        sim.send(pres, ranks[0], min(chunk, total))
        sim.loop()
        transfer = sim.clock - t
        last = total - (n - 1) * chunk
        # chunks broadcast while the next is read; a whole last chunk taken as one of them
        alike = n - 1 + (last == chunk) if n > 1 else 0
        if n > 1:
            before = sim.byte_marks()
            t = sim.clock
            sim.send(pres, ranks[0], chunk)
            simulate_bcast_once(sim, ranks, chunk, lib)
            sim.loop()
            transfer += alike * (sim.clock - t)
            sim.scale_bytes(before, alike)  # every chunk moves the same bytes
            sim.discount(pres, ranks[0], alike * chunk - (total - chunk))  # reads: n - 1
        if alike < n:  # the last chunk, shorter, alone
            t = sim.clock
            simulate_bcast_once(sim, ranks, last, lib)
            transfer += sim.clock - t
    phases = {**_mpi_costs(calib, len(ranks)), "transfer": transfer}
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
    """Slurm 22.05's sbcast (src/bcast/file_bcast.c ``_bcast_file``): the file in 8 MiB
    blocks (``SBCAST_SIZE``), one REQUEST_FILE_BCAST per block to the job's node list,
    answered by every node before the next block is sent. The message tree is Slurm's
    (src/common/forward.c ``start_msg_tree``): the node list, in hostlist order, is cut
    by ``set_span`` at the tree width min(-F, 8) into heads with the nodes each forwards
    to; sbcast sends the block to every head; a head's slurmd forwards it once the whole
    block has arrived, splitting its list at the TreeWidth of slurm.conf (50, Slurm's
    default: a star up to 50), and so on down. 8 nodes at -F 8 are a star; 32 are three
    heads of 8 and 5 direct copies (the president sends 8 blocks, the testbed's records
    measure that)."""
    pres = topo.president.name
    hosts = sorted(job["hosts"], key=_natural)
    size = int(job["bytes"])
    block = int(job.get("chunk") or SBCAST_BLOCK)
    width = min(SBCAST_WIDTH, int(job.get("fanout") or SBCAST_WIDTH))
    tree_width = int(job.get("tree_width") or SLURM_TREE_WIDTH)
    groups = slurm_split(hosts, width)
    n = max(1, -(-size // block))
    last = size - (n - 1) * block
    runs = [(n, block)] if last == block else [(n - 1, block), (1, last)]
    seconds = 0.0
    for count, nbytes in runs:
        if count <= 0 or nbytes <= 0:
            continue
        before = sim.byte_marks()
        t = sim.clock
        _sbcast_block(sim, pres, groups, nbytes, tree_width)
        seconds += count * (sim.clock - t)  # blocks go one after the other, alike
        sim.scale_bytes(before, count)
    phases = {"launch": calib.cost("launch", len(hosts)), "transfer": seconds}
    return {**_finish(phases), "blocks": n, "heads": sum(1 for g in groups if g[1])}


def _sbcast_block(sim, src: str, groups, nbytes: int, tree_width: int) -> None:
    """One block down Slurm's message tree: every (head, rest) of ``groups`` gets it from
    ``src``; each head, once the block has arrived, forwards it to its ``rest`` (split
    at ``tree_width``) as a slurmd of its own, and answers when its subtree has."""
    def fan_out(sender: str, branches) -> None:
        comms = [sim.start(sender, h, nbytes) for h, _ in branches]
        todo = list(branches)
        kids = []
        while comms:
            i = sim.sg.Comm.wait_any(comms)
            comms.pop(i)
            head, rest = todo.pop(i)
            if rest:
                sub = slurm_split(rest, tree_width)
                kids.append(sim.spawn(f"slurmd-{head}", head,
                                      lambda h=head, sub=sub: fan_out(h, sub)))
        for k in kids:
            k.join()

    fan_out(src, groups)


def slurm_span(total: int, width: int) -> list[int]:
    """Slurm's ``set_span`` (src/common/slurm_protocol_api.c): how many nodes each of at
    most ``width`` branches forwards to, for ``total`` nodes (all 0 up to ``width``)."""
    span = [0] * width
    left = total
    if total <= width:
        return span
    while left > 0:
        for i in range(width):
            if width - i >= left:  # the rest fit as branches of their own
                if span[i]:
                    span[i] += left
                left = 0
                break
            if left <= width:
                if not span[i]:
                    left -= 1  # this branch's head
                span[i] += left
                left = 0
                break
            if not span[i]:
                left -= 1
            span[i] += width
            left -= width
    return span


def slurm_split(hosts: list[str], width: int) -> list[tuple[str, list[str]]]:
    """Slurm's route split (src/common/slurm_route.c ``route_split_hostlist_treewidth``):
    ``hosts`` cut into (head, the hosts the head forwards to) by :func:`slurm_span`."""
    span = slurm_span(len(hosts), max(1, width))
    out, i = [], 0
    while i < len(hosts):
        k = span[len(out)] if len(out) < len(span) else 0
        out.append((hosts[i], list(hosts[i + 1:i + 1 + k])))
        i += 1 + k
    return out


def _natural(name: str) -> tuple:
    """Hostlist order: the name's text, then its number (ccn2 before ccn10)."""
    import re

    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


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
