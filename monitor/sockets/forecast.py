"""forecast.py: the steady-state demand on a remote endpoint's ephemeral ports, and when they would run out.

The model (README, "Port-exhaustion forecast"): every connect to one remote endpoint
(address, port) from one local address needs its own local port. A port stays taken while
the connection is open and, when this side closes first, for the TIME_WAIT lifetime T after.
With connections to the endpoint entering TIME_WAIT at rate r (per second; the poll reads it
off the TIME_WAIT timers, statepoll.py) and O sockets otherwise holding a port (open,
closing, connecting), the ports taken settle at

    demand = r * T + O                      (Little's law: arrivals x time held)
    utilization = min(1, demand / P)        P = ports in net.ipv4.ip_local_port_range, less ip_local_reserved_ports

If demand >= P, the ports run out. Now N = W + O are taken (W in TIME_WAIT). The W sockets
entered TIME_WAIT over the last T seconds; taking their expiries as spread evenly, they free
W / T ports per second while r per second are taken, so

    seconds_to_exhaustion = (P - N) / (r - W / T)       (0 once N >= P)

and r - W/T > 0 whenever demand >= P > N. Below demand P there is no exhaustion at this rate.
"""

from __future__ import annotations

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
