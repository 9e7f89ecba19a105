"""rsync's --exclude rules: the same selection as rsync 3.x, compiled to one regex per entry kind.

The reference is rsync's own code, not its manual: ``parse_rule_tok``/``add_rule``/
``rule_matches`` in exclude.c and ``dowild``/``wildmatch_array`` in lib/wildmatch.c. What
an ``--exclude`` argument (or an ``--exclude-from`` line) means there, checked against real
rsync by tests/test_excludes_rsync.py:

- ``- PAT`` is an exclude and ``+ PAT`` an include (exactly one space); any other text,
  ``-,PAT`` included, is a plain exclude pattern; ``!`` alone clears the rules before it;
  ``-`` or ``+`` followed by nothing is an error; an empty argument adds no rule.
- Rules are tried in order and the first that matches decides; no match means included.
- A trailing ``/`` (one) makes the rule match directories only; a leading ``/`` anchors it
  at the transfer root; a pattern with another ``/`` or a ``**`` is matched against the
  path from the root (unanchored: against its trailing components), otherwise against
  the final component. ``*``, ``?`` and ``[...]`` never match ``/``; ``**`` does; a
  leading ``**/`` also matches at the top level; ``dir/***`` is the directory and
  everything below it (not a regular file named ``dir``). ``[...]`` takes ``!``/``^``
  negation, ranges, backslash escapes and the ASCII POSIX classes; an unterminated ``[``
  or unknown ``[:class:]`` matches nothing. A backslash escapes only in a pattern that
  has a wildcard (``*?[``); elsewhere it is an ordinary character.
- Matching is on bytes (``?`` is one byte, as in rsync), names encoded as ``os.fsencode``.

Nothing here reads per-directory files: the rules are exactly the options given.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Iterable, NamedTuple

from chiba_admin.errors import InventoryError

__all__ = ["ExcludeMatcher", "Rule", "parse_rules", "read_exclude_from", "MAX_RULE_BYTES"]

# rsync discards (with a complaint) a pattern of MAXPATHLEN bytes or more; we refuse it.
MAX_RULE_BYTES = 4096

_ASCII = range(128)
# rsync calls the <ctype.h> macros per byte; in the C and UTF-8 locales no byte >= 0x80
# belongs to a class, so these are the ASCII sets.
_POSIX = {
    b"alnum": {c for c in _ASCII if chr(c).isalnum()},
    b"alpha": {c for c in _ASCII if chr(c).isalpha()},
    b"blank": {0x20, 0x09},
    b"cntrl": set(range(32)) | {127},
    b"digit": set(range(0x30, 0x3A)),
    b"graph": set(range(33, 127)),
    b"lower": set(range(0x61, 0x7B)),
    b"print": set(range(32, 127)),
    b"punct": {c for c in range(33, 127) if not chr(c).isalnum()},
    b"space": {0x20, 0x09, 0x0A, 0x0B, 0x0C, 0x0D},
    b"upper": set(range(0x41, 0x5B)),
    b"xdigit": set(b"0123456789abcdefABCDEF"),
}
_NEVER = b"(?!)"
# os.fsencode's codec, called directly: it is a third of a match's cost per entry
_FS_ENC, _FS_ERR = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
_SLASH = ord("/")


class Rule(NamedTuple):
    """One parsed rule: ``include`` (a ``+ `` rule) and its pattern as rsync stores it."""

    include: bool
    pattern: bytes


def parse_rules(args: Iterable[str | bytes]) -> list[Rule]:
    """Rules from ``--exclude`` arguments (or ``--exclude-from`` lines), in order.

    Applies rsync's old-style prefixes (``- ``, ``+ ``) and the ``!`` list clear.
    Raises InventoryError for ``-``/``+`` with no pattern, or a pattern of
    MAX_RULE_BYTES bytes or more.
    """
    rules: list[Rule] = []
    for arg in args:
        raw = os.fsencode(arg) if isinstance(arg, str) else bytes(arg)
        raw = raw.split(b"\0", 1)[0]  # rsync's rule is a C string
        if not raw:
            continue  # rsync adds no rule for an empty argument
        include = False
        if raw[:2] == b"- ":
            raw = raw[2:]
        elif raw[:2] == b"+ ":
            include, raw = True, raw[2:]
        elif raw == b"!":
            rules.clear()
            continue
        shown = os.fsdecode(arg) if isinstance(arg, bytes) else arg
        if not raw:
            raise InventoryError("exclude rule has no pattern", where=repr(shown),
                                 hint="write '- PATTERN' or '+ PATTERN'")
        if len(raw) >= MAX_RULE_BYTES:
            raise InventoryError(f"exclude pattern of {len(raw)} bytes is too long",
                                 where=repr(shown[:40] + "..."),
                                 hint=f"rsync ignores patterns of {MAX_RULE_BYTES} bytes or more")
        rules.append(Rule(include, raw))
    return rules


def read_exclude_from(path: str | os.PathLike) -> list[str]:
    """The rules of an ``--exclude-from`` file as rsync reads them, one str per rule.

    Lines end at LF, CR or CRLF; empty lines and lines starting with ';' or '#' are
    skipped; nothing else is trimmed (a trailing space is part of the pattern, as in
    rsync). Names that are not UTF-8 survive as surrogate escapes. Raises InventoryError
    if the file cannot be read.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InventoryError(f"cannot read exclude file: {exc.strerror}", where=os.fsdecode(path),
                             hint="give a readable file of rsync exclude rules") from exc
    lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return [os.fsdecode(ln) for ln in lines if ln and ln[:1] not in (b";", b"#")]


def _class_bytes(p: bytes, i: int) -> tuple[set[int] | None, int]:
    """The bytes a '[' class at ``p[i]`` admits and the index after its ']'.

    Follows dowild's loop: the first member is literal even if it is ']'; None means the
    class aborts the match (unterminated, or an unknown [:name:]).
    """
    n = len(p)
    i += 1
    negate = i < n and p[i] in b"!^"
    if negate:
        i += 1
    members: set[int] = set()
    prev = 0
    first = True
    while first or (i < n and p[i] != ord("]")):
        first = False
        if i >= n:
            return None, n
        ch = p[i]
        if ch == ord("\\"):
            i += 1
            if i >= n:
                return None, n
            ch = p[i]
            members.add(ch)
        elif ch == ord("-") and prev and i + 1 < n and p[i + 1] != ord("]"):
            i += 1
            hi = p[i]
            if hi == ord("\\"):
                i += 1
                if i >= n:
                    return None, n
                hi = p[i]
            members.update(range(prev, hi + 1))
            ch = 0  # no range may start at a range's end
        elif ch == ord("[") and i + 1 < n and p[i + 1] == ord(":"):
            end = p.find(b"]", i + 2)
            if end < 0:
                return None, n
            if end - (i + 2) - 1 < 0 or p[end - 1] != ord(":"):
                members.add(ch)  # no ':]': an ordinary '['
            else:
                cls = _POSIX.get(p[i + 2:end - 1])
                if cls is None:
                    return None, n
                members |= cls
                i = end
                ch = 0
        else:
            members.add(ch)
        prev = ch
        i += 1
    if i >= n:
        return None, n
    allowed = (set(range(256)) - members) if negate else members
    allowed.discard(_SLASH)  # a class never matches '/'
    return allowed, i + 1


def _byte_class(allowed: set[int]) -> bytes:
    if not allowed:
        return _NEVER
    return b"[" + b"".join(re.escape(bytes([c])) for c in sorted(allowed)) + b"]"


def _wild_regex(p: bytes) -> bytes:
    """dowild's pattern language as a regex over bytes (fullmatch, DOTALL)."""
    out: list[bytes] = []
    i, n = 0, len(p)
    while i < n:
        c = p[i]
        if c == ord("*"):
            j = i
            while j < n and p[j] == ord("*"):
                j += 1
            out.append(b".*" if j - i > 1 else b"[^/]*")
            i = j
            continue
        if c == ord("?"):
            out.append(b"[^/]")
        elif c == ord("["):
            allowed, i = _class_bytes(p, i)
            if allowed is None:
                return _NEVER
            out.append(_byte_class(allowed))
            continue
        elif c == ord("\\"):
            i += 1
            if i >= n:
                return _NEVER  # a trailing backslash matches no character
            out.append(re.escape(p[i:i + 1]))
        else:
            out.append(re.escape(p[i:i + 1]))
        i += 1
    return b"".join(out)


def _compile_rule(pattern: bytes) -> tuple[bytes, bytes | None]:
    """(regex for a non-directory or None, regex for a directory), both fullmatched
    against ``b'/' + relpath`` (a directory's text also ends in '/').

    One text for every rule is what lets all rules share one regex: rsync's three texts
    (the name; the path; '/' + the path for a leading '**') and three placements (whole
    text; the last slash_cnt+1 components; after any '/') all become "after some '/'"
    or "after the first '/'". A directory's trailing '/' is what rsync appends for a
    ``***`` suffix; every other rule must match before it.
    """
    dirs_only = len(pattern) > 1 and pattern.endswith(b"/")
    if dirs_only:
        pattern = pattern[:-1]
    slash_cnt = pattern.count(b"/")
    wild = any(c in pattern for c in b"*[?")
    wild2 = wild and b"**" in pattern
    wild2_prefix = wild2 and pattern.startswith(b"**")
    wild3 = wild2 and pattern.endswith(b"***")
    anchored = pattern.startswith(b"/")
    if anchored:
        pattern = pattern[1:]
    body = _wild_regex(pattern) if wild else re.escape(pattern)
    if wild2_prefix:
        # rsync matches '**...' against '/' + path from its start
        file_rx = body
    elif anchored:
        file_rx = b"/" + body
    elif wild2 or not slash_cnt or not wild:
        # after any '/' (wild2), or the final component (no '/'), or a literal's trailing
        # components: in each, only a literal '/' or '**' matches '/'
        file_rx = b".*/" + body
    else:
        # rsync cuts the last slash_cnt+1 components first: a '/' inside '[...]' counts
        # there though it can never match, so pin where they start
        pin = b"(?:[^/]*/){%d}[^/]*" % slash_cnt
        return (None if dirs_only else b".*/(?=" + pin + rb"\Z)" + body,
                b".*/(?=" + pin + rb"/\Z)" + body + b"/")
    return None if dirs_only else file_rx, file_rx if wild3 else file_rx + b"/"


class ExcludeMatcher:
    """rsync's verdict on a relative path, from ``--exclude`` arguments in order.

    ``excluded(relpath, is_dir)`` is the same answer rsync's sender gives for a source
    entry and its receiver gives for a target entry (what ``--delete`` must leave alone).
    Raises InventoryError for a malformed rule (see ``parse_rules``).
    """

    __slots__ = ("patterns", "rules", "_file", "_dir", "_include")

    def __init__(self, patterns: Iterable[str | bytes] = ()):
        self.patterns: list[str | bytes] = list(patterns)
        self.rules = parse_rules(self.patterns)
        file_alts: list[bytes] = []
        dir_alts: list[bytes] = []
        file_incl: list[bool] = []
        dir_incl: list[bool] = []
        for rule in self.rules:
            file_rx, dir_rx = _compile_rule(rule.pattern)
            # one capturing group per rule: the first alternative that matches is the
            # first rule that matches, and lastindex names it
            dir_alts.append(b"(" + dir_rx + b")")
            dir_incl.append(rule.include)
            if file_rx is not None:
                file_alts.append(b"(" + file_rx + b")")
                file_incl.append(rule.include)
        self._file = re.compile(b"|".join(file_alts), re.S) if file_alts else None
        self._dir = re.compile(b"|".join(dir_alts), re.S) if dir_alts else None
        self._include = (file_incl, dir_incl)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def excluded(self, relpath: str | bytes, is_dir: bool) -> bool:
        """True if rsync leaves ``relpath`` (relative to the transfer root, '/'-separated)
        out; ``is_dir`` is the entry's own type (a symlink to a directory is not one)."""
        rx = self._dir if is_dir else self._file
        if rx is None:
            return False
        text = b"/" + (relpath.encode(_FS_ENC, _FS_ERR) if isinstance(relpath, str) else relpath)
        m = rx.fullmatch(text + b"/" if is_dir else text)
        return m is not None and not self._include[is_dir][m.lastindex - 1]

    def __repr__(self) -> str:
        return f"ExcludeMatcher({self.patterns!r})"
