"""What every MPI tool shares: launching (driver side) and the rank runtime, the one
pipelined chain, the archive format and its safe extractor, and the spool (rank side).

Submodules are imported by name; this package imports nothing, so that a rank program
pays only for what it uses.
"""
