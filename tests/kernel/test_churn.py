"""Counts stay exact at full churn: every connection the load generator made is counted, no more."""

import subprocess

import pytest

from . import traffic
from .pace import SLOWDOWN, seconds

# Load: the full churn is what the emulated guests of make test-kernels cannot make (10-20 times
# slower), and what it checks of the kernel (every transition counted) test_counts checks there.
pytestmark = pytest.mark.host_only

SECONDS = 3


def test_exact_at_full_churn(netns, meter, churn):
    subprocess.run(["ip", "netns", "exec", netns.client, "sysctl", "-qw",
                    "net.ipv4.ip_local_port_range=10000 65535", "net.ipv4.tcp_tw_reuse=1"], check=True)
    server = subprocess.Popen(["ip", "netns", "exec", netns.server, churn, "server", netns.SERVER_ADDR, "5001", "2"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        out = subprocess.run(["ip", "netns", "exec", netns.client, churn, "client", netns.SERVER_ADDR, "5001",
                              str(SECONDS), "100000000", "2"], check=True, capture_output=True, text=True,
                             timeout=SECONDS + 30).stdout
        fields = dict(kv.split("=") for kv in out.split())
        made, failed = int(fields["made"]), int(fields["failed"])
        assert made > 10000 / SLOWDOWN, out  # a real churn, not a trickle
        assert failed == 0, out
        per_conn = traffic.CHURN_TRANSITIONS
        expected = {t: made for t in per_conn}
        expected[("CLOSE", "LISTEN")] = 1
        # The server may still hold queued connections: let it drain before stopping it,
        # or the kernel resets them when the listener closes.
        d = meter.settle(expected, timeout=10)
    finally:
        server.terminate()
        server.wait(timeout=seconds(5))
    skipped = d.misses["sock:inet_sock_set_state"]
    missing = {t: made - d.transitions.get(t, 0) for t in per_conn}
    lost = sum(missing.values())
    print(f"churn: {out.strip()}; transitions missing {lost} of {10 * made}; set_state runs the kernel "
          f"skipped {skipped}; resets {d.resets}")
    # Nothing is counted twice or invented.
    assert all(v >= 0 for v in missing.values()), missing
    assert set(d.transitions) == set(expected)
    # The kernel refuses to run a perf-attached tracepoint program while another BPF program
    # runs on the same CPU (a softirq landing on one of ours); it counts those runs, and so
    # does tcpstate_probe_misses_total. In most runs that accounts for every missing
    # transition; in some a further loss appears that the kernel does not count (seen: up
    # to 0.023%). Bound the unexplained part at 0.1% of events.
    assert lost - skipped <= 0.001 * 10 * made, (lost, skipped)
    if skipped == 0:
        assert d.transitions == expected
    assert d.opened["active"] == made - missing[("SYN_SENT", "ESTABLISHED")]
    assert d.handshakes == d.opened["active"]
    assert d.failures == {}
    # With tcp_tw_reuse the listener answers stray segments of reused 4-tuples with resets
    # (reason TCP_FLAGS on 6.18); none reaches a live socket, else a ->CLOSE would show above.
    print(f"churn: resets {d.resets}")
    assert all(direction == "sent" and state == "LISTEN" for direction, state, _ in d.resets), d.resets
