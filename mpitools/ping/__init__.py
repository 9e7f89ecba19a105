"""A tiny MPI job that proves the runtime works across hosts (`cluster check`): `ranks`."""
