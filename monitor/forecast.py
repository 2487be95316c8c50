"""forecast.py: the steady-state demand on a remote endpoint's ephemeral ports, and when they would run out.

The model (README, "Port-exhaustion forecast"): every connect to one remote endpoint
(address, port) from one local address needs its own local port. A port stays taken while
the connection is open and, when this side closes first, for the TIME_WAIT lifetime T after.
With connections to the endpoint entering TIME_WAIT at rate r (per second) and O sockets
otherwise holding a port (open, closing, connecting), the ports taken settle at

    demand = r * T + O                      (Little's law: arrivals x time held)
    utilization = min(1, demand / P)        P = size of net.ipv4.ip_local_port_range

If demand >= P, the ports run out. Now N = W + O are taken (W in TIME_WAIT). The W sockets
entered TIME_WAIT over the last T seconds; taking their expiries as spread evenly, they free
W / T ports per second while r per second are taken, so

    seconds_to_exhaustion = (P - N) / (r - W / T)       (0 once N >= P)

and r - W/T > 0 whenever demand >= P > N. Below demand P there is no exhaustion at this rate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

TIME_WAIT_SECONDS = 60.0  # TCP_TIMEWAIT_LEN: fixed in Linux, not a sysctl


@dataclass(frozen=True)
class PortForecast:
    in_use: int  # ports taken now: W + O
    demand: float  # ports taken in the steady state at the current rate
    utilization: float  # demand / ports, at most 1
    seconds_to_exhaustion: float | None  # None: the ports do not run out at this rate


def forecast(ports: int, time_wait: int, other: int, entry_rate: float,
             lifetime: float = TIME_WAIT_SECONDS) -> PortForecast:
    """ports: P; time_wait: W; other: O; entry_rate: r (TIME_WAIT entries per second)."""
    if ports <= 0 or entry_rate < 0 or lifetime <= 0:
        raise ValueError(f"need ports > 0, entry_rate >= 0, lifetime > 0 (got {ports}, {entry_rate}, {lifetime})")
    in_use = time_wait + other
    demand = entry_rate * lifetime + other
    utilization = min(1.0, demand / ports)
    if in_use >= ports:
        seconds = 0.0
    elif demand < ports:
        seconds = None
    else:
        seconds = (ports - in_use) / (entry_rate - time_wait / lifetime)
    return PortForecast(in_use, demand, utilization, seconds)


class RateWindow:
    """Per-key rates of monotonic counters over a sliding window of samples. A key whose count
    went down (its LRU slot was reused) restarts from 0."""

    def __init__(self, window_seconds: float):
        if window_seconds <= 0:
            raise ValueError("window must be positive")
        self.window = window_seconds
        self._samples: deque = deque()  # (time, {key: count})

    def update(self, now: float, counts: dict) -> dict | None:
        """Add a sample; return key -> rate per second over the window, or None until two
        samples exist. Keys seen only now count from 0 at the window's start."""
        self._samples.append((now, dict(counts)))
        # Keep the newest sample at or before the window's start as the base.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()
        if len(self._samples) < 2:
            return None
        base_time, base = self._samples[0]
        elapsed = now - base_time
        if elapsed <= 0:
            return None
        rates = {}
        for key, count in counts.items():
            before = base.get(key, 0)
            rates[key] = (count - before if count >= before else count) / elapsed
        return rates
