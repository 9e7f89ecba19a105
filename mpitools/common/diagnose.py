"""Open MPI 5 / PRRTE's own diagnosis in mpiexec's output: which rank or daemon died, where, why."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["RuntimeReport", "parse_runtime", "unwrap_blocks"]

# PRRTE and Open MPI print their help messages between lines of dashes, wrapped at about
# 72 columns: a rank and its host can sit on different lines ("... on node vm exited on\n
# signal 9 (Killed)."), so every pattern below runs over unwrapped paragraphs.
_RULE = re.compile(r"^\s*-{20,}\s*$")
_KEY_VALUE = re.compile(r"^\s+([A-Za-z][\w ]*?):\s+(\S.*?)\s*$")
_SIGNALLED = re.compile(r"process rank (\d+) with PID (\d+) on node (\S+) exited on signal "
                        r"(\d+)(?: \(([^)]*)\))?")
_EXITED = re.compile(r"process rank (\d+) with PID (\d+) on node (\S+) exited "
                     r"(?:with|on) (?:status|exit code) (\d+)")
_PROC_NAME = re.compile(r"\[[^\],]*,(\d+)\]")
_ABORT = re.compile(r"MPI_ABORT was invoked on rank (\d+)")
_NODE = re.compile(r"on node (\S+?)[.,:]?(?:\s|$)")
# ssh's own complaints (the launch agent's stderr is passed through by prterun)
_SSH_LINE = re.compile(r"^(?:ssh: .*|.*Permission denied \(publickey.*|Host key verification "
                       r"failed\.|.*REMOTE HOST IDENTIFICATION HAS CHANGED.*|"
                       r"No ED25519 host key is known for .*|.*Connection (?:refused|timed out|"
                       r"closed by remote host).*)$")
_SSH_HOST = re.compile(r"(?:connect to host|hostname|host key is known for) (\S+?)[ :]")


@dataclass(frozen=True)
class RuntimeReport:
    """What the MPI runtime said went wrong (empty fields when it said nothing).

    ``ranks``: rank number -> why (a process that exited or was killed, or aborted);
    ``daemons``: host as the runtime names it -> why (a PRRTE daemon that failed);
    ``ssh``: host or address -> ssh's own error line; ``explanation``: the first lines
    of the runtime's own text, unwrapped; ``daemon_crash``: a daemon died at start-up
    while ssh itself reported nothing (a crash, worth one retry).
    """

    ranks: dict[int, str] = field(default_factory=dict)
    daemons: dict[str, str] = field(default_factory=dict)
    ssh: dict[str, str] = field(default_factory=dict)
    explanation: list[str] = field(default_factory=list)
    daemon_crash: bool = False


def unwrap_blocks(text: str) -> list[list[str]]:
    """The help messages in ``text`` (between dashed rules) as lists of unwrapped lines.

    Indented ``Key: value`` lines stay lines of their own; other lines are joined into
    paragraphs (a blank line ends one).
    """
    blocks: list[list[str]] = []
    cur: list[str] | None = None
    para: list[str] = []

    def end_para() -> None:
        if para and cur is not None:
            cur.append(" ".join(para))
        para.clear()

    for raw in text.splitlines():
        if _RULE.match(raw):
            if cur is not None:
                end_para()
                if cur:
                    blocks.append(cur)
                cur = None
            else:
                cur = []
            continue
        if cur is None:
            continue
        if not raw.strip():
            end_para()
        elif _KEY_VALUE.match(raw):
            end_para()
            cur.append(raw.rstrip())
        else:
            para.append(raw.strip())
    if cur is not None:  # a block cut off by the tail: still worth reading
        end_para()
        if cur:
            blocks.append(cur)
    return blocks


def _keys(block: list[str]) -> dict[str, str]:
    out = {}
    for ln in block:
        m = _KEY_VALUE.match(ln)
        if m:
            out.setdefault(m.group(1).strip().lower(), m.group(2))
    return out


def _first_sentences(block: list[str], n: int = 2) -> list[str]:
    """The first ``n`` sentences of the block's first paragraph (its headline)."""
    para = next((ln for ln in block if not _KEY_VALUE.match(ln)), "")
    sentences = re.split(r"(?<=[.!?])\s+", para.strip())
    return [s for s in sentences[:n] if s]


def parse_runtime(text: str) -> RuntimeReport:
    """Parse mpiexec's stdout and stderr (either or both, any order) into a RuntimeReport.

    Best effort and pure: unknown messages leave the report empty rather than raise.
    """
    ranks: dict[int, str] = {}
    daemons: dict[str, str] = {}
    explanation: list[str] = []
    for block in unwrap_blocks(text):
        joined = " ".join(block)
        keys = _keys(block)
        lower = joined.lower()
        if "daemon" in lower and ("remote host" in keys or "failed to report back" in lower
                                  or "lost communication" in lower):
            host = keys.get("remote host")
            if host is None:
                m = _NODE.search(joined)
                host = m.group(1) if m else None
            status = keys.get("daemon exit status") or keys.get("exit status")
            why = "its MPI daemon (prted) " + (
                "failed to report back" if "report back" in lower
                else "lost contact with mpiexec" if "lost communication" in lower
                else "failed")
            if status:
                why += f" (exit status {status})"
            if host:
                daemons.setdefault(host, why)
        for m in _SIGNALLED.finditer(joined):
            sig = f"signal {m.group(4)}" + (f" ({m.group(5)})" if m.group(5) else "")
            ranks.setdefault(int(m.group(1)), f"process killed by {sig}")
        for m in _EXITED.finditer(joined):
            ranks.setdefault(int(m.group(1)), f"process exited with status {m.group(4)}")
        if "process name" in keys:
            m = _PROC_NAME.search(keys["process name"])
            if m:
                code = keys.get("exit code")
                ranks.setdefault(int(m.group(1)), f"process exited with status {code}"
                                 if code else "process died")
        for m in _ABORT.finditer(joined):
            ranks.setdefault(int(m.group(1)), "rank aborted the job (see its error above)")
        if not explanation and (daemons or ranks):
            explanation = _first_sentences(block)
    # outside the help blocks: a rank abort printed as a single line, ssh's complaints
    for m in _ABORT.finditer(text):
        ranks.setdefault(int(m.group(1)), "rank aborted the job (see its error above)")
    ssh: dict[str, str] = {}
    for raw in text.splitlines():
        ln = raw.strip()
        if _SSH_LINE.match(ln):
            m = _SSH_HOST.search(ln)
            ssh.setdefault(m.group(1) if m else "", ln)
    crash = bool(daemons) and not ssh
    return RuntimeReport(ranks, daemons, ssh, explanation, crash)
