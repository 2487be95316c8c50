"""statepoll_bench.py: CPU and wall time of one socket-table poll with 1k, 10k and 130k TIME_WAIT sockets.

Run as root (make bench-state). For each case it makes a fresh pair of network namespaces
(198.18.0.0/15 addresses; the IPv6 case uses ::1 inside the client's namespace), fills the
client's socket table with TIME_WAIT sockets to 4 remote endpoints using the churn generator
(bounded by count and time), polls it several times the way the daemon does, and prints a
Markdown table: median and worst CPU time (user+system of the polling thread, where the
kernel's share of a netlink dump is spent) and wall time, plus `ss -tan` for scale.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from monitor.sockets import sockdiag, tally  # noqa: E402
from monitor.sockets.poller import StatePoller, Target  # noqa: E402

CASES = ((1000, "IPv4"), (10000, "IPv4"), (130000, "IPv4"), (130000, "IPv6"))
POLLS = 7
ENDPOINTS = {"IPv4": [(a, p) for a in ("198.18.200.2", "198.18.200.3") for p in (5001, 5002)],
             "IPv6": [("::1", p) for p in (5001, 5002, 5003, 5004)]}


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def build_churn(tmp: str) -> str:
    exe = os.path.join(tmp, "churn")
    sh("gcc", "-O2", "-pthread", "-o", exe, str(ROOT / "tests/load/churn.c"))
    return exe


def make_pair(tag: str) -> tuple[str, str]:
    a, b = f"tcpst-bench-a-{tag}", f"tcpst-bench-b-{tag}"
    for ns in (a, b):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", "tb0", "netns", a, "type", "veth", "peer", "name", "tb0", "netns", b)
    sh("ip", "-n", a, "addr", "add", "198.18.200.1/24", "dev", "tb0")
    for addr in ("198.18.200.2", "198.18.200.3"):
        sh("ip", "-n", b, "addr", "add", f"{addr}/24", "dev", "tb0")
    for ns in (a, b):
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", "tb0", "up")
    # No TIME_WAIT reuse, so every connection leaves its socket; the widest port range.
    sh("ip", "netns", "exec", a, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535",
       "net.ipv4.tcp_tw_reuse=0")
    return a, b


def fill(churn: str, client: str, server: str, n: int, endpoints: list) -> int:
    servers = [subprocess.Popen(["ip", "netns", "exec", server, churn, "server", addr, str(port), "1"],
                                stdout=subprocess.PIPE, text=True)
               for addr, port in endpoints]
    try:
        for s in servers:
            assert s.stdout.readline().strip() == "listening"
        per = -(-n // len(servers))
        clients = [subprocess.Popen(["ip", "netns", "exec", client, churn, "client", addr, str(port), "40",
                                     str(min(per, n - i * per)), "1"], stdout=subprocess.PIPE, text=True)
                   for i, (addr, port) in enumerate(endpoints)]
        for c in clients:
            c.wait(timeout=60)
    finally:
        for s in servers:
            s.terminate()
            s.wait(timeout=5)
    time.sleep(0.5)  # the last FINs
    tw = sh("ip", "netns", "exec", client, "cat", "/proc/net/sockstat").stdout
    return int(tw.split(" tw ")[1].split()[0])


def measure(client: str) -> dict:
    poller = StatePoller([Target.from_path(f"/var/run/netns/{client}")], interval=1, top_n=10)
    cpu, wall = [], []
    for _ in range(POLLS):
        poller.poll_once()
        r = poller.results()[client]
        cpu.append(r.cpu_seconds * 1e3)
        wall.append(r.duration_seconds * 1e3)
    t0 = time.perf_counter()
    ss_lines = len(sh("ip", "netns", "exec", client, "ss", "-Htan", "state", "time-wait").stdout.splitlines())
    ss_ms = (time.perf_counter() - t0) * 1e3
    return {"time_wait": r.sockets["TIME_WAIT"], "ss": ss_lines, "cpu_med": statistics.median(cpu),
            "cpu_max": max(cpu), "wall_med": statistics.median(wall), "wall_max": max(wall), "ss_ms": ss_ms}


SYNTH_RECORDS = 128_000
SYNTH_DISTINCT = (4, 1_000, 128_000)


def synthetic_dump(distinct: int, family: int) -> list:
    """SYNTH_RECORDS TIME_WAIT records (96 bytes, as root gets them) from ephemeral ports to
    `distinct` remote endpoints, cut into 32 KB datagrams like the kernel's, NLMSG_DONE last."""
    recs = []
    for i in range(SYNTH_RECORDS):
        e = i % distinct
        dst = bytes([198, 18, e >> 8 & 0xFF, e & 0xFF]) if family == socket.AF_INET else \
            bytes.fromhex("20010db8") + bytes(8) + e.to_bytes(4, "big")
        msg = (struct.pack("=BBBB", family, 6, 0, 0) + struct.pack("!HH", 1024 + i % 64000, 1 + e % 60000)
               + bytes(16) + dst.ljust(16, b"\0") + bytes(12) + struct.pack("=IIIII", i % 60000, 0, 0, 0, 0)
               + struct.pack("=HHI", 8, 15, 0))  # INET_DIAG_MARK
        recs.append(struct.pack("=IHHII", 16 + len(msg), 18, 2, 1, 0) + msg)
    per = 32768 // len(recs[0])
    chunks = [b"".join(recs[i:i + per]) for i in range(0, len(recs), per)]
    return chunks + [struct.pack("=IHHIIi", 20, 3, 2, 1, 0, 0)]


class ReplaySocket:
    def __init__(self, chunks):
        self.chunks = chunks

    def send(self, req):
        # poll() first dumps the listeners alone: there are none in a generated dump.
        listeners = {sockdiag.request(1 << sockdiag.LISTEN, f) for f in (socket.AF_UNSPEC, socket.AF_INET,
                                                                         socket.AF_INET6)}
        self.pending = iter(self.chunks[-1:] if req in listeners else self.chunks)

    def recv(self, bufsize):
        return next(self.pending)

    def recv_into(self, buf):
        chunk = next(self.pending)
        buf[:len(chunk)] = chunk
        return len(chunk)


def counting_only() -> list:
    """CPU of counting a generated dump (no kernel) in C, by distinct endpoints."""
    rows = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for distinct in SYNTH_DISTINCT:
            sock = ReplaySocket(synthetic_dump(distinct, family))
            row = {"family": "IPv4" if family == socket.AF_INET else "IPv6", "distinct": distinct}
            cpu = []
            for _ in range(5):
                c0 = time.thread_time()
                t = tally.poll(sock, (1024, 65535), one_walk=True, recent_ms=30000, top_n=10, rank_window=30.0)
                sorted(t.remote_time_wait.items(), key=lambda kv: -kv[1])  # what summarize() walks
                cpu.append((time.thread_time() - c0) * 1e3)
            row["c"] = statistics.median(cpu)
            rows.append(row)
            print(f"counting: {row}", file=sys.stderr)
    return rows


def main() -> int:
    if os.geteuid() != 0:
        print("statepoll_bench: needs root (namespaces)", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        churn = build_churn(tmp)
        for n, family in CASES:
            client, server = make_pair(f"{n}{family[-1]}")
            try:
                # IPv6 stays on loopback: the server runs in the client's namespace.
                made = fill(churn, client, server if family == "IPv4" else client, n, ENDPOINTS[family])
                m = measure(client)
                m["target"], m["made"], m["family"] = n, made, family
                rows.append(m)
                print(f"{n}: {m}", file=sys.stderr)
            finally:
                for ns in (client, server):
                    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    print(f"Socket-table poll, {POLLS} polls per size, {os.cpu_count()} CPUs, kernel {os.uname().release}\n")
    print("| TIME_WAIT sockets | family | poll CPU median (ms) | poll CPU max (ms) | poll wall median (ms) "
          "| poll wall max (ms) | `ss -tan` wall (ms) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for m in rows:
        assert m["time_wait"] == m["ss"], m  # the poll and ss agree
        print(f"| {m['time_wait']} | {m['family']} | {m['cpu_med']:.1f} | {m['cpu_max']:.1f} | {m['wall_med']:.1f} "
              f"| {m['wall_max']:.1f} | {m['ss_ms']:.0f} |")
    print(f"\nCounting alone: a generated dump of {SYNTH_RECORDS} TIME_WAIT records replayed, no kernel "
          "(median of 5, CPU ms)\n")
    print("| family | distinct remote endpoints | CPU ms |")
    print("|---|---:|---:|")
    for r in counting_only():
        print(f"| {r['family']} | {r['distinct']} | {r['c']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
