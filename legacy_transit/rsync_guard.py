"""``python -m legacy_transit.rsync_guard ROOT REL run|dry -- rsync ARGS... DEST``.

The target-side guard of ``sync-mayors --method rsync``, run as rsync's ``--rsync-path``
over SSH (and around the local rsync on the embedded cluster), so that rsync follows the
rules every method follows (docs/design.md, "Safety"):

- the destination ``REL`` below the trusted ``ROOT`` is walked without following any
  symlink (inventory.beneath; its parents created in a real run), and rsync is pointed at
  it by its working directory: DEST, rsync's last argument, becomes ``.`` (or, for a
  destination that does not exist yet, its name in the parent, which rsync creates);
- a real run holds the destination's lock (``.NAME.chiba-lock`` beside it, the one every
  method takes) while rsync runs, so a second run on the same destination is refused;
- a dry run creates, locks and removes nothing (a destination that does not exist yet is
  left to rsync --dry-run, which creates nothing either).

Standard library and inventory.beneath only. Exit status: rsync's, or 2 with one line on
stderr when the guard refuses (the destination is busy, a symlink, not a directory).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

from inventory.beneath import (BeneathError, lock_dest, open_dir_beneath, open_root, split_rel,
                               unlock_dest)

__all__ = ["main", "EXIT_REFUSED"]

EXIT_REFUSED = 2


def _parent(root: str, rel: str, dry: bool) -> tuple[int, str]:
    """(fd of the destination's parent or -1 when a dry run finds none, destination name)."""
    parts = split_rel(rel)
    if not parts:  # the root itself (a host's repository): its lock sits in its parent
        root = root.rstrip("/")
        return open_root(os.path.dirname(root) or "/"), os.path.basename(root)
    root_fd = open_root(root)
    try:
        return open_dir_beneath(root_fd, "/".join(parts[:-1]), create=not dry,
                                display=root), parts[-1]
    except BeneathError as exc:
        if dry and exc.errno == errno.ENOENT:
            return -1, parts[-1]
        raise
    finally:
        os.close(root_fd)


def main(argv: list[str]) -> int:
    """Walk, lock, then run the rsync command that follows ``--``; its exit status."""
    try:
        root, rel, mode, sep, *cmd = argv
        if sep != "--" or mode not in ("run", "dry") or len(cmd) < 2:
            raise ValueError
    except ValueError:
        print("usage: rsync_guard ROOT REL run|dry -- rsync ARGS... DEST", file=sys.stderr)
        return EXIT_REFUSED
    dry = mode == "dry"
    shown = os.path.join(root, rel) if rel else root
    lock = -1
    parent = -1
    try:
        parent, name = _parent(root, rel, dry)
        if parent >= 0:
            if not dry:
                lock = lock_dest(parent, name, display=os.path.dirname(shown))
            try:
                dest = (open_dir_beneath(parent, name, display=os.path.dirname(shown))
                        if rel else open_root(root))
            except BeneathError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                if not dry:
                    # rsync makes the last component itself, as it would unguarded (and
                    # lists it as created: the dry run's list and the run's agree); the
                    # parent was walked beneath the root and the lock is held
                    os.fchdir(parent)
                    cmd[-1] = name + "/"
            else:
                os.fchdir(dest)
                os.close(dest)
                cmd[-1] = "."  # rsync writes into the directory opened beneath the root
        return subprocess.call(cmd)
    except (BeneathError, ValueError) as exc:
        print(f"chiba-admin rsync guard: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        if lock >= 0:
            unlock_dest(parent, name, lock)
        if parent >= 0:
            os.close(parent)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
