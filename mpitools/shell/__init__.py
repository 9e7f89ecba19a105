"""MPISH: the parallel shell that is itself an MPI program (its PMI server, its ranks)."""
