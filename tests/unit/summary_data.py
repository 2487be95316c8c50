"""Recorded inputs of summary.build (two counter reads 10 s apart, a poll of two namespaces, a firing anomaly) and the summary they give."""

from __future__ import annotations

import ipaddress

from monitor.detect.event import Event
from monitor.kernel.counters import Counts
from monitor.settings import Filters
from monitor.sockets.kstats import Limits
from monitor.sockets.poller import REPORTED_STATES, NamespaceState

T0 = 1_800_000_000.0
KERNEL = {"release": "6.18.0-test", "send_reset_layout": "sockaddr",
          "probes": {"tcp:tcp_send_reset": True, "sock:inet_sock_set_state": True, "tcp:tcp_receive_reset": False},
          "signals": [{"name": "transitions", "source": "sock:inet_sock_set_state", "missing": None},
                      {"name": "resets received", "source": None,
                       "missing": "received resets are not counted and resets do not stop TIME_WAIT inference"}]}
FILTERS = Filters(include_cidrs=(ipaddress.ip_network("198.18.0.0/15"),), include_ports=(80, 443))


def counts(scale: int, syn_retransmits: bool = False) -> Counts:
    """Counters after `scale` rounds of recorded traffic: per round, 2 connections that closed
    client first, 1 refused connect, 1 abort, and an odd transition outside the figure."""
    c = Counts()
    for edge in (("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"), ("ESTABLISHED", "FIN_WAIT1"),
                 ("FIN_WAIT1", "FIN_WAIT2"), ("FIN_WAIT2", "TIME_WAIT"), ("LISTEN", "SYN_RECV"),
                 ("SYN_RECV", "ESTABLISHED"), ("ESTABLISHED", "CLOSE_WAIT"), ("CLOSE_WAIT", "LAST_ACK"),
                 ("LAST_ACK", "CLOSE")):
        c.transitions[edge] = 2 * scale
    c.transitions[("CLOSE", "SYN_SENT")] += 2 * scale
    c.transitions[("SYN_SENT", "CLOSE")] = scale
    c.transitions[("SYN_RECV", "FIN_WAIT1")] = 1
    c.resets = {("sent", "NONE", "NO_SOCKET"): scale, ("received", "SYN_SENT", "UNKNOWN"): scale,
                ("sent", "ESTABLISHED", "TCP_STATE"): 3 * scale}
    c.failures = {"refused": scale, "timeout": 0, "reset": 0, "other": 0}
    c.port_reuse = {"client": 1, "server": 0}
    c.resets_after_handshake = {("sent", "client"): scale, ("sent", "server"): 0, ("received", "client"): 0,
                                ("received", "server"): scale}
    if syn_retransmits:
        c.syn_retransmits = {"client": 4 * scale, "server": 0}
    return c


def namespace(label: str, time_wait: int, listen: int) -> NamespaceState:
    sockets = {name: 0 for name in REPORTED_STATES}
    sockets.update(TIME_WAIT=time_wait, LISTEN=listen, ESTABLISHED=3, NEW_SYN_RECV=1)
    ports = (("local", "80", time_wait - 1), ("local", "other", 1), ("remote", "5432", 1), ("remote", "other", 0))
    return NamespaceState(label, sockets, ports, Limits(262144, 32768, 60999), {}, (), 0.01, 0.005, T0 + 9.5)


def inputs(syn_retransmits: bool = False) -> dict:
    """The keyword arguments of summary.build."""
    firing = Event(T0 + 8, "connect_failures", "firing", "warning", "40% of 20 connects failed over 8 s",
                   0.4, 0.1, 30.0, {"top_offenders": [
                       {"kind": "connect_failure", "remote": "198.18.0.2", "remote_port": 9, "local_port": None,
                        "count": 10, "first_seen": "2027-01-15T08:00:00.000Z",
                        "last_seen": "2027-01-15T08:00:08.000Z", "pid": 4242, "comm": "curl"}]})
    return {"span": ((T0, counts(10, syn_retransmits)), (T0 + 10, counts(30, syn_retransmits))),
            "namespaces": {"": namespace("", 41, 2), "blue": namespace("blue", 0, 1)},
            "anomalies": [firing], "kernel": KERNEL, "filters": FILTERS, "version": "0.1.0"}
