"""Captures at the ends of the test's connections (tcpdump) and Wireshark's TCP analysis of them (tshark): the oracle the Wireshark tests hold tcpstate's counters to."""

from __future__ import annotations

import re
import select
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# Per frame, the fields Wireshark's display filters of README's "Wireshark equivalents" name.
FIELDS = ("frame.time_epoch", "ip.src", "ip.dst", "tcp.stream", "tcp.flags.syn", "tcp.flags.ack", "tcp.flags.reset",
          "tcp.analysis.retransmission", "tcp.analysis.out_of_order", "tcp.analysis.reused_ports",
          "tcp.time_relative", "tcp.analysis.initial_rtt")
SNAPLEN = 160  # bytes kept per frame: Ethernet, IPv4 or IPv6 and TCP headers with options
LISTEN_TIMEOUT = 30.0  # tcpdump's start under make test-kernels' emulation takes seconds
TSHARK_TIMEOUT = 300.0


@dataclass(frozen=True)
class Frame:
    time: float
    src: str
    dst: str
    stream: int  # tshark's tcp.stream: a reused 4-tuple starts a new one
    syn: bool
    ack: bool
    rst: bool
    retransmission: bool  # tcp.analysis.retransmission: fast and spurious ones included
    out_of_order: bool  # tcp.analysis.out_of_order
    reused_ports: bool  # tcp.analysis.reused_ports
    since_first: float  # tcp.time_relative: seconds since the stream's first frame
    initial_rtt: float | None  # tcp.analysis.initial_rtt: last SYN to the handshake's ACK, once known


class Capture:
    """tcpdump on one namespace's interface, every TCP frame into a file. Started when tcpdump says
    it listens (frames before that would be missed); --immediate-mode hands each frame over as it
    comes, so none is still buffered when the capture stops."""

    def __init__(self, ns: str, host: str, path: Path, iface: str = "eth0"):
        self.ns, self.host, self.path, self.iface = ns, host, path, iface
        self.proc: subprocess.Popen | None = None
        self.stats = ""

    def start(self) -> "Capture":
        # Headers only (Wireshark's analysis takes segment lengths from the IP header) and a roomy
        # buffer: whole 64 KB GSO frames of a bulk transfer overran the default one.
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "tcpdump", "-n", "-i", self.iface, "-U",
                                      "--immediate-mode", "-s", str(SNAPLEN), "-B", "8192", "-w", str(self.path),
                                      "tcp"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + LISTEN_TIMEOUT
        seen = ""
        while "listening on" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop(check=False)
                raise AssertionError(f"tcpdump in {self.ns} did not start listening: {seen!r}")
            ready, _, _ = select.select([self.proc.stderr], [], [], left)
            if ready:
                seen += self.proc.stderr.readline()
        return self

    def stop(self, check: bool = True) -> None:
        """Ends tcpdump (by its PID); check: that the kernel dropped none of the frames."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.terminate()
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        self.stats = err
        dropped = re.search(r"(\d+) packets? dropped by kernel", err)
        assert not check or (dropped and int(dropped.group(1)) == 0), f"tcpdump in {self.ns} lost frames: {err!r}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _flag(v: str) -> bool:
    return v not in ("", "0", "False")


def _parse(line: str) -> Frame:
    t, src, dst, stream, syn, ack, rst, rtx, ooo, reused, rel, irtt = line.split("\t")
    return Frame(float(t), src, dst, int(stream), _flag(syn), _flag(ack), _flag(rst), _flag(rtx), _flag(ooo),
                 _flag(reused), float(rel), float(irtt) if irtt else None)


def analyze(*captures: Capture) -> list["Trace"]:
    """tshark's analysis of each capture (one tshark per file, run side by side), with TCP sequence
    analysis on as in Wireshark's defaults."""
    procs = [subprocess.Popen(["tshark", "-n", "-r", str(c.path), "-o", "tcp.analyze_sequence_numbers:TRUE",
                               "-o", "tcp.calculate_timestamps:TRUE", "-T", "fields", "-E", "separator=/t",
                               "-E", "occurrence=f", *[a for f in FIELDS for a in ("-e", f)]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in captures]
    traces = []
    for c, p in zip(captures, procs):
        out, err = p.communicate(timeout=TSHARK_TIMEOUT)
        assert p.returncode == 0, f"tshark on {c.path}: {err}"
        traces.append(Trace(c.host, [_parse(ln) for ln in out.splitlines() if ln]))
    return traces


class Trace:
    """The frames of one capture on host's interface; each count is named with the display filter
    that gives it in Wireshark (host standing for this end's address)."""

    def __init__(self, host: str, frames: list[Frame]):
        self.host, self.frames = host, frames

    def count(self, pred) -> int:
        return sum(1 for f in self.frames if pred(f))

    def resets_sent(self) -> int:
        """tcp.flags.reset == 1 && ip.src == host"""
        return self.count(lambda f: f.rst and f.src == self.host)

    def resets_received(self) -> int:
        """tcp.flags.reset == 1 && ip.dst == host"""
        return self.count(lambda f: f.rst and f.dst == self.host)

    def reused_syns_sent(self) -> int:
        """tcp.analysis.reused_ports && tcp.flags.syn == 1 && tcp.flags.ack == 0 && ip.src == host"""
        return self.count(lambda f: f.reused_ports and f.syn and not f.ack and f.src == self.host)

    def reused_syns_received(self) -> int:
        """tcp.analysis.reused_ports && tcp.flags.syn == 1 && tcp.flags.ack == 0 && ip.dst == host"""
        return self.count(lambda f: f.reused_ports and f.syn and not f.ack and f.dst == self.host)

    def reused_other(self) -> int:
        """tcp.analysis.reused_ports on anything but a SYN (Wireshark can flag a SYN-ACK too)"""
        return self.count(lambda f: f.reused_ports and not (f.syn and not f.ack))

    def retransmissions_sent(self) -> int:
        """(tcp.analysis.retransmission || tcp.analysis.out_of_order) && ip.src == host: at the
        sender, a segment below the highest sequence sent is a retransmission, whatever Wireshark's
        timing rule calls it"""
        return self.count(lambda f: (f.retransmission or f.out_of_order) and f.src == self.host)

    def syn_retransmissions_sent(self) -> int:
        """tcp.analysis.retransmission && tcp.flags.syn == 1 && tcp.flags.ack == 0 && ip.src == host"""
        return self.count(lambda f: f.retransmission and f.syn and not f.ack and f.src == self.host)

    def syn_ack_retransmissions_sent(self) -> int:
        """tcp.analysis.retransmission && tcp.flags.syn == 1 && tcp.flags.ack == 1 && ip.src == host"""
        return self.count(lambda f: f.retransmission and f.syn and f.ack and f.src == self.host)

    def syns_of_failed_connects(self) -> int:
        """tcp.flags.syn == 1 && tcp.flags.ack == 0 && ip.src == host in streams that saw no SYN-ACK"""
        answered = {f.stream for f in self.frames if f.syn and f.ack and f.dst == self.host}
        return self.count(lambda f: f.syn and not f.ack and f.src == self.host and f.stream not in answered)

    def connect_times(self) -> list[float]:
        """Per connection this host made: tcp.time_relative of the SYN-ACK (tcp.flags.syn == 1 &&
        tcp.flags.ack == 1 && ip.dst == host): from the stream's first SYN to the SYN-ACK."""
        first_syn_ack = {}
        for f in self.frames:
            if f.syn and f.ack and f.dst == self.host:
                first_syn_ack.setdefault(f.stream, f.since_first)
        return [first_syn_ack[s] for s in sorted(first_syn_ack)]

    def initial_rtts(self) -> list[float]:
        """tcp.analysis.initial_rtt of each stream: Wireshark's, from the last SYN."""
        rtts = defaultdict(list)
        for f in self.frames:
            if f.initial_rtt is not None:
                rtts[f.stream].append(f.initial_rtt)
        return [v[0] for _, v in sorted(rtts.items())]
