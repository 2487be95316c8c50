"""Real TCP traffic between sockets the tests own: each helper makes exactly n connections of one kind."""

from __future__ import annotations

import socket
import struct

from .netns import socket_in
from .pace import seconds

# A connection whose client closes first, as tests/load/churn.c makes them: 5 transitions on each end
# (FIN_WAIT2->CLOSE into TIME_WAIT is counted as FIN_WAIT2->TIME_WAIT).
CHURN_TRANSITIONS = (("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"), ("ESTABLISHED", "FIN_WAIT1"),
                     ("FIN_WAIT1", "FIN_WAIT2"), ("FIN_WAIT2", "TIME_WAIT"), ("LISTEN", "SYN_RECV"),
                     ("SYN_RECV", "ESTABLISHED"), ("ESTABLISHED", "CLOSE_WAIT"), ("CLOSE_WAIT", "LAST_ACK"),
                     ("LAST_ACK", "CLOSE"))


class Listener:
    """A listening socket in a namespace; closing it is the test's LISTEN->CLOSE."""

    def __init__(self, ns: str, addr: str, port: int = 0, family: int = socket.AF_INET):
        self.family = family
        self.sock = socket_in(ns, family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, port))
        self.sock.listen(512)
        self.sock.settimeout(5)
        self.addr = addr
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _connect(client_ns: str, listener: Listener) -> tuple[socket.socket, socket.socket]:
    c = socket_in(client_ns, listener.family)
    c.settimeout(5)
    c.connect((listener.addr, listener.port))
    s, _ = listener.sock.accept()
    s.settimeout(5)
    return c, s


def client_closes_first(client_ns: str, listener: Listener, n: int) -> None:
    for _ in range(n):
        c, s = _connect(client_ns, listener)
        c.close()
        assert s.recv(1) == b""  # the client's FIN
        s.close()


def server_closes_first(client_ns: str, listener: Listener, n: int) -> None:
    for _ in range(n):
        c, s = _connect(client_ns, listener)
        s.close()
        assert c.recv(1) == b""
        c.close()


def from_fixed_port(client_ns: str, client_addr: str, listener: Listener, n: int, how: str, port: int = 0) -> int:
    """n connections from one client port (SO_REUSEADDR), each ended before the next: "abort"
    (the client resets: no TIME_WAIT anywhere) or "server_first" (the server's end goes to
    TIME_WAIT and the next SYN reopens that 4-tuple). Returns the port."""
    for _ in range(n):
        c = socket_in(client_ns, listener.family)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.settimeout(5)
        c.bind((client_addr, port))
        port = c.getsockname()[1]
        c.connect((listener.addr, listener.port))
        s, _ = listener.sock.accept()
        s.settimeout(5)
        if how == "abort":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            expect_reset(s, "server")
            s.close()
        elif how == "server_first":
            s.close()
            assert c.recv(1) == b""
            c.close()
            _wait_closed(client_ns, client_addr, port)
        else:
            raise ValueError(how)
    return port


def _wait_closed(ns: str, addr: str, port: int) -> None:
    """Until the client's LAST_ACK end is gone (the server's last ACK arrived), so the next
    bind on the port cannot race it."""
    import subprocess
    import time

    deadline = time.monotonic() + seconds(5)
    while time.monotonic() < deadline:
        out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htn", "state", "last-ack", "src", f"{addr}:{port}"],
                             capture_output=True, text=True, check=True).stdout
        if not out.strip():
            return
        time.sleep(0.005)
    raise AssertionError(f"{addr}:{port} still in LAST_ACK after 5 s")


def requests_reset_on_path(client_ns: str, listener: Listener, n: int) -> list:
    """n connections whose first request a device on the path answers with a reset (arm one with
    the on_path_rejecter fixture first). Returns the server's ends, still open: they never saw
    the request, and closing them now would be a reset right after their handshake too."""
    accepted = []
    for _ in range(n):
        c, s = _connect(client_ns, listener)
        accepted.append(s)
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        expect_reset(c, "client")
        c.close()
    return accepted


def refused(client_ns: str, addr: str, port: int, n: int, family: int = socket.AF_INET) -> None:
    for _ in range(n):
        c = socket_in(client_ns, family)
        c.settimeout(5)
        try:
            c.connect((addr, port))
        except ConnectionRefusedError:
            pass
        else:
            raise AssertionError(f"{addr}:{port} accepted a connection")
        finally:
            c.close()


def linger_aborts(client_ns: str, listener: Listener, n: int) -> None:
    """The client closes with SO_LINGER {1, 0}: a reset instead of a FIN."""
    for _ in range(n):
        c, s = _connect(client_ns, listener)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        expect_reset(s, "server")
        s.close()


def unread_data_aborts(client_ns: str, listener: Listener, n: int) -> None:
    """The server closes with unread data in its receive queue: the kernel aborts with a reset."""
    for _ in range(n):
        c, s = _connect(client_ns, listener)
        c.sendall(b"x" * 10)
        while not _readable_bytes(s):
            pass
        s.close()
        expect_reset(c, "client")
        c.close()


def expect_reset(s: socket.socket, who: str) -> None:
    try:
        s.recv(1)
    except ConnectionResetError:
        return
    raise AssertionError(f"{who} saw no reset")


def _readable_bytes(s: socket.socket) -> bool:
    try:
        return bool(s.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


TCP_INFO_STATE_FIN_WAIT2 = 5
TCP_INFO_STATE_CLOSE = 7


def tcp_state(s: socket.socket) -> int:
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def fin_wait2_aborts(client_ns: str, listener: Listener, n: int) -> None:
    """The client half-closes (FIN_WAIT2 while the server keeps its end open), then aborts with
    SO_LINGER {1, 0}: the kernel sets CLOSE first, then sends the reset."""
    import time

    for _ in range(n):
        c, s = _connect(client_ns, listener)
        c.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
        deadline = time.monotonic() + seconds(5)
        while tcp_state(c) != TCP_INFO_STATE_FIN_WAIT2:
            assert time.monotonic() < deadline, "client never reached FIN_WAIT2"
            time.sleep(0.001)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        # The server already read EOF, so recv cannot tell whether the reset has arrived; closing
        # before it does sends a FIN (CLOSE_WAIT->LAST_ACK), as 6.1 under emulation once did.
        deadline = time.monotonic() + 5
        while tcp_state(s) != TCP_INFO_STATE_CLOSE:
            assert time.monotonic() < deadline, "server never saw the client's reset"
            time.sleep(0.001)
        s.close()


def pending_connects(client_ns: str, addr: str, port: int, n: int, syncnt: int | None = None) -> list:
    """n non-blocking connects left in SYN_SENT (the peer never answers)."""
    socks = []
    for _ in range(n):
        c = socket_in(client_ns)
        if syncnt is not None:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, syncnt)
        c.setblocking(False)
        assert c.connect_ex((addr, port)) == 115  # EINPROGRESS
        socks.append(c)
    return socks
