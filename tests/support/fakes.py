"""A scripted transport for the fan-out's unit tests (rendezvous on a barrier, never a
sleep), and a stand-in for one node's ``tar -c`` (a compromised or slow node)."""

from __future__ import annotations

import os
import shutil
import threading

from legacy_transit.transport import UNREACHABLE, RunResult, Transport

__all__ = ["FakeTransport", "node_tar"]


def node_tar(bin_dir, host: str, instead: str) -> str:
    """A ``tar`` in ``bin_dir`` that runs the shell line ``instead`` when ``host``'s City
    Transit agent packs (``tar -c``; ``instead`` may end with ``exec cat FILE`` to send a
    crafted archive, or just wait), and the real tar otherwise. Returns a PATH value that
    puts it first."""
    os.makedirs(bin_dir, exist_ok=True)
    fake = os.path.join(bin_dir, "tar")
    with open(fake, "w") as f:
        f.write(f'#!/bin/sh\nif [ "$CHIBA_HOST" = {host} ] && [ "$1" = -c ]; then '
                f'{instead}; fi\nexec {shutil.which("tar")} "$@"\n')
    os.chmod(fake, 0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


class FakeTransport(Transport):
    """Scripted per-host behaviour; records the commands and how many ran at once.

    ``script`` maps host name -> ``(stdout, stderr, rc)``, an exception to raise, or
    ``"unreachable"``; other hosts print ``out``. With ``rendezvous=n`` every call waits
    on a barrier of ``n`` parties (``timeout`` s, then ``threading.BrokenBarrierError``),
    so a window of fewer than ``n`` concurrent calls fails the test instead of passing
    by luck of the scheduler.
    """

    def __init__(self, script=None, rendezvous: int | None = None, timeout: float = 30):
        self.script = script or {}
        self.barrier = threading.Barrier(rendezvous, timeout=timeout) if rendezvous else None
        self.active = self.peak = 0
        self.lock = threading.Lock()
        self.calls = []

    def run(self, host, cmd, timeout=None, env=None, stdin=None, on_stdout=None,
            on_stderr=None, cancel=None):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.calls.append((host.name, cmd, stdin))
        try:
            if self.barrier is not None:
                self.barrier.wait()
            beh = self.script.get(host.name, ("out\n", "", 0))
            if isinstance(beh, Exception):
                raise beh
            if beh == "unreachable":
                return RunResult(host.name, UNREACHABLE, error="connection refused")
            out, err, rc = beh
            r = RunResult(host.name, rc)
            for chunk in (out[:3], out[3:]):  # split mid-line, as a network would
                if on_stdout:
                    on_stdout(chunk.encode())
                else:
                    r.stdout += chunk.encode()
            if on_stderr:
                on_stderr(err.encode())
            else:
                r.stderr = err.encode()
            return r
        finally:
            with self.lock:
                self.active -= 1
