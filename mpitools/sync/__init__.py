"""mpisync: `driver` confines the targets and launches; `ranks` is the MPI program (rank 0
on the president scans and sends; every target plans, receives and applies)."""
