"""Userstage stage-in: `driver` packs, serves and launches (CLI process); `ranks` is the MPI
program (rank 0 reads the spool, every rank unpacks, the chain or MPI_Bcast moves bytes)."""
