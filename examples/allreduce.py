"""A tiny MPI program for the example job scripts: every rank adds its rank; rank 0 prints.

Run it with MPICH's mpi4py (`.venv-mpich/bin/python examples/allreduce.py`) so that it wires
up through `chiba-admin shell`'s PMI-1 server.

With ``CHIBA_BENCH_T0`` (seconds since the epoch, stamped just before the launch command),
rank 0 also prints ``init_max S``: the longest any rank took from that stamp to MPI_Init
done (the benchmark of chiba_admin/bench/shellbench.py; the hosts share one clock there).
"""

import os
import socket
import time

t0 = time.time()
from mpi4py import MPI  # noqa: E402  (the import is MPI_Init: timed on purpose)

ready = time.time()
comm = MPI.COMM_WORLD
total = comm.allreduce(comm.rank)
init = time.time() - t0
print(f"rank {comm.rank} of {comm.size} on {socket.gethostname()}: sum {total}, "
      f"init {init:.2f} s", flush=True)
stamp = os.environ.get("CHIBA_BENCH_T0")
if stamp:
    worst = comm.allreduce(ready - float(stamp), op=MPI.MAX)
    if comm.rank == 0:
        print(f"init_max {worst:.6f}", flush=True)
