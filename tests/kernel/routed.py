"""Client, router and server namespaces (198.18.1.0/24 and 198.18.2.0/24): the router's nftables rules play the network between two hosts that drops or rejects segments."""

from __future__ import annotations

import os
import subprocess
import time

from .netns import ip, ns_exec


class RoutedPair:
    """Client 198.18.1.2 and server 198.18.2.2, each with eth0 towards a router namespace. What the
    router does to a segment (drop, reject) happens after the sender's capture point and before the
    receiver's, as on a real path."""

    CLIENT_ADDR = "198.18.1.2"
    SERVER_ADDR = "198.18.2.2"
    TABLE = "tcpstate_path"

    def __init__(self, tag: str = "w"):
        tag = f"{tag}{os.getpid()}"
        self.client = f"tcpst-{tag}c"
        self.router = f"tcpst-{tag}r"
        self.server = f"tcpst-{tag}s"

    def up(self) -> "RoutedPair":
        for ns in (self.client, self.router, self.server):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for ns, side, addr, gw in ((self.client, "c0", self.CLIENT_ADDR, "198.18.1.1"),
                                   (self.server, "s0", self.SERVER_ADDR, "198.18.2.1")):
            ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", side, "netns", self.router)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "route", "add", "default", "via", gw)
            ip("-n", self.router, "addr", "add", f"{gw}/24", "dev", side)
            ip("-n", self.router, "link", "set", side, "up")
        ns_exec(self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        return self

    def down(self) -> None:
        for ns in (self.client, self.router, self.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def quiet(self, timeout: float = 60.0) -> None:
        """Until no connection is left at either end but in TIME_WAIT (whose minisockets send
        nothing of their own): every segment of the scenario has been sent, retransmissions included."""
        deadline = time.monotonic() + timeout
        while True:
            left = {ns: ns_exec(ns, "ss", "-Htn", "state", "connected", "exclude", "time-wait").strip()
                    for ns in (self.client, self.server)}
            if not any(left.values()):
                return
            assert time.monotonic() < deadline, f"connections still open after {timeout} s: {left}"
            time.sleep(0.05)

    def path(self, *rules: str, sets: str = "") -> None:
        """Replace what the router does to forwarded segments with these nftables rules."""
        self.clear()
        text = (f"table ip {self.TABLE} {{\n{sets}\n chain forward {{\n"
                f"  type filter hook forward priority 0; policy accept;\n" + "".join(f"  {r}\n" for r in rules)
                + " }\n}\n")
        subprocess.run(["ip", "netns", "exec", self.router, "nft", "-f", "-"], input=text, text=True, check=True,
                       capture_output=True)

    def clear(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.router, "nft", "delete", "table", "ip", self.TABLE],
                       capture_output=True)

    def drop_first(self, flags: str, key: str) -> None:
        """Drop the first segment with these TCP flags (SYN, SYN-ACK) of each connection, named by
        key (the client's address and port as the segment carries them); let its retransmissions by."""
        match = f"tcp flags & (syn | ack) == {flags}"
        self.path(f"{match} {key} @seen accept", f"{match} add @seen {{ {key} }} drop",
                  sets=" set seen { type ipv4_addr . inet_service; flags dynamic; timeout 5m; }")

    def drop_first_syns(self) -> None:
        self.drop_first("syn", "ip saddr . tcp sport")

    def drop_first_syn_acks(self) -> None:
        self.drop_first("syn | ack", "ip daddr . tcp dport")
