"""File-tree inventories, diffs and sync plans: the shared brain of staging and mpisync."""

from __future__ import annotations

from .apply import (ApplyResult, DestTree, apply_plan, delete_extraneous, finalize, local_fetch,
                    make_dirs, make_symlinks, write_file_atomic)
from .codec import FORMAT_VERSION, MAGIC, decode_inventory, encode_inventory
from .entries import (DIR, FILE, LINK, Entry, Inventory, Issue, check_source, decode_path,
                      encode_path, validate_relpath)
from .excludes import ExcludeMatcher, parse_rules, read_exclude_from
from .groups import Group, bitmap_paths, group_bitmaps, group_needs, needs_bitmap, union_bitmaps
from .hashing import ALGOS, DEFAULT_ALGO, hash_bytes, hash_file, hash_files, new_hasher
from .plan import (DELETE, META, MKDIR, SYMLINK, WRITE, Action, Plan, format_plan, make_plan,
                   needs)
from .scanner import scan

__all__ = [
    # data
    "Entry", "Inventory", "Issue", "FILE", "DIR", "LINK",
    "encode_path", "decode_path", "validate_relpath",
    # scanning and hashing
    "scan", "check_source", "ExcludeMatcher", "parse_rules", "read_exclude_from",
    "ALGOS", "DEFAULT_ALGO", "hash_file", "hash_files", "hash_bytes", "new_hasher",
    # planning
    "Action", "Plan", "make_plan", "format_plan", "needs",
    "MKDIR", "WRITE", "SYMLINK", "META", "DELETE",
    # wire format
    "encode_inventory", "decode_inventory", "MAGIC", "FORMAT_VERSION",
    # many targets
    "Group", "group_needs", "needs_bitmap", "bitmap_paths", "union_bitmaps", "group_bitmaps",
    # applying
    "apply_plan", "local_fetch", "ApplyResult", "DestTree", "write_file_atomic", "make_dirs",
    "make_symlinks", "delete_extraneous", "finalize",
]
