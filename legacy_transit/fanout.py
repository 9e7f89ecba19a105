"""pdsh-style fan-out: a sliding window of threads, per-host outcomes, labelled lines, dshbak grouping."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TypeVar

from chiba_admin.outcome import CallOutcome, CommandHost, CommandRun

from .transport import UNREACHABLE, Command, RunResult, Stdin, Transport

__all__ = [
    "DEFAULT_FANOUT",
    "GroupResult",
    "OutputGroup",
    "LineSplitter",
    "window",
    "run_on",
    "group_outputs",
    "compact_rc",
]

DEFAULT_FANOUT = 32  # pdsh's default window (-f)

T = TypeVar("T")
LineHook = Callable[[str, str, str], None]  # (host, "stdout"|"stderr", line)


def compact_rc(codes: Iterable[int]) -> int:
    """One exit status for many, as ``pdsh -S``: the largest (0 when none)."""
    return max(codes, default=0)


class GroupResult(CommandRun):
    """Every host's RunResult of one fan-out as a run's outcome; nothing raised halfway.

    ``results`` keeps each host's RunResult (raw bytes, for grouping); ``hosts`` are their
    CommandHost outcomes, ``rc`` is pdsh -S's (an unreachable host counts as 255).
    """

    def __init__(self, results: dict[str, RunResult] | None = None):
        self.results: dict[str, RunResult] = dict(results or {})
        failed = {h: r for h, r in self.results.items() if not r.ok}
        super().__init__(
            method="run", ok=not failed,
            hosts={h: CommandHost(rc=r.rc, ok=r.ok, error=r.error, seconds=round(r.seconds, 6),
                                  stdout=r.out, stderr=r.err) for h, r in self.results.items()},
            failures={h: r.reason() for h, r in failed.items()},
            rc=compact_rc(UNREACHABLE if r.error else r.rc for r in self.results.values()))

    @property
    def succeeded(self) -> dict[str, RunResult]:
        return {h: r for h, r in self.results.items() if r.ok}

    @property
    def failed(self) -> dict[str, RunResult]:
        return {h: r for h, r in self.results.items() if not r.ok}


def window(hosts: Sequence, fn: Callable[[object], T], fanout: int = DEFAULT_FANOUT,
           on_done: Callable[[CallOutcome[T]], None] | None = None
           ) -> dict[str, CallOutcome[T]]:
    """Call ``fn(host)`` for every host, at most ``fanout`` at once; one CallOutcome per
    host (its value, or the exception ``fn`` raised), in the caller's host order.

    A sliding window like ``pdsh -f``: a slot is refilled as soon as any host finishes, so one
    slow host holds one slot, not the whole batch. ``on_done(outcome)`` runs in the worker
    thread as each host finishes.
    """
    if not hosts:
        return {}
    out: dict[str, CallOutcome[T]] = {}
    lock = threading.Lock()

    def one(h) -> None:
        try:
            got = CallOutcome(h.name, fn(h))
        except Exception as e:  # a fan-out never raises halfway
            got = CallOutcome(h.name, exc=e)
        with lock:
            out[h.name] = got
        if on_done is not None:
            on_done(got)

    with ThreadPoolExecutor(max_workers=max(1, min(fanout, len(hosts))),
                            thread_name_prefix="fanout") as pool:
        list(pool.map(one, hosts))
    return {h.name: out[h.name] for h in hosts}


class LineSplitter:
    """Turns one stream's chunks into whole lines for a hook; ``flush`` emits a last partial line."""

    def __init__(self, host: str, stream: str, hook: LineHook):
        self.host, self.stream, self.hook = host, stream, hook
        self._buf = b""

    def __call__(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for ln in lines:
            self.hook(self.host, self.stream, ln.decode("utf-8", "replace"))

    def flush(self) -> None:
        if self._buf:
            buf, self._buf = self._buf, b""
            self.hook(self.host, self.stream, buf.decode("utf-8", "replace"))


def run_on(transport: Transport, hosts: Sequence, cmd: Command, *,
           fanout: int = DEFAULT_FANOUT, timeout: float | None = None,
           env: dict[str, str] | None = None, stdin: Stdin = None,
           on_line: LineHook | None = None,
           on_result: Callable[[RunResult], None] | None = None) -> GroupResult:
    """Run ``cmd`` on every host through ``transport`` in a window; never raises for a host.

    ``on_line(host, stream, line)`` sees output as it arrives (for ``host: line`` printing);
    the full output is kept in each RunResult either way, for grouping afterwards.
    """
    if isinstance(stdin, (bytes, str)) or stdin is None:
        data = stdin
    else:  # one file object cannot feed many hosts: read it once
        data = stdin.read()

    def one(h) -> RunResult:
        if on_line is None:
            return transport.run(h, cmd, timeout=timeout, env=env, stdin=data)
        outs, errs = [], []
        so = LineSplitter(h.name, "stdout", on_line)
        se = LineSplitter(h.name, "stderr", on_line)

        def o(b):
            outs.append(b)
            so(b)

        def e(b):
            errs.append(b)
            se(b)

        r = transport.run(h, cmd, timeout=timeout, env=env, stdin=data,
                          on_stdout=o, on_stderr=e)
        so.flush()
        se.flush()
        r.stdout, r.stderr = b"".join(outs), b"".join(errs)
        return r

    def done(got: CallOutcome[RunResult]) -> None:
        if on_result is not None and got.ok:
            on_result(got.value)

    # a call that raised is a bug or an unexpected library error: that host is unreachable
    return GroupResult({name: got.value if got.ok else RunResult(name, UNREACHABLE,
                                                                 error=got.error)
                        for name, got in window(hosts, one, fanout, done).items()})


@dataclass
class OutputGroup:
    """Hosts whose output was byte-for-byte identical (a ``dshbak -c`` block).

    ``nodeset`` is folded; ``data`` is the raw bytes the hosts agreed on, ``output`` their
    text for display (undecodable bytes replaced, so two groups may look alike).
    """

    hosts: list[str]
    nodeset: str
    data: bytes
    rc: int = 0

    @property
    def output(self) -> str:
        return self.data.decode("utf-8", "replace")


def group_outputs(group: GroupResult, *, stream: str = "stdout",
                  fold: Callable[[list[str]], str] | None = None) -> list[OutputGroup]:
    """Hosts with identical output gathered into blocks, largest first (grouping as data).

    ``stream`` "stdout" (clush -b): one block per distinct (stdout bytes, exit code); a host
    that could not run and printed nothing is left out, its error is reported elsewhere.
    ``stream`` "stderr": one block per distinct stderr bytes (``rc`` 0), hosts with none
    left out. Comparison is on raw bytes, never on decoded text.
    """
    if stream not in ("stdout", "stderr"):
        raise ValueError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
    if fold is None:
        from ClusterShell.NodeSet import NodeSet

        def fold(names):
            return str(NodeSet.fromlist(names))

    buckets: dict[tuple[bytes, int], list[str]] = {}
    for name, r in group.results.items():
        if stream == "stderr":
            if r.stderr:
                buckets.setdefault((r.stderr, 0), []).append(name)
        elif r.stdout or not r.error:
            buckets.setdefault((r.stdout, UNREACHABLE if r.error else r.rc), []).append(name)
    order = {n: i for i, n in enumerate(group.results)}
    groups = [OutputGroup(sorted(hs, key=order.__getitem__), fold(hs), data, rc)
              for (data, rc), hs in buckets.items()]
    groups.sort(key=lambda g: (-len(g.hosts), order[g.hosts[0]]))
    return groups
