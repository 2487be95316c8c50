"""`tcpstate run` under load and faults (issue #6): a 30 s reset storm at full rate, 50 concurrent
scrapes during churn, and SIGKILL then restart leaving nothing behind in the kernel."""

import functools
import json
import signal
import statistics
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.kernel.probes import program_name
from monitor.kernel.tracefs import detect_layout, ensure_tracefs

from . import traffic
from .daemon import Daemon
from .test_daemon import get, samples

pytestmark = pytest.mark.host_only  # packaging or load: make test-kernels' guests skip it (README, "Tests")

BPFTOOL = "/usr/sbin/bpftool"


@functools.lru_cache(maxsize=None)
def used_tracepoints() -> tuple:
    """The tracepoints the daemon attaches on this kernel (group:name)."""
    return tuple(tp for tp, ok in detect_layout(ensure_tracefs()).probe_states().items() if ok)


# A client that closes first: 5 transitions on each end (KERNEL-NOTES; the daemon names
# FIN_WAIT2->CLOSE into TIME_WAIT as FIN_WAIT2->TIME_WAIT).
PER_CONN = traffic.CHURN_TRANSITIONS
# The kernel sometimes loses a run it does not count as a miss (test_churn saw up to 0.023%):
# the unexplained shortfall may be this fraction of the events, never an excess.
UNEXPLAINED = 0.001


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def deltas_of(after: dict, before: dict, name: str) -> dict:
    """Non-zero changes of one metric, by its labels."""
    out = {}
    for (n, labels), v in after.items():
        if n == name and v - before.get((n, labels), 0):
            out[labels] = v - before.get((n, labels), 0)
    return out


def misses(after: dict, before: dict) -> dict:
    return {tp: delta(after, before, "tcpstate_probe_misses_total", tracepoint=tp) for tp in used_tracepoints()}


def churn_result(out: str) -> dict:
    return {k: float(v) for k, v in (kv.split("=") for kv in out.split())}


# --- 1. A reset storm at full rate -------------------------------------------------------------

STORM_SECONDS = 30
WINDOW, HOLD_DOWN, TICK = 2.0, 2.0, 0.5
RSS_WARMUP = 5  # seconds of the storm before RSS must be flat
# Measured: +0.1 MB from 5 s to the end of a 2.9M-connect storm (+0.65 MB from the start).
# 4 MB is 40x that, and less than 1.5 bytes per refused connect: a per-event leak shows.
RSS_GROWTH_KB = 4 * 1024
REFUSED_PORT = 9  # nothing listens in the server's namespace


def read_events(path: Path, seen: list) -> None:
    """Append (time first seen, event) for every line written since the last call."""
    if not path.exists():
        return
    lines = path.read_text().split("\n")[:-1]  # only whole lines: the last may be mid-write
    now = time.monotonic()
    for line in lines[len(seen):]:
        seen.append((now, json.loads(line)))


def test_reset_storm_at_full_rate(netns, churn, tmp_path):
    events_path = tmp_path / "events.jsonl"
    d = Daemon(tmp_path, "--events", str(events_path), "--set", f"anomaly.interval_seconds={TICK}",
               "--set", f"rst_storm.window_seconds={WINDOW}", "--set", f"rst_storm.hold_down_seconds={HOLD_DOWN}")
    client = None
    rss, scrapes, events = [], [], []  # (seconds into the storm, kB); (seconds, latency); (t, event)
    try:
        d.wait_ready()
        before = d.metrics()
        rss_before = rss_kb(d.pid)
        t0 = time.monotonic()
        client = subprocess.Popen(["ip", "netns", "exec", netns.client, churn, "client", netns.SERVER_ADDR,
                                   str(REFUSED_PORT), str(STORM_SECONDS), "1000000000", "2"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        next_rss = t0
        while client.poll() is None:
            assert time.monotonic() - t0 < STORM_SECONDS + 15, "churn client overran its time"
            assert d.proc.poll() is None, f"daemon died in the storm: {d.log()}"
            now = time.monotonic()
            if now >= next_rss:
                rss.append((round(now - t0, 1), rss_kb(d.pid)))
                next_rss += 1.0
            t = time.monotonic()
            status, body = get(d.base + "/metrics")
            took = time.monotonic() - t
            assert status == 200, body
            assert ("tcpstate_probe_attached", (("tracepoint", "tcp:tcp_send_reset"),)) in samples(body)
            scrapes.append((round(t - t0, 1), took))
            read_events(events_path, events)
            time.sleep(max(0.0, 0.5 - (time.monotonic() - t)))
        t_end = time.monotonic()
        out, err = client.communicate(timeout=5)
        assert client.returncode == 0, err
        r = churn_result(out)
        failed = int(r["failed"])
        time.sleep(0.3)  # every count happens before connect() returns; this only lets an excess show
        after = d.metrics()
        # Resolves after the window has emptied and the hold-down has passed.
        deadline = t_end + WINDOW + HOLD_DOWN + 2 * TICK + 3.0
        while time.monotonic() < deadline and not any(
                e["kind"] == "rst_storm" and e["status"] == "resolved" for _, e in events):
            time.sleep(0.1)
            read_events(events_path, events)
        assert d.proc.poll() is None, f"daemon died after the storm: {d.log()}"
        rss_after = rss_kb(d.pid)
    finally:
        if client is not None:
            stop_process(client)
        rc = d.stop()
    assert rc == 0, d.log()

    lat = [s for _, s in scrapes]
    storm = [(round(t - t0, 1), e["status"]) for t, e in events if e["kind"] == "rst_storm"]
    print(f"\nstorm: {out.strip()} (churn client, 2 threads, refused connects)")
    print(f"storm: RSS kB before {rss_before}, per second {rss}, after {rss_after}")
    print(f"storm: {len(lat)} scrapes, latency median {statistics.median(lat) * 1000:.0f} ms, "
          f"max {max(lat) * 1000:.0f} ms")
    print(f"storm: rst_storm events (s into the storm, status) {storm}; storm ended at {t_end - t0:.1f} s")
    assert r["made"] == 0, out  # every connect was refused
    assert failed > 100_000, out  # a storm, not a trickle

    # Scrapes every ~0.5 s all answered (the loop asserted each was a 200 that parsed).
    assert len(scrapes) >= STORM_SECONDS, scrapes

    # RSS: flat after the warm-up.
    steady = [kb for t, kb in rss if t >= RSS_WARMUP]
    assert len(steady) >= STORM_SECONDS - RSS_WARMUP - 2, rss
    assert max(steady + [rss_after]) - min(steady) <= RSS_GROWTH_KB, (rss, rss_after)

    # Exact: every refused connect is a reset sent (no socket), a reset received (in SYN_SENT),
    # a refused connect failure and CLOSE->SYN_SENT->CLOSE, short only by the runs the kernel
    # says it skipped; nothing else, and nothing twice.
    m = misses(after, before)
    sent = delta(after, before, "tcpstate_resets_total", direction="sent", reason="NO_SOCKET", state="NONE")
    received = delta(after, before, "tcpstate_resets_total", direction="received", reason="UNKNOWN",
                     state="SYN_SENT")
    refused = delta(after, before, "tcpstate_connect_failures_total", reason="refused")
    failures = deltas_of(after, before, "tcpstate_connect_failures_total")
    transitions = deltas_of(after, before, "tcpstate_transitions_total")
    opened = transitions.get((("from_state", "CLOSE"), ("to_state", "SYN_SENT")), 0)
    closed = transitions.get((("from_state", "SYN_SENT"), ("to_state", "CLOSE")), 0)
    print(f"storm: failed {failed}; resets sent {sent:.0f}, received {received:.0f}; failures {failures}; "
          f"CLOSE->SYN_SENT {opened:.0f}, SYN_SENT->CLOSE {closed:.0f}; kernel-skipped runs {m}")
    resets = deltas_of(after, before, "tcpstate_resets_total")
    assert set(resets) == {(("direction", "sent"), ("reason", "NO_SOCKET"), ("state", "NONE")),
                           (("direction", "received"), ("reason", "UNKNOWN"), ("state", "SYN_SENT"))}, resets
    assert set(transitions) <= {(("from_state", "CLOSE"), ("to_state", "SYN_SENT")),
                                (("from_state", "SYN_SENT"), ("to_state", "CLOSE"))}, transitions
    slack = UNEXPLAINED * failed
    set_state = m["sock:inet_sock_set_state"]
    for what, counted, skipped in [("resets sent", sent, m["tcp:tcp_send_reset"]),
                                   ("resets received", received, m["tcp:tcp_receive_reset"]),
                                   ("CLOSE->SYN_SENT", opened, set_state),
                                   ("SYN_SENT->CLOSE", closed, set_state),
                                   # a refused failure needs the transition (and, without BTF, the error report)
                                   ("refused", refused, set_state + m.get("sock:inet_sk_error_report", 0))]:
        assert counted <= failed, f"{what} counted {counted} > {failed} refused connects"
        assert failed - counted <= skipped + slack, f"{what}: {failed - counted} missing, kernel skipped {skipped}"
    assert sum(failures.values()) <= failed, failures
    # Exact classes: every failure counted is a refused one (the socket's own error, read at its
    # BTF offset: nothing keyed by port that a reconnect could take over).
    assert set(failures) == {(("reason", "refused"),)}, failures

    # The detector fired during the storm and resolved after it, within its window + hold-down.
    assert [s for _, s in storm] == ["firing", "resolved"], storm
    (t_fire, fire), (t_res, res) = [(t, e) for t, e in events if e["kind"] == "rst_storm"]
    assert t_fire < t_end and t_fire - t0 <= WINDOW + 2 * TICK + 2.0, (t_fire - t0, t_end - t0)
    assert fire["value"] >= 100 and res["details"]["peak"] >= fire["value"]
    assert t_end - 0.5 <= t_res <= t_end + WINDOW + HOLD_DOWN + 2 * TICK + 3.0, (t_res - t0, t_end - t0)


# --- 2. 50 concurrent scrapes during churn -----------------------------------------------------

SCRAPERS = 50
MIN_ROUNDS, MAX_ROUNDS = 3, 5
# Measured with a listen backlog of 128: at most 0.47 s under churn. A backlog smaller than the
# scrapers drops SYNs, retried after 1, 3, 7, 15 s: seen up to 16 s with socketserver's 5.
SCRAPE_TIMEOUT = 5.0
CHURN_SECONDS = 8
CHURN_PORT = 5002
FAMILIES = {"tcpstate_transitions", "tcpstate_resets", "tcpstate_connect_failures", "tcpstate_connections_opened",
            "tcpstate_probe_misses", "tcpstate_probe_attached", "tcpstate_handshake_duration_seconds",
            "tcpstate_connection_duration_seconds", "tcpstate_sockets"}


def scrape_round(base: str, n: int) -> list:
    """n GETs of /metrics released together; each (status, seconds, start, body or the error)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def one(i):
        barrier.wait(timeout=30)
        t = time.monotonic()
        try:
            with urllib.request.urlopen(base + "/metrics", timeout=SCRAPE_TIMEOUT) as resp:
                results[i] = (resp.status, time.monotonic() - t, t, resp.read().decode())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = (None, time.monotonic() - t, t, repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=SCRAPE_TIMEOUT + 35)
    return results


def monotonic_values(body: str) -> tuple[set, dict]:
    """The families of one scrape, and the value of every counter and histogram sample."""
    names, values = set(), {}
    for fam in text_string_to_metric_families(body):
        names.add(fam.name)
        if fam.type in ("counter", "histogram"):
            for s in fam.samples:
                values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return names, values


def listen_backlog(port: int) -> int:
    """The backlog of the listener on 127.0.0.1:port (ss shows it as a listener's Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    (line,) = [ln for ln in out.splitlines() if "127.0.0.1" in ln]
    return int(line.split()[2])


def test_concurrent_scrapes_during_churn(netns, churn, tmp_path):
    subprocess.run(["ip", "netns", "exec", netns.client, "sysctl", "-qw",
                    "net.ipv4.ip_local_port_range=10000 65535", "net.ipv4.tcp_tw_reuse=1"], check=True)
    d = Daemon(tmp_path)
    server = client = None
    latencies, released = [], []  # seconds into the churn at which each round's scrapes were released
    try:
        d.wait_ready()
        # Concurrent scrapes need the kernel to queue that many connects for the accept loop;
        # with socketserver's default backlog of 5 the rest are dropped and retried seconds later.
        assert listen_backlog(d.port) >= SCRAPERS, "the daemon's HTTP listen backlog is smaller than the scrapers"
        before = d.metrics()
        server = subprocess.Popen(["ip", "netns", "exec", netns.server, churn, "server", netns.SERVER_ADDR,
                                   str(CHURN_PORT), "2"], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "listening"
        client = subprocess.Popen(["ip", "netns", "exec", netns.client, churn, "client", netns.SERVER_ADDR,
                                   str(CHURN_PORT), str(CHURN_SECONDS), "100000000", "2"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        time.sleep(0.5)  # the churn at full rate first
        floor: dict = {}  # the highest value of every counter seen in earlier rounds
        for r in range(MAX_ROUNDS):
            if client.poll() is not None or time.monotonic() - t0 > CHURN_SECONDS - 1:
                break
            results = scrape_round(d.base, SCRAPERS)
            released.append(min(t for _, _, t, _ in results) - t0)
            highest: dict = {}
            for status, took, _, body in results:
                assert status == 200, (r, took, body)
                assert took < SCRAPE_TIMEOUT
                latencies.append(took)
                names, values = monotonic_values(body)
                assert FAMILIES <= names, FAMILIES - names
                back = {k: (floor[k], v) for k, v in values.items() if k in floor and v < floor[k]}
                assert not back, f"round {r}: counters went backwards: {back}"
                for k, v in values.items():
                    highest[k] = max(v, highest.get(k, v))
            floor.update(highest)
            assert d.proc.poll() is None, d.log()
        out, err = client.communicate(timeout=CHURN_SECONDS + 30)
        assert client.returncode == 0, err
        result = churn_result(out)
        made = int(result["made"])
        # The last ACKs are asynchronous: wait until every transition is counted or was skipped
        # by the kernel (or, if some loss went uncounted, until nothing changed for a second),
        # then a little longer so that an excess would show too.
        deadline = time.monotonic() + 10
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            after = d.metrics()
            counted = sum(delta(after, before, "tcpstate_transitions_total", from_state=old, to_state=new)
                          for old, new in PER_CONN)
            if counted + misses(after, before)["sock:inet_sock_set_state"] >= 10 * made:
                break
            if counted != last:
                last, since = counted, time.monotonic()
            elif time.monotonic() - since >= 1.0:
                break
            time.sleep(0.1)
        time.sleep(0.3)
        after = d.metrics()
    finally:
        for p in (client, server):
            if p is not None:
                stop_process(p)
        rc = d.stop()
    assert rc == 0, d.log()
    lat = sorted(latencies)
    print(f"\nscrapes: churn {out.strip()}; rounds of {SCRAPERS} concurrent scrapes released at "
          f"{[round(t, 1) for t in released]} s; latency median {statistics.median(lat) * 1000:.0f} ms, "
          f"p95 {lat[int(0.95 * len(lat))] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms")
    # Enough rounds released while the churn ran (it ran for its own `seconds`, started at t0).
    assert len([t for t in released if t < result["seconds"]]) >= MIN_ROUNDS, (released, out)
    assert made > 10000, out

    transitions = {(dict(k)["from_state"], dict(k)["to_state"]): v
                   for k, v in deltas_of(after, before, "tcpstate_transitions_total").items()}
    skipped = misses(after, before)["sock:inet_sock_set_state"]
    missing = {t: made - transitions.get(t, 0) for t in PER_CONN}
    lost = sum(missing.values())
    print(f"scrapes: transitions missing {lost} of {10 * made}; set_state runs the kernel skipped {skipped}; "
          f"missing by transition {missing}; others {set(transitions) - set(PER_CONN)}")
    assert all(v >= 0 for v in missing.values()), missing  # nothing counted twice
    assert set(transitions) == set(PER_CONN) | {("CLOSE", "LISTEN")}, transitions
    assert transitions[("CLOSE", "LISTEN")] == 1
    assert lost - skipped <= UNEXPLAINED * 10 * made, (lost, skipped)
    if skipped == 0:
        assert all(v == 0 for v in missing.values()), missing


# --- 3. SIGKILL, then a clean restart ----------------------------------------------------------

CLEANUP_SECONDS = 10.0


def bpf_ids(kind: str) -> dict:
    """id -> name of every BPF program or map the kernel holds now."""
    res = subprocess.run([BPFTOOL, "-j", kind, "list"], capture_output=True, text=True, check=True, timeout=30)
    return {o["id"]: o.get("name", "") for o in json.loads(res.stdout or "[]")}


def owned_ids(pid: int) -> tuple[set, set]:
    """The program and map ids a process holds file descriptors of (fdinfo's prog_id/map_id)."""
    progs, maps = set(), set()
    for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = fdinfo.read_text()
        except OSError:  # closed meanwhile
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key == "prog_id":
                progs.add(int(value))
            elif key == "map_id":
                maps.add(int(value))
    return progs, maps


def wait_gone(before_progs: dict, before_maps: dict, ours: set, timeout: float) -> float:
    """Poll until no program or map exists that was not there before (the kernel frees them
    after the last reference goes, not at once); returns how long it took."""
    t0 = time.monotonic()
    while True:
        progs, maps = bpf_ids("prog"), bpf_ids("map")
        left = {i: n for i, n in {**progs, **maps}.items() if i in ours}
        new = ({i: n for i, n in progs.items() if i not in before_progs},
               {i: n for i, n in maps.items() if i not in before_maps})
        if not left and not new[0] and not new[1]:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"left behind after {timeout} s: ours {left}, new {new}"
        time.sleep(0.2)


def test_sigkill_leaves_nothing_and_restart_is_clean(netns, tmp_path):
    before_progs, before_maps = bpf_ids("prog"), bpf_ids("map")
    first = Daemon(tmp_path)
    try:
        first.wait_ready()
        progs, maps = owned_ids(first.pid)
        listed_progs, listed_maps = bpf_ids("prog"), bpf_ids("map")
        print(f"\nkill: daemon {first.pid} holds programs {sorted(progs)}, maps {sorted(maps)}")
        # One program per tracepoint, new since "before", listed by bpftool; their maps too.
        raw = detect_layout(ensure_tracefs()).raw_tracepoints  # as the daemon decides with its defaults
        assert {program_name(*tp.split(":"), raw=raw) for tp in used_tracepoints()} <= {listed_progs.get(i) for i in progs}
        assert progs and progs <= set(listed_progs) and not progs & set(before_progs)
        assert {"socks", "transitions", "resets"} <= {listed_maps.get(i) for i in maps}
        assert maps and maps <= set(listed_maps) and not maps & set(before_maps)
        # bpftool built with its pid iterator names the owners; Debian 12's is not.
        for o in json.loads(subprocess.run([BPFTOOL, "-j", "prog", "list"], capture_output=True, text=True,
                                           check=True).stdout):
            if o["id"] in progs and "pids" in o:
                assert first.pid in {p["pid"] for p in o["pids"]}, o
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
            first.proc.wait(timeout=10)
    took = wait_gone(before_progs, before_maps, progs | maps, CLEANUP_SECONDS)
    print(f"kill: programs and maps gone {took:.2f} s after SIGKILL")

    second = Daemon(tmp_path)
    n = 50
    try:
        ready_in = second.wait_ready()
        before = second.metrics()
        assert all(before[("tcpstate_probe_attached", (("tracepoint", tp),))] == 1 for tp in used_tracepoints())
        with traffic.Listener(netns.server, netns.SERVER_ADDR) as lst:
            traffic.client_closes_first(netns.client, lst, n)
        expected = {t: n for t in PER_CONN}
        expected.update({("CLOSE", "LISTEN"): 1, ("LISTEN", "CLOSE"): 1})
        deadline = time.monotonic() + 10
        while True:
            got = {(dict(k)["from_state"], dict(k)["to_state"]): v
                   for k, v in deltas_of(second.metrics(), before, "tcpstate_transitions_total").items()}
            if got == expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        time.sleep(0.3)
        after = second.metrics()
        got = {(dict(k)["from_state"], dict(k)["to_state"]): v
               for k, v in deltas_of(after, before, "tcpstate_transitions_total").items()}
    finally:
        rc = second.stop()
    err = second.log()
    print(f"kill: restart ready in {ready_in:.2f} s, stopped with {rc}")
    assert rc == 0, err
    assert "ERROR" not in err and "Traceback" not in err, err
    assert got == expected, (got, misses(after, before))
    assert delta(after, before, "tcpstate_connections_opened_total", direction="active") == n
    assert delta(after, before, "tcpstate_connections_opened_total", direction="passive") == n
    assert wait_gone(before_progs, before_maps, set(), CLEANUP_SECONDS) >= 0
