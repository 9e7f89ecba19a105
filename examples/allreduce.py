"""A tiny MPI program for the example job scripts: every rank adds its rank; rank 0 prints.

Run it with MPICH's mpi4py (`.venv-mpich/bin/python examples/allreduce.py`) so that it wires
up through `chiba-admin shell`'s PMI-1 server.
"""

import socket
import time

t0 = time.time()
from mpi4py import MPI  # noqa: E402  (the import is MPI_Init: timed on purpose)

comm = MPI.COMM_WORLD
total = comm.allreduce(comm.rank)
init = time.time() - t0
print(f"rank {comm.rank} of {comm.size} on {socket.gethostname()}: sum {total}, "
      f"init {init:.2f} s", flush=True)
