"""rsync-style exclude patterns compiled to one regular expression per entry kind."""

from __future__ import annotations

import os
import re
from typing import Iterable

from chiba_admin.errors import InventoryError

__all__ = ["IGNORE_FILE", "ExcludeMatcher", "compile_pattern", "read_ignore_file"]

IGNORE_FILE = ".chiba-ignore"


def compile_pattern(pattern: str) -> tuple[str, bool]:
    """Translate one rsync-style glob into (regex source over the relative path, dirs_only).

    Rules, as rsync's: a trailing '/' matches directories only; a leading '/' anchors at
    the root; otherwise the pattern matches the end of the path at a component boundary
    (so a pattern without '/' matches a basename anywhere). '*' and '?' stop at '/',
    '**' crosses it, a trailing '/***' matches a directory and everything inside it.
    """
    if not pattern or pattern in ("/", "//"):
        raise InventoryError("empty exclude pattern", where=repr(pattern),
                             hint="remove the pattern or name something to exclude")
    dirs_only = pattern.endswith("/")
    if dirs_only:
        pattern = pattern.rstrip("/")
    anchored = pattern.startswith("/")
    if anchored:
        pattern = pattern.lstrip("/")
    tail = ""
    if pattern.endswith("/***"):
        # 'dir/***' means the dir itself and all below it, whatever the kind of the member.
        pattern, tail = pattern[:-4], "(?:/.*)?"
    body = _translate(pattern)
    prefix = "" if anchored else "(?:.*/)?"
    return prefix + body + tail, dirs_only


def _translate(glob: str) -> str:
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            if glob.startswith("**", i):
                j = i
                while j < n and glob[j] == "*":
                    j += 1
                out.append(".*")
                i = j
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and glob[j] in "!^":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                out.append(re.escape(c))  # unterminated class: a literal '[' as fnmatch does
            else:
                cls = glob[i + 1:j]
                if cls[:1] in ("!", "^"):
                    cls = "^" + cls[1:]
                cls = cls.replace("\\", "\\\\")
                out.append(f"[{cls}]")
                i = j
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(glob[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


class ExcludeMatcher:
    """Decides whether a relative path is excluded; one regex match per entry at most."""

    __slots__ = ("patterns", "_any", "_dirs")

    def __init__(self, patterns: Iterable[str] = ()):
        self.patterns: list[str] = list(patterns)
        any_kind: list[str] = []
        dirs: list[str] = []
        for p in self.patterns:
            regex, dirs_only = compile_pattern(p)
            (dirs if dirs_only else any_kind).append(regex)
        dirs += any_kind
        # One alternation per kind keeps the scan at a single C-level match per entry.
        self._any = re.compile("|".join(f"(?:{r})" for r in any_kind), re.S) if any_kind else None
        self._dirs = re.compile("|".join(f"(?:{r})" for r in dirs), re.S) if dirs else None

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def excluded(self, relpath: str, is_dir: bool) -> bool:
        rx = self._dirs if is_dir else self._any
        return rx is not None and rx.fullmatch(relpath) is not None

    def __repr__(self) -> str:
        return f"ExcludeMatcher({self.patterns!r})"


def read_ignore_file(path: str | os.PathLike) -> list[str]:
    """Patterns of an ignore file: one per line, blank lines and '#' comments skipped.

    A leading '- ' (rsync filter-file syntax) is accepted; include rules ('+ ') are not,
    because silently treating them as excludes would hide files the user asked for.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InventoryError(f"cannot read ignore file: {exc.strerror}", where=os.fsdecode(path),
                             hint="fix its permissions or remove it") from exc
    patterns: list[str] = []
    for lineno, line in enumerate(raw.decode("utf-8", "surrogateescape").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("+ "):
            raise InventoryError("include rules are not supported", where=f"{os.fsdecode(path)}:{lineno}",
                                 hint="list only exclude patterns")
        if line.startswith("- "):
            line = line[2:].strip()
        patterns.append(line)
    return patterns
