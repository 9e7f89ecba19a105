"""chiba-admin: cluster administration with legacy fan-out and MPI tools, compared."""

__version__ = "0.1.0"
