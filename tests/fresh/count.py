#!/usr/bin/python3
"""count.py: make N real connections on loopback and check that a tcpstate at URL counted exactly them.

Usage: count.py URL N. Standard library only: it runs on the fresh machine with the OS's python3.
Each scrape is a connection too: the scrape after the connections counts itself, so both the
active and the passive opens must have grown by exactly N + 1. Exits 1 with the numbers if not.
"""

import socket
import sys
import urllib.request

OPENED = "tcpstate_connections_opened_total"


def opened(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith(OPENED + "{"):
            labels, value = line[len(OPENED):].rsplit(" ", 1)
            found[labels.strip("{}")] = float(value)
    return found


def connect_and_close(n: int) -> None:
    """n connections to a listener of our own; the client closes first, as a browser would."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        for _ in range(n):
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            accepted, _ = server.accept()
            client.sendall(b"ping")
            accepted.recv(4)
            client.close()
            accepted.close()


def check(url: str, n: int) -> int:
    """0 when both kinds of opens grew by exactly n + 1, else 1; prints what it saw."""
    url = url.rstrip("/")
    before = opened(url)
    connect_and_close(n)
    after = opened(url)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ('direction="active"', 'direction="passive"')}
    print(f"made {n} connections; {OPENED} grew by {delta} (expected {n + 1} each, the last scrape included)")
    return 0 if all(v == n + 1 for v in delta.values()) else 1


def main() -> int:
    if len(sys.argv) != 3 or not sys.argv[2].isdigit():
        print("usage: count.py URL N", file=sys.stderr)
        return 2
    return check(sys.argv[1], int(sys.argv[2]))


if __name__ == "__main__":
    sys.exit(main())
