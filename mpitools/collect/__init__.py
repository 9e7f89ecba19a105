"""Userstage stage-out (collect): `driver` checks the home directory and launches; `ranks`
is the MPI program (rank 0 on the home server unpacks a window of nodes at a time)."""
