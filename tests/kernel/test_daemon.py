"""The installed commands as processes: `tcpstate run` scraped over HTTP, `watch`, `check`."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from . import traffic
from .netns import netns_path
from .pace import seconds

TCPSTATE = str(Path(sys.executable).parent / "tcpstate")
# What a readiness poll may meet while the daemon starts: nothing listening yet, or a connection
# ended before its answer was whole. Either means "not ready yet", as for a Kubernetes probe.
NOT_READY = (OSError, http.client.HTTPException)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=seconds(5)) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def transition(text, old, new):
    return samples(text).get(("tcpstate_transitions_total", (("from_state", old), ("to_state", new))), 0)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + seconds(timeout)
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if get(base + "/-/ready")[0] == 200:
                return
        except NOT_READY:
            pass
        time.sleep(0.1)
    raise AssertionError("tcpstate run never became ready")


def test_run_serves_metrics_and_stops_on_sigterm(netns, layout):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([TCPSTATE, "run", "--listen-address", f"127.0.0.1:{port}",
                             "--include-cidr", "198.18.0.0/15", "--state-interval", "0.5",
                             "--netns", netns_path(netns.client), "--netns", "/nonexistent/netns"],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(base, proc)
        assert get(base + "/-/healthy") == (200, "OK\n")
        status, page = get(base + "/")
        assert status == 200 and "/metrics" in page and "198.18.0.0/15" in page
        assert get(base + "/nope")[0] == 404
        before = get(base + "/metrics")[1]
        n = 20
        with traffic.Listener(netns.server, netns.SERVER_ADDR) as lst:
            traffic.client_closes_first(netns.client, lst, n)
        deadline = time.monotonic() + seconds(10)
        while time.monotonic() < deadline:
            after = get(base + "/metrics")[1]
            if transition(after, "LAST_ACK", "CLOSE") - transition(before, "LAST_ACK", "CLOSE") >= n:
                break
            time.sleep(0.1)
        for old, new in [("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"), ("FIN_WAIT2", "TIME_WAIT"),
                         ("SYN_RECV", "ESTABLISHED"), ("LAST_ACK", "CLOSE")]:
            assert transition(after, old, new) - transition(before, old, new) == n, (old, new)
        s = samples(after)
        attached = {dict(labels)["tracepoint"]: v for (name, labels), v in s.items() if name == "tcpstate_probe_attached"}
        assert attached == {tp: float(ok) for tp, ok in layout.probe_states().items()}
        assert attached["sock:inet_sock_set_state"] == 1 and attached["tcp:tcp_send_reset"] == 1
        # The socket-table poll of the client's namespace sees the n TIME_WAIT sockets just made;
        # the missing namespace only costs errors.
        deadline = time.monotonic() + seconds(10)
        while time.monotonic() < deadline:
            s = samples(get(base + "/metrics")[1])
            if s.get(("tcpstate_sockets", (("netns", netns.client), ("state", "TIME_WAIT"))), 0) >= n:
                break
            time.sleep(0.1)
        assert s[("tcpstate_sockets", (("netns", netns.client), ("state", "TIME_WAIT")))] >= n
        assert s[("tcpstate_state_poll_errors_total", (("netns", "/nonexistent/netns"),))] >= 1
        assert ("tcpstate_sockets", (("netns", "/nonexistent/netns"), ("state", "TIME_WAIT"))) not in s
        assert s[("tcpstate_sockets", (("netns", ""), ("state", "LISTEN")))] >= 1  # the daemon's own
        promtool = shutil.which("promtool")
        assert promtool, "promtool missing: make setup installs it"
        check = subprocess.run([promtool, "check", "metrics"], input=after, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    finally:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=seconds(10))
        took = time.monotonic() - t0
    err = proc.stderr.read()
    assert rc == 0, err
    assert took < seconds(2.0), f"took {took:.2f}s to stop"  # systemd's unit allows no more
    assert "netns '/nonexistent/netns' (/nonexistent/netns): cannot poll sockets" in err


def test_watch_streams_json_with_process(netns, layout):
    proc = subprocess.Popen([TCPSTATE, "watch", "--json", "--include-cidr", "198.18.0.0/15"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + seconds(60)
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "watch exited before it was ready"
            if "watching" in line:
                break
        n = 5
        with traffic.Listener(netns.server, netns.SERVER_ADDR) as lst:
            traffic.client_closes_first(netns.client, lst, n)
        traffic.refused(netns.client, netns.SERVER_ADDR, 9, 1)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=seconds(10))
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    transitions = [e for e in events if e["kind"] == "transition"]
    assert len(transitions) == 10 * n + 2 + 2  # n connections, the listener, the refused connect
    syn = [e for e in transitions if e["newstate"] == "SYN_SENT"]
    assert len(syn) == n + 1
    comm = Path("/proc/self/comm").read_text().strip()
    assert all(e["pid"] == os.getpid() and e["comm"] == comm for e in syn)
    est = [e for e in transitions if e["oldstate"] == "SYN_SENT" and e["newstate"] == "ESTABLISHED"]
    assert all(e["saddr"] == netns.CLIENT_ADDR and e["daddr"] == netns.SERVER_ADDR for e in est)
    assert all(e["prev_state_us"] is not None for e in est)
    resets = [(e["kind"], e["state"], e["reason"]) for e in events if e["kind"] != "transition"]
    assert sorted(resets) == [("reset_received", "SYN_SENT", "UNKNOWN")] + \
        ([("reset_sent", "NONE", "NO_SOCKET")] if layout.nosock_resets_source else [])
    assert "lost" not in err


@pytest.mark.host_only  # tests/vm/guest.sh runs check in every guest before the suite
def test_check_passes_here():
    res = subprocess.run([TCPSTATE, "check"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert any(line.startswith("OK   tracepoint sock:inet_sock_set_state") for line in lines)
    assert any(line.startswith("OK   test compile") for line in lines)
    assert "OK   socket-table counter: C helper loaded from " in res.stdout  # make setup built it
    assert lines[-1] == "tcpstate run would work"
