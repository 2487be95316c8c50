"""statepoll.py: poll each network namespace's socket tables in the background; scrapes read the last result."""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from dataclasses import dataclass
from typing import Callable

from monitor.sockets.forecast import TIME_WAIT_SECONDS, PortForecast, forecast
from monitor.sockets.kstats import (
    Limits,
    read_kernel_counters,
    read_limits,
    read_sockstat,
)
from monitor.sockets.netns import entered, label_for
from monitor.sockets.sockdiag import (
    SockDiagError,
    endpoint_label,
    one_walk_pays,
    open_socket,
)
from monitor.sockets.tally import Tally, poll
from monitor.tcp import NUMBERS as STATE_NUMBERS
from monitor.tcp import STATE_NAMES
from monitor.timing import Periodic

log = logging.getLogger(__name__)

DUMP_TIMEOUT = 10.0  # seconds a dump may stall before the poll of that namespace fails

# The states sock_diag reports (BOUND_INACTIVE sockets are not in the tables it walks).
REPORTED_STATES = tuple(STATE_NAMES[n] for n in range(1, 13))


@dataclass(frozen=True)
class Target:
    """A namespace to poll: path None is the daemon's own, labelled ""."""

    label: str
    path: str | None

    @classmethod
    def own(cls) -> "Target":
        return cls("", None)

    @classmethod
    def from_path(cls, path: str) -> "Target":
        return cls(label_for(path), path)


@dataclass(frozen=True)
class EndpointStat:
    remote: str  # "198.18.0.2:80"
    # Sockets on an ephemeral local port that no listener holds (a listener's accepted sockets
    # take no ephemeral port, and their peers are outsiders' choice): in TIME_WAIT / other states.
    time_wait: int
    other: int
    entry_rate: float  # TIME_WAIT entries per second over the forecast window
    forecast: PortForecast | None


@dataclass(frozen=True)
class NamespaceState:
    label: str
    sockets: dict  # state name -> sockets, every reported state
    time_wait_ports: tuple  # ((side, port label, sockets), ...): top N per side, then "other"
    limits: Limits
    kernel: dict  # metric suffix -> value
    endpoints: tuple  # EndpointStat, top N by max(in use, demand)
    duration_seconds: float
    cpu_seconds: float
    finished: float  # wall-clock time


def top_ports(side: str, tally, n: int) -> list:
    top, total = tally.top_ports(side, n)
    rest = total - sum(c for _, c in top)
    return [(side, str(port), c) for port, c in top] + [(side, "other", rest)]


def summarize(target: Target, tally: Tally, limits: Limits, kernel: dict, window: float, top_n: int,
              duration: float, cpu: float, finished: float) -> NamespaceState:
    """Turn one poll's raw tally into what the collector exports. window: the seconds of
    TIME_WAIT entries (tally.remote_recent) behind each endpoint's rate."""
    sockets = {name: tally.states.get(STATE_NUMBERS[name], 0) for name in REPORTED_STATES}
    ports = top_ports("local", tally, top_n) + top_ports("remote", tally, top_n)
    ranked = []
    for key in set(tally.remote_time_wait) | set(tally.remote_other):
        tw, other = tally.remote_time_wait.get(key, 0), tally.remote_other.get(key, 0)
        rate = tally.remote_recent.get(key, 0) / window
        fc = forecast(limits.usable_ports, tw, other, rate) if limits.usable_ports > 0 else None
        # Ties by (family, address, port), numerically: _tally.c ranks in this same order.
        ranked.append((-max(tw + other, fc.demand if fc else 0), key, EndpointStat(endpoint_label(key), tw, other,
                                                                                   rate, fc)))
    ranked.sort(key=lambda r: r[:2])
    return NamespaceState(target.label, sockets, tuple(ports), limits, kernel, tuple(e for _, _, e in ranked[:top_n]),
                          duration, cpu, finished)


class StatePoller:
    """Polls every target each interval in one background thread. results() returns the last
    successful poll per namespace without waiting; a namespace that fails is dropped from it
    (and logged once) until it can be polled again."""

    def __init__(self, targets: list[Target], interval: float, top_n: int, window: float = 30.0,
                 clock: Callable[[], float] = time.time):
        if not 0 < window <= TIME_WAIT_SECONDS:
            raise ValueError(f"forecast window must be in (0, {TIME_WAIT_SECONDS:g}] seconds")
        self.targets = list(targets)
        self.top_n = top_n
        self.window = window
        # A TIME_WAIT socket with more than this left on its timer entered within the window.
        self._recent_ms = round((TIME_WAIT_SECONDS - window) * 1000)
        self._clock = clock
        self._results: dict[str, NamespaceState] = {}
        self._errors: dict[str, int] = {t.label: 0 for t in self.targets}
        self._failing: set[str] = set()
        self._per_family = False
        self._loop = Periodic("state poll", self.poll_once, interval)

    def results(self) -> dict[str, NamespaceState]:
        return self._results  # replaced whole after each poll, never mutated

    def errors(self) -> dict[str, int]:
        return dict(self._errors)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def poll_once(self) -> None:
        results = {}
        for target in self.targets:
            state = self._poll_target(target)
            if state is not None:
                results[target.label] = state
        self._results = results

    def _poll_target(self, target: Target) -> NamespaceState | None:
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            with entered(target.path) if target.path else contextlib.nullcontext():
                limits = read_limits()
                kernel = read_kernel_counters()
                one_walk = one_walk_pays(read_sockstat())
                sock = open_socket()  # stays in the namespace it was made in
            with sock:
                sock.settimeout(DUMP_TIMEOUT)
                # The C counter ranks endpoints as summarize() will: by the forecast if there is one.
                rank_window = self.window if limits.usable_ports > 0 else 0.0
                tally = self._dump(sock, (limits.port_first, limits.port_last), one_walk, rank_window)
        except (OSError, ValueError) as exc:
            self._errors[target.label] += 1
            if target.label not in self._failing:
                self._failing.add(target.label)
                name = f"netns {target.label!r} ({target.path})" if target.path else "own netns"
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                log.warning("%s: cannot poll sockets: %s; its series are dropped until it can be polled again",
                            name, why)
            return None
        if target.label in self._failing:
            self._failing.discard(target.label)
            log.info("%s: polling again", f"netns {target.label!r}" if target.path else "own netns")
        return summarize(target, tally, limits, kernel, self.window, self.top_n,
                         time.perf_counter() - wall0, time.thread_time() - cpu0, self._clock())

    def _dump(self, sock, port_range, one_walk: bool, rank_window: float) -> Tally:
        if not self._per_family:
            try:
                return poll(sock, port_range, one_walk=one_walk, recent_ms=self._recent_ms, top_n=self.top_n,
                            rank_window=rank_window)
            except SockDiagError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP):
                    raise
                log.info("the kernel refused the one-walk TCPDIAG_GETSOCK dump (%s); dumping per family", exc)
                self._per_family = True
        return poll(sock, port_range, per_family=True, one_walk=one_walk, recent_ms=self._recent_ms,
                    top_n=self.top_n, rank_window=rank_window)
