"""Open MPI's shared-memory segments that the test run leaves in /dev/shm, removed at its end.

Open MPI 5's shared-memory transport creates ``sm_segment.HOST.UID.JOBID.RANK`` files (16 MiB
each) in /dev/shm. A job that ends normally removes them; a job the tests abort on purpose
(a killed rank, a fault rule) and a singleton ``MPI_Init`` in a test process leave them, and
the previous sessions found hundreds there, which is memory taken from the machine. The
session removes only segments that appeared while it ran, that its user owns and that no
live process maps.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHM = Path("/dev/shm")
PATTERN = "sm_segment.*"


def segments(shm: Path = SHM) -> set[str]:
    """Names of Open MPI segment files in ``shm`` (empty when it does not exist)."""
    try:
        return {p.name for p in shm.glob(PATTERN)}
    except OSError:
        return set()


def mapped_files(ignore: int | None = None) -> set[tuple[int, int, int]]:
    """(device major, minor, inode) of every file some live process of this machine other
    than ``ignore`` (a pid) has mapped, from /proc/*/maps (processes this user cannot read
    are skipped). Identities, not paths: a path there may be escaped or read otherwise."""
    out: set[tuple[int, int, int]] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == ignore:
            continue
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.split(maxsplit=5)
                    if len(fields) >= 5 and fields[4] != "0":
                        major, _, minor = fields[3].partition(":")
                        out.add((int(major, 16), int(minor, 16), int(fields[4])))
        except (OSError, ValueError):
            continue
    return out


def leftovers(before: set[str], shm: Path = SHM, ignore: int | None = None) -> list[Path]:
    """Segments in ``shm`` that were not there ``before``, that this user owns and that no
    process but ``ignore`` (a pid) maps."""
    new = segments(shm) - before
    if not new:
        return []
    live = mapped_files(ignore)
    return sorted(p for p in (shm / n for n in new) if _mine(p) and _identity(p) not in live)


def _identity(p: Path) -> tuple[int, int, int] | None:
    try:
        st = p.lstat()
    except OSError:
        return None
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def _mine(p: Path) -> bool:
    try:
        return p.lstat().st_uid == os.geteuid()
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def _remove_leftover_mpi_segments():
    before = segments()
    yield
    # the test process itself maps its singleton MPI_Init's segment until it exits, and
    # nothing removes that one after it (seen: one a run); a mapping outlives the unlink
    for p in leftovers(before, ignore=os.getpid()):
        try:
            p.unlink()
        except OSError:
            pass  # gone meanwhile
