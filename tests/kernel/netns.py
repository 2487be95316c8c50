"""Network namespaces the tests create (198.18.0.0/15 only), and sockets made inside them."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess

from monitor.sockets.netns import entered


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def netns_path(name: str) -> str:
    return f"/var/run/netns/{name}"


def ns_exec(ns: str, *cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True, text=True).stdout


def tcp_ext(ns: str, name: str) -> int:
    """A TcpExt counter of a namespace (/proc/net/netstat): the kernel's own count, whose reading,
    unlike a BPF map's, holds off no tracepoint program."""
    rows = [line.split() for line in ns_exec(ns, "cat", "/proc/net/netstat").splitlines()
            if line.startswith("TcpExt:")]
    return int(dict(zip(rows[0][1:], rows[1][1:]))[name])


def in_netns(name: str):
    """Switch this thread into a namespace; sockets made meanwhile stay in it (the daemon's own helper)."""
    return entered(netns_path(name))


def socket_in(ns: str, family: int = socket.AF_INET) -> socket.socket:
    with in_netns(ns):
        return socket.socket(family, socket.SOCK_STREAM)


class NetnsPair:
    """Client namespace A (198.18.0.1) and server namespace B (198.18.0.2, .3) joined by veth."""

    CLIENT_ADDR = "198.18.0.1"
    SERVER_ADDR = "198.18.0.2"
    SERVER_ADDR2 = "198.18.0.3"
    SILENT_ADDR = "198.18.0.9"  # resolves to a MAC no one has: SYNs vanish without an answer

    def __init__(self, tag: str = ""):
        tag = f"{tag}{os.getpid()}"
        self.client = f"tcpst-a-{tag}"
        self.server = f"tcpst-b-{tag}"

    def up(self) -> "NetnsPair":
        ip("netns", "add", self.client)
        ip("netns", "add", self.server)
        ip("link", "add", "tst0", "netns", self.client, "type", "veth", "peer", "name", "tst0", "netns", self.server)
        ip("-n", self.client, "addr", "add", f"{self.CLIENT_ADDR}/24", "dev", "tst0")
        ip("-n", self.server, "addr", "add", f"{self.SERVER_ADDR}/24", "dev", "tst0")
        ip("-n", self.server, "addr", "add", f"{self.SERVER_ADDR2}/24", "dev", "tst0")
        for ns in (self.client, self.server):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", "tst0", "up")
        ip("-n", self.client, "neigh", "add", self.SILENT_ADDR, "lladdr", "02:00:00:00:00:09", "dev", "tst0",
           "nud", "permanent")
        return self

    def down(self) -> None:
        for ns in (self.client, self.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def fresh_pair(tag: str):
    """A NetnsPair of one's own, made anew (a leftover of a killed run goes first) and removed after."""
    pair = NetnsPair(tag)
    pair.down()
    pair.up()
    try:
        yield pair
    finally:
        pair.down()
