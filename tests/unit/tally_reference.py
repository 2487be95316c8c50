"""tally_reference.py: a socket-table tally in plain Counters: the reference the C counter is checked against, and recorded data for the poller's tests."""

from collections import Counter
from dataclasses import dataclass, field

from monitor.sockets.tally import top_of


@dataclass
class Reference:
    """The counts of monitor.sockets.tally.Tally (which see), as plain Counters."""

    recent_ms: int | None = None
    states: Counter = field(default_factory=Counter)
    tw_local: Counter = field(default_factory=Counter)
    tw_remote: Counter = field(default_factory=Counter)
    remote_time_wait: Counter = field(default_factory=Counter)
    remote_other: Counter = field(default_factory=Counter)
    remote_recent: Counter = field(default_factory=Counter)

    def port_counts(self, side: str) -> Counter:
        return self.tw_local if side == "local" else self.tw_remote

    def top_ports(self, side: str, n: int) -> tuple[list, int]:
        return top_of(self.port_counts(side), n)
