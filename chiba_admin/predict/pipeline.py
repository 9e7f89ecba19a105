"""A windowed store-and-forward pipeline over a list of hosts, simulated message by message.

Used by the MPI chain (mpitools/stage/ranks.py ``chain``: 64 KiB segments, two buffers per
rank), mpisync's group streams (mpitools/common/chain.py: at most two sends in flight, three
receive buffers) and sbcast-like trees. Long streams are simulated for a prefix of real-size
segments and extrapolated from the steady-state period at the last host.
"""

from __future__ import annotations

import os

__all__ = ["simulate_pipeline", "EVENT_BUDGET"]

# About 6,000 messages per second of wall time with SimGrid's Python bindings on this
# machine: 60,000 keeps one simulation near 10 s.
EVENT_BUDGET = 60_000


def simulate_pipeline(sim, hosts: list[str], total: int, seg: int, *, window: int = 2,
                      buffers: list[int] | None = None, budget: int | None = None,
                      rate_caps: list[float | None] | None = None) -> dict:
    """Stream ``total`` bytes in ``seg``-byte messages along ``hosts`` (hosts[0] has them).

    Hop h (hosts[h] -> hosts[h+1]) has at most ``window`` messages in flight; hosts[j]
    holds at most ``buffers[j]`` segments not yet forwarded (default: unlimited, as for
    MPI messages under the eager limit, which the receiver buffers whether or not its
    receive is posted; the last host forwards nothing and is never full). Returns {"seconds", "simulated_segments",
    "segments", "extrapolated"}: seconds until the last host has every byte.
    """
    if budget is None:  # CHIBA_PREDICT_BUDGET: tests compare a cut run with a full one
        budget = int(os.environ.get("CHIBA_PREDICT_BUDGET") or EVENT_BUDGET)
    n = max(1, -(-total // seg))
    hops = len(hosts) - 1
    if hops < 1:
        return {"seconds": 0.0, "segments": n, "simulated_segments": 0, "extrapolated": False}
    k = n if n * hops <= budget else max(12, min(n, budget // hops))
    bufs = list(buffers or [1 << 60] * len(hosts))
    caps = list(rate_caps or [None] * len(hosts))
    arrived = [k] + [0] * hops       # segments each host has received
    sent = [0] * (hops + 1)          # segments each host has started to forward
    done = [0] * (hops + 1)          # forwards completed
    inflight = [0] * (hops + 1)
    last_times: list[float] = []
    start = sim.clock
    before = sim.byte_marks()

    def pump(h: int) -> None:
        while (h < hops and sent[h] < arrived[h] and inflight[h] < window
               and (h + 1 == hops or sent[h] < done[h + 1] + bufs[h + 1])):
            sent[h] += 1
            inflight[h] += 1
            size = seg if (sent[h] < n or total % seg == 0) else total % seg

            def arrive(h=h):
                inflight[h] -= 1
                done[h] += 1
                arrived[h + 1] += 1
                if h + 1 == hops:
                    last_times.append(sim.clock - start)
                pump(h)
                pump(h + 1)
                if h > 0:
                    pump(h - 1)  # a freed buffer here lets the previous host send again

            sim.send(hosts[h], hosts[h + 1], size, arrive, caps[h + 1])

    pump(0)
    sim.loop()
    t = last_times[-1]
    extrapolated = k < n
    if extrapolated:
        # The period between the last two windows to arrive. Over a long chain the head
        # of a short stream spreads out (its windows share links with the ACKs of the
        # ones in front, SimGrid's cross-traffic) while the last windows close up behind
        # it at the steady rate; a period measured from the first segments would count
        # that one-off spread once per segment (1,000 hops: 17x too slow at 12 segments;
        # this way 12 segments give within 1% of 400). Whole windows, a quarter of the
        # stream: its very last window, with nothing behind it, runs a little faster.
        back = min(k - 1, window * max(1, k // (4 * window)))
        period = (last_times[-1] - last_times[-1 - back]) / back
        t += (n - k) * period
        sim.scale_bytes(before, n / k)
    return {"seconds": t, "segments": n, "simulated_segments": k,
            "extrapolated": extrapolated}
