"""The long-running MPI service (issue 19): `driver` starts, asks and stops it and submits
requests (CLI process); `ranks` is its MPI program; `runcmd` is `run` as a rank program."""
