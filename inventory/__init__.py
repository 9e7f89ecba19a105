"""File-tree inventories, diffs and sync plans: the shared brain of staging and mpisync."""

from __future__ import annotations

import importlib

# Names are loaded from their submodule on first use (PEP 562): rank programs that need
# one stdlib-only submodule (inventory.beneath for staging) must not pay for the whole
# inventory and chiba_admin.errors at start-up.
_SUBMODULE = {
    "apply": ("ApplyResult", "DestTree", "apply_plan", "delete_extraneous", "finalize",
              "local_fetch", "make_dirs", "make_symlinks", "write_file_atomic"),
    "codec": ("FORMAT_VERSION", "MAGIC", "decode_inventory", "encode_inventory"),
    "entries": ("DIR", "FILE", "LINK", "Entry", "Inventory", "Issue", "check_source",
                "decode_path", "encode_path", "validate_relpath"),
    "excludes": ("ExcludeMatcher", "parse_rules", "read_exclude_from"),
    "groups": ("Group", "bitmap_paths", "group_bitmaps", "group_needs", "needs_bitmap",
               "union_bitmaps"),
    "hashing": ("ALGOS", "DEFAULT_ALGO", "hash_bytes", "hash_file", "hash_files",
                "new_hasher"),
    "plan": ("DELETE", "META", "MKDIR", "SYMLINK", "WRITE", "Action", "Plan", "format_plan",
             "make_plan", "needs"),
    "scanner": ("scan",),
}
_WHERE = {name: mod for mod, names in _SUBMODULE.items() for name in names}


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'inventory' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


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
