"""Faults a daemon must survive: a full socket table, config reloads (good and bad), a watcher that cannot keep up."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from . import traffic
from .daemon import TEST_CIDR, Daemon
from .pace import SLOWDOWN, seconds
from .test_daemon import TCPSTATE

# Faults under load (3000 held sockets against a 1024-entry table, the watch stream under full
# churn) and the reload path: too heavy for the emulated guests of make test-kernels, and what
# they check of the kernel (exact counts, the socket table's frees) test_counts checks there.
pytestmark = pytest.mark.host_only


def value(s: dict, name: str, **labels) -> float:
    return s.get((name, tuple(sorted(labels.items()))), 0)


def transition(s: dict, old: str, new: str) -> float:
    return value(s, "tcpstate_transitions_total", from_state=old, to_state=new)


# --- more live sockets than the per-socket table holds ------------------------------------------

TABLE = 1024  # the smallest --max-sockets
HELD = 1500  # connections held open at once: 3000 sockets and the listener, three times the table


def test_more_live_sockets_than_the_table_holds(netns, tmp_path, layout):
    """The LRU evicts; the daemon keeps serving, says how many it evicted, and the counters that do not
    need the table stay exact."""
    with Daemon(tmp_path, "--max-sockets", str(TABLE)) as d:
        before = d.metrics()
        assert value(before, "tcpstate_socket_table_capacity") == TABLE
        pairs = []
        lst = traffic.Listener(netns.server, netns.SERVER_ADDR)
        try:
            for _ in range(HELD):
                pairs.append(traffic._connect(netns.client, lst))
            t0 = time.monotonic()
            held = d.metrics()
            scrape_s = time.monotonic() - t0
            entries = value(held, "tcpstate_socket_table_entries")
            evicted = value(held, "tcpstate_socket_table_evictions_total")
            # Quiet now: every socket inserted (both ends of each connection and the listener) is
            # either in the table or was evicted from it.
            assert entries <= TABLE
            assert entries + evicted == 2 * HELD + 1, (entries, evicted)
            for c, s in pairs:  # one at a time, each as traffic.client_closes_first ends it
                c.close()
                assert s.recv(1) == b""
                s.close()
        finally:
            for c, s in pairs:
                c.close()
                s.close()
            lst.close()
        expected = {("CLOSE", "SYN_SENT"): HELD, ("SYN_SENT", "ESTABLISHED"): HELD,
                    ("ESTABLISHED", "FIN_WAIT1"): HELD, ("FIN_WAIT1", "FIN_WAIT2"): HELD,
                    ("FIN_WAIT2", "TIME_WAIT"): HELD, ("LISTEN", "SYN_RECV"): HELD,
                    ("SYN_RECV", "ESTABLISHED"): HELD, ("ESTABLISHED", "CLOSE_WAIT"): HELD,
                    ("CLOSE_WAIT", "LAST_ACK"): HELD, ("LAST_ACK", "CLOSE"): HELD,
                    ("CLOSE", "LISTEN"): 1, ("LISTEN", "CLOSE"): 1}
        deadline = time.monotonic() + seconds(15)
        while True:
            after = d.metrics()
            got = {t: transition(after, *t) - transition(before, *t) for t in expected}
            if (got == expected and value(after, "tcpstate_socket_table_entries") == 0) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        all_deltas = {k: v - before.get(k, 0) for k, v in after.items()
                      if k[0] == "tcpstate_transitions_total" and v != before.get(k, 0)}
        assert got == expected, all_deltas
        # Every tracked socket was freed when destroyed; the evicted ones stay counted.
        assert value(after, "tcpstate_socket_table_entries") == 0
        assert value(after, "tcpstate_socket_table_evictions_total") == evicted
        # An evicted connection's socket makes 3 more transitions, all untracked (the listener, if
        # evicted, 1: its LISTEN->CLOSE). Where the table is looked up only where a count needs it
        # (layout.lean_socket_table), only the last, ->CLOSE, looks.
        untracked = value(after, "tcpstate_untracked_transitions_total") - \
            value(before, "tcpstate_untracked_transitions_total")
        if layout.lean_socket_table:
            assert untracked == evicted, (untracked, evicted)
        else:
            assert 3 * evicted - 2 <= untracked <= 3 * evicted, (untracked, evicted)
        assert value(after, "tcpstate_map_read_errors_total") == 0
        print(f"table {TABLE}: {int(entries)} entries and {int(evicted)} evicted while {HELD} connections were "
              f"held; a scrape then took {scrape_s * 1000:.1f} ms")
        assert d.proc.poll() is None
    assert d.proc.returncode == 0, d.log()


# --- SIGHUP reloads the config file -------------------------------------------------------------

def wait_for(d: Daemon, check, what: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + seconds(timeout)
    while True:
        s = d.metrics()
        if check(s):
            return s
        assert d.proc.poll() is None, d.log()
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s; log:\n{d.log()}"
        time.sleep(0.1)


def diag(d):
    return {k: v for k, v in d.metrics().items() if "anomal" in k[0] or "reset" in k[0] or "failure" in k[0]}


def reuses(s: dict) -> float:
    return value(s, "tcpstate_port_reuse_total", role="client")


def storm_events(path: Path) -> list:
    return [e["status"] for e in map(json.loads, path.read_text().splitlines()) if e["kind"] == "rst_storm"]


def test_sighup_reloads_the_config_and_a_bad_one_keeps_the_old(netns, tmp_path):
    config = tmp_path / "tcpstate.toml"
    events = tmp_path / "events.jsonl"
    config.write_text("[rst_storm]\nrate = 100000.0\nbaseline_factor = 0.0\nwindow_seconds = 2.0\n"
                      "[port_reuse]\nreuse_within_seconds = 60.0\n")
    with Daemon(tmp_path, "--config", str(config), "--events", str(events)) as d, \
            traffic.Listener(netns.server, netns.SERVER_ADDR) as lst:
        s0 = d.metrics()
        assert value(s0, "tcpstate_config_last_reload_successful") == 1
        traffic.from_fixed_port(netns.client, netns.CLIENT_ADDR, lst, 3, "abort")
        s1 = wait_for(d, lambda s: reuses(s) - reuses(s0) >= 2, "2 reuses with the 60 s window")
        assert reuses(s1) - reuses(s0) == 2

        # A good file: the kernel stops counting reuse at once, and the storm threshold drops.
        config.write_text("[rst_storm]\nrate = 5.0\nbaseline_factor = 0.0\nwindow_seconds = 2.0\n"
                          "[port_reuse]\nreuse_within_seconds = 0.0\n")
        d.proc.send_signal(signal.SIGHUP)
        s2 = wait_for(d, lambda s: value(s, "tcpstate_config_reloads_total", result="success") == 1, "the reload")
        assert value(s2, "tcpstate_config_last_reload_successful") == 1
        assert "config reloaded from" in d.log() and "changed rst_storm, port_reuse" in d.log()
        traffic.from_fixed_port(netns.client, netns.CLIENT_ADDR, lst, 3, "abort")
        traffic.refused(netns.client, netns.SERVER_ADDR, 9, 60)  # 120 resets: over 5/s in any window
        s3 = wait_for(d, lambda s: value(s, "tcpstate_anomaly_active", kind="rst_storm") == 1,
                      f"the storm; events: {events.read_text()}; {diag(d)}", timeout=15)
        assert reuses(s3) == reuses(s1)  # window 0: no reuse counted in the kernel
        assert storm_events(events) == ["firing"]

        # A bad file: refused with the file, line and key; the previous config stays in force.
        config.write_text("[rst_storm]\nrate = \"fast\"\n")
        d.proc.send_signal(signal.SIGHUP)
        s4 = wait_for(d, lambda s: value(s, "tcpstate_config_reloads_total", result="failure") == 1,
                      "the failed reload")
        assert value(s4, "tcpstate_config_last_reload_successful") == 0
        assert value(s4, "tcpstate_config_reloads_total", result="success") == 1
        assert (f"config reload failed, keeping the previous config: {config}:2: rst_storm.rate: must be a "
                "number, got 'fast'") in d.log()
        assert value(s4, "tcpstate_anomaly_active", kind="rst_storm") == 1  # not reset by the failed reload
        traffic.from_fixed_port(netns.client, netns.CLIENT_ADDR, lst, 3, "abort")
        time.sleep(0.5)
        assert reuses(d.metrics()) == reuses(s1)  # still window 0
        assert storm_events(events) == ["firing"]
        assert d.proc.poll() is None
    assert d.proc.returncode == 0, d.log()


def test_sighup_without_a_config_file_changes_nothing(netns, tmp_path):
    with Daemon(tmp_path) as d:
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + seconds(5)
        while "no --config file to reload" not in d.log():
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
        s = d.metrics()
        assert value(s, "tcpstate_config_reloads_total", result="success") == 0
        assert d.proc.poll() is None
    assert d.proc.returncode == 0, d.log()


# --- watch under full churn ----------------------------------------------------------------------

CHURN_SECONDS = 3
PER_CONNECTION = traffic.CHURN_TRANSITIONS


def misses(s: dict) -> float:
    """Runs of the daemon's programs the kernel skipped."""
    return sum(v for k, v in s.items() if k[0] == "tcpstate_probe_misses_total")


def counted_events(s: dict) -> float:
    """Every transition and reset the daemon counted: the records a watcher is sent."""
    return sum(v for k, v in s.items() if k[0] in ("tcpstate_transitions_total", "tcpstate_resets_total"))


def test_watch_under_full_churn_reports_its_loss_and_the_daemon_counts_on(netns, tmp_path, churn):
    """A watcher whose output is not read fills its ring buffer: every record is either printed or
    reported lost, and the daemon beside it counts every connection."""
    subprocess.run(["ip", "netns", "exec", netns.client, "sysctl", "-qw",
                    "net.ipv4.ip_local_port_range=10000 65535", "net.ipv4.tcp_tw_reuse=1"], check=True)
    with Daemon(tmp_path) as d:
        watch_err = tmp_path / "watch.err"
        with open(watch_err, "w") as err:
            # stdout is a pipe nobody reads until the churn is over: the watcher blocks, its buffer fills.
            watcher = subprocess.Popen([TCPSTATE, "watch", "--json", "--include-cidr", TEST_CIDR],
                                       stdout=subprocess.PIPE, stderr=err)
        server = None
        try:
            deadline = time.monotonic() + seconds(60)
            while "watching" not in watch_err.read_text():
                assert watcher.poll() is None and time.monotonic() < deadline, watch_err.read_text()
                time.sleep(0.1)
            before = d.metrics()
            server = subprocess.Popen(["ip", "netns", "exec", netns.server, churn, "server", netns.SERVER_ADDR,
                                       "5001", "2"], stdout=subprocess.PIPE, text=True)
            assert server.stdout.readline().strip() == "listening"
            out = subprocess.run(["ip", "netns", "exec", netns.client, churn, "client", netns.SERVER_ADDR, "5001",
                                  str(CHURN_SECONDS), "100000000", "2"], check=True, capture_output=True, text=True,
                                 timeout=CHURN_SECONDS + 30).stdout
            fields = dict(kv.split("=") for kv in out.split())
            made = int(fields["made"])
            assert made > 10000 / SLOWDOWN and fields["failed"] == "0", out
            # Let the server take its queued connections before it goes, or their ends are reset.
            deadline = time.monotonic() + seconds(10)
            while True:
                after = d.metrics()
                if transition(after, "LAST_ACK", "CLOSE") - transition(before, "LAST_ACK", "CLOSE") >= made \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            server.terminate()
            server.wait(timeout=seconds(5))
            server = None
            time.sleep(0.5)
            after = d.metrics()
            # Read what the watcher wrote, then stop it: it prints what is left in its buffer and the tally.
            lines = []
            reader = threading.Thread(target=lambda: lines.extend(watcher.stdout), daemon=True)
            reader.start()
            watcher.send_signal(signal.SIGINT)
            assert watcher.wait(timeout=seconds(60)) == 0, watch_err.read_text()
            reader.join(timeout=seconds(30))
        finally:
            if server is not None:
                server.kill()
                server.wait()
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
        err_text = watch_err.read_text()
        reports = [line for line in err_text.splitlines() if line.startswith("tcpstate: lost ")]
        assert reports, err_text  # the loss was reported while it happened, not only at the end
        lost = int(reports[-1].split("; ")[1].split(" in all")[0])
        printed = len(lines)
        records = [json.loads(line) for line in lines[:5]]
        assert all(r["kind"] in ("transition", "reset_sent", "reset_received") for r in records), records
        expected = counted_events(after) - counted_events(before)
        # Runs the kernel skipped, which neither side could count. Each program has a guard of its
        # own where it is a raw tracepoint, so the daemon's and the watcher's skips differ.
        skips = [line for line in err_text.splitlines() if line.startswith("tcpstate: the kernel skipped ")]
        watcher_skipped = int(skips[-1].split("(")[1].split(" in all")[0]) if skips else 0
        daemon_skipped = misses(after) - misses(before)
        print(f"watch: made {made} connections ({made / CHURN_SECONDS:.0f}/s); {expected:.0f} records: "
              f"{printed} printed, {lost} reported lost; runs skipped: watcher {watcher_skipped}, "
              f"daemon {daemon_skipped:.0f}")
        assert lost > 0
        # Every record the kernel program handled was printed or counted lost: none vanished. The
        # watcher handled what the daemon counted, plus the runs the daemon skipped, less its own.
        assert -watcher_skipped <= printed + lost - expected <= daemon_skipped, \
            (printed, lost, expected, watcher_skipped, daemon_skipped)
        # The daemon beside it was not disturbed: each connection counted once per transition,
        # short only by the runs the kernel skipped (as in test_churn).
        skipped = value(after, "tcpstate_probe_misses_total", tracepoint="sock:inet_sock_set_state") - \
            value(before, "tcpstate_probe_misses_total", tracepoint="sock:inet_sock_set_state")
        missing = sum(made - (transition(after, *t) - transition(before, *t)) for t in PER_CONNECTION)
        assert all(transition(after, *t) - transition(before, *t) <= made for t in PER_CONNECTION)
        assert missing - skipped <= 0.001 * 10 * made, (missing, skipped)


# --- memory after the compile ---------------------------------------------------------------------

RSS_TARGET_KB = 100 * 1024  # issue #6's target for the daemon's resident memory


def test_the_compilers_memory_is_given_back_after_attaching(tmp_path):
    """bcc's compile leaves about 150 MB resident (LLVM's code, freed heap); the daemon hands it back."""
    with Daemon(tmp_path) as d:
        for _ in range(5):
            d.metrics()
        status = Path(f"/proc/{d.proc.pid}/status").read_text()
        rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        line = next(x for x in d.log().splitlines() if "memory after the compile" in x)
        print(f"{line.split('INFO tcpstate: ')[1]}; after 5 scrapes {rss // 1024} MB")
        assert "paged out" in line, line
        assert rss < RSS_TARGET_KB, (rss, line)
