"""offenders.py: decode the in-kernel offenders table into named peers and pick the top ones for an event."""

from __future__ import annotations

from dataclasses import dataclass

from monitor.kernel.abi import OFFENDER_KINDS, format_addr
from monitor.tcp import endpoint_text
from monitor.timing import WallClock, rfc3339


@dataclass(frozen=True)
class Peer:
    """Who a run of resets, failed connects or reuses was with. A port of None was the connecting
    end's ephemeral port, not kept (one peer hammering one service stays one entry)."""

    kind: str  # events.OFFENDER_KINDS
    remote: str | None  # None: the socket had no peer address (a listener's reset)
    remote_port: int | None
    local_port: int | None
    count: int  # since first_seen
    first_seen: float  # Unix seconds
    last_seen: float
    pid: int | None  # the process that opened the socket, when known
    comm: str | None

    def describe(self) -> str:
        """E.g. "198.18.0.1 to local port 9 (300 reset_sent)", "curl to 198.18.0.2:443 (12 ...)"."""
        remote = endpoint_text(self.remote or "an unknown peer", self.remote_port)
        who = f"{self.comm} (pid {self.pid}) to {remote}" if self.pid else remote
        if self.local_port is not None:
            who += f" {'from' if self.pid else 'to'} local port {self.local_port}"
        return f"{who} ({self.count} {self.kind.replace('_', ' ')})"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "remote": self.remote, "remote_port": self.remote_port,
                "local_port": self.local_port, "count": self.count, "first_seen": rfc3339(self.first_seen),
                "last_seen": rfc3339(self.last_seen), "pid": self.pid, "comm": self.comm}


def decode(items, clock: WallClock) -> list[Peer]:
    """items: (abi.OffenderKey, abi.Offender) pairs; clock turns the kernel's stamps to wall time."""
    peers = []
    for k, v in items:
        if v.count == 0:  # inserted by another CPU a moment ago, not yet counted
            continue
        kind = OFFENDER_KINDS[k.kind] if k.kind < len(OFFENDER_KINDS) else f"kind_{k.kind}"
        raw = bytes(k.raddr)
        # A listener's reset (an ACK to a listener, a failed SYN cookie) carries the listener's
        # own, empty, peer address: the tracepoint knows no better.
        remote = None if not any(raw) and k.rport == 0 else format_addr(k.family, raw)
        peers.append(Peer(kind=kind, remote=remote,
                          remote_port=k.rport or None, local_port=k.lport or None, count=int(v.count),
                          first_seen=clock.wall(v.first_ns), last_seen=clock.wall(v.last_ns),
                          pid=v.pid or None, comm=v.comm.decode(errors="replace") if v.pid else None))
    return peers


def top(peers: list[Peer], kinds: tuple, since: float, n: int) -> list[Peer]:
    """The n peers of these kinds seen since `since`, most counted first (ties: latest first)."""
    live = [p for p in peers if p.kind in kinds and p.last_seen >= since]
    live.sort(key=lambda p: (-p.count, -p.last_seen, p.remote or "", p.remote_port or 0, p.local_port or 0, p.kind))
    return live[:n]
