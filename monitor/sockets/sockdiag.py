"""sockdiag.py: the sock_diag netlink protocol (what `ss` uses): dump requests, datagrams split into socket records, listeners' ports."""

from __future__ import annotations

import errno
import os
import socket
import struct

from monitor.tcp import NUMBERS, endpoint_text

NETLINK_SOCK_DIAG = 4
TCPDIAG_GETSOCK = 18  # the original inet_diag request: TCP, both families in one walk
SOCK_DIAG_BY_FAMILY = 20
RECORD_TYPES = (TCPDIAG_GETSOCK, SOCK_DIAG_BY_FAMILY)
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# One socket: nlmsghdr (16) + struct inet_diag_msg (72), then attributes we do not ask for
# but the kernel adds anyway (shutdown, mark, cgroup id; only the mark on minisockets).
RECORD = 88
OFF_STATE, OFF_SPORT = 17, 20  # in a record: state, local port (big-endian)

INET_DIAG_SHUTDOWN = 8  # an attribute only full sockets carry
NLA_TYPE_MASK = 0x3FFF

TIME_WAIT, NEW_SYN_RECV, SYN_RECV, LISTEN = (NUMBERS[s] for s in ("TIME_WAIT", "NEW_SYN_RECV", "SYN_RECV", "LISTEN"))
ALL_STATES = sum(1 << s for s in range(1, 13))  # ESTABLISHED .. NEW_SYN_RECV
# Minisockets (TIME_WAIT and request sockets) carry fewer attributes than full sockets, so
# records come in a few sizes, in runs, and each run decodes by slicing. A request socket is
# reported with state SYN_RECV; a record without INET_DIAG_SHUTDOWN is one.
# The kernel adds request sockets to any dump that asks for SYN_RECV, so SYN_RECV goes with them.
MINI_STATES = 1 << TIME_WAIT | 1 << NEW_SYN_RECV | 1 << SYN_RECV
FULL_STATES = ALL_STATES & ~MINI_STATES
MIN_RUN = 4  # shorter runs of one size are cut record by record


_V4_MAPPED = bytes(10) + b"\xff\xff"


def endpoint(family: int, addr: bytes, port: int) -> tuple[int, bytes, int]:
    """(family, address, port) with IPv4 as 4 bytes, including v4-mapped IPv6 (a dual-stack
    socket talking to an IPv4 peer), so both sources key the same endpoint alike."""
    if family == socket.AF_INET:
        return socket.AF_INET, bytes(addr[:4]), port
    if addr[:12] == _V4_MAPPED:
        return socket.AF_INET, bytes(addr[12:16]), port
    return family, bytes(addr[:16]), port


def endpoint_label(key: tuple[int, bytes, int]) -> str:
    """'198.18.0.2:80' or '[2001:db8::1]:443'."""
    family, addr, port = key
    if family == socket.AF_INET or (family == socket.AF_INET6 and len(addr) == 16):
        return endpoint_text(socket.inet_ntop(family, addr), port)
    return f"family{family}:{addr.hex()}:{port}"  # not from the kernel; a label all the same


class SockDiagError(OSError):
    """The kernel refused a sock_diag dump."""


def request(states: int, family: int = socket.AF_UNSPEC, seq: int = 1) -> bytes:
    """A dump request for TCP sockets in `states`: for AF_UNSPEC the original TCPDIAG_GETSOCK
    (struct inet_diag_req), which walks the socket tables once for both families; otherwise
    SOCK_DIAG_BY_FAMILY (struct inet_diag_req_v2)."""
    if family == socket.AF_UNSPEC:
        kind = TCPDIAG_GETSOCK
        body = struct.pack("=4x48xII", states, 0)  # family, lengths, ext; sockid; states; dbs
    else:
        kind = SOCK_DIAG_BY_FAMILY
        body = struct.pack("=BBBxI48x", family, socket.IPPROTO_TCP, 0, states)
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _matching(chunk: bytes, off: int, stride: int, count: int) -> int:
    """How many of the count records from off have the first one's length and type (the 6
    bytes starting each): record i then starts at off + i * stride. Column slices and one
    XOR find the first mismatch at C speed."""
    end = off + count * stride
    first = count
    for i in range(6):
        col = chunk[off + i:end:stride]
        want = col[:1] * len(col)
        if col != want:
            diff = int.from_bytes(col, "big") ^ int.from_bytes(want, "big")
            first = min(first, len(col) - 1 - (diff.bit_length() - 1) // 8)
    return first


def _run_length(chunk: bytes, off: int, stride: int, count: int) -> int:
    # A short look first, so that alternating sizes do not cost a whole-datagram scan per record.
    k = _matching(chunk, off, stride, min(count, 32))
    if k < 32 or count <= 32:
        return k
    return _matching(chunk, off, stride, count)


def is_full_socket(chunk: bytes, off: int, length: int) -> bool:
    """True if the record at off carries INET_DIAG_SHUTDOWN, which only full sockets have."""
    pos, end = off + RECORD, off + length
    while pos + 4 <= end:
        nla_len, nla_type = struct.unpack_from("=HH", chunk, pos)
        if nla_len < 4:
            break
        if nla_type & NLA_TYPE_MASK == INET_DIAG_SHUTDOWN:
            return True
        pos += (nla_len + 3) & ~3
    return False


def split_records(chunk: bytes) -> tuple[list, bool]:
    """([(records, stride, full), ...], done) for one datagram of a dump: runs of records in
    which record i starts at i * stride, full telling full sockets from minisockets, and
    whether the dump ended in this datagram. A datagram of one record size is one run; short
    runs are cut to their first 88 bytes (all the fields decoded here) record by record.
    Raises SockDiagError on NLMSG_ERROR or a malformed message."""
    n = len(chunk)
    runs = []
    cut: dict[bool, list] = {True: [], False: []}
    off = 0
    done = False
    while off + NLMSG_HDR.size <= n:
        length, kind = struct.unpack_from("=IH", chunk, off)
        if length < NLMSG_HDR.size or off + length > n:
            raise SockDiagError(errno.EBADMSG, f"malformed netlink message at offset {off} (length {length})")
        if kind not in RECORD_TYPES:
            done = _control(chunk, off)
            break  # control messages end a datagram
        if length < RECORD:
            raise SockDiagError(errno.EBADMSG, f"short sock_diag record ({length} bytes)")
        stride = (length + 3) & ~3
        k = _run_length(chunk, off, stride, (n - off) // stride) if n - off >= stride else 1
        full = is_full_socket(chunk, off, length)
        if k >= MIN_RUN:
            # Same size, same kind: the attributes that tell them apart are what sets the size.
            runs.append((chunk[off:off + k * stride], stride, full))
            off += k * stride
        else:  # the k records share a size, so a kind: cut them all now
            cut[full].extend(chunk[o:o + RECORD] for o in range(off, off + k * stride, stride))
            off += k * stride
    for full, parts in cut.items():
        if parts:
            runs.append((b"".join(parts), RECORD, full))
    return runs, done


def _check_errno(code: int) -> None:
    if not -4096 < code < 0:  # the kernel's errnos are -1 .. -4095
        raise SockDiagError(errno.EBADMSG, f"malformed error code {code} in a sock_diag dump")


def _control(chunk: bytes, off: int) -> bool:
    """Handle the control messages from off on: True at NLMSG_DONE, raise at NLMSG_ERROR."""
    n = len(chunk)
    while off + NLMSG_HDR.size <= n:
        length, kind = struct.unpack_from("=IH", chunk, off)
        if length < NLMSG_HDR.size or off + length > n:
            raise SockDiagError(errno.EBADMSG, f"malformed netlink message at offset {off} (length {length})")
        if kind == NLMSG_DONE:
            # A dump that failed part way ends with the negative errno in NLMSG_DONE.
            if length >= NLMSG_HDR.size + 4:
                code = struct.unpack_from("=i", chunk, off + NLMSG_HDR.size)[0]
                if code < 0:
                    _check_errno(code)
                    raise SockDiagError(-code, f"sock_diag dump failed part way: {os.strerror(-code)}")
            return True
        if kind == NLMSG_ERROR:
            if length < NLMSG_HDR.size + 4:
                raise SockDiagError(errno.EBADMSG, f"short NLMSG_ERROR at offset {off}")
            code = struct.unpack_from("=i", chunk, off + NLMSG_HDR.size)[0]
            if code:
                _check_errno(code)
                raise SockDiagError(-code, f"sock_diag dump: {os.strerror(-code)}")
            return True
        off += (length + 3) & ~3
    return False


def dump(sock: socket.socket, req: bytes, bufsize: int = 1 << 16):
    """Yield (records, stride, full) per run of records of one dump."""
    sock.send(req)
    while True:
        chunk = sock.recv(bufsize)
        if not chunk:
            raise SockDiagError(errno.EIO, "sock_diag dump ended without NLMSG_DONE")
        runs, done = split_records(chunk)
        yield from runs
        if done:
            return


def one_walk_pays(sockstat: str) -> bool:
    """Whether to dump all states in one walk of the kernel's tables rather than minisockets and
    full sockets apart, from /proc/net/sockstat (+ sockstat6). Each walk costs about as much as
    the sockets it passes; one walk saves that when TIME_WAIT dominates, but interleaves the
    record sizes, which is cheap to split only while full sockets are rare."""
    inuse = tw = 0
    for line in sockstat.splitlines():
        name, _, rest = line.partition(":")
        if name in ("TCP", "TCP6"):
            fields = rest.split()
            values = dict(zip(fields[::2], fields[1::2]))
            inuse += int(values.get("inuse", 0))
            tw += int(values.get("tw", 0))  # TCP's tw covers both families
    return tw >= 64 * max(1, inuse)


def listening_ports(sock: socket.socket, per_family: bool = False) -> bytes:
    """The local ports of the namespace's LISTEN sockets as a 65536-bit set: bit p (byte p >> 3,
    lowest bit first) for port p. A dump of listeners alone, so the kernel skips the tables of
    connected sockets; taken before the counting dumps because their order does not put a
    listener before its accepted sockets (per family, or minisockets first)."""
    bits = bytearray(8192)
    families = (socket.AF_INET, socket.AF_INET6) if per_family else (socket.AF_UNSPEC,)
    for family in families:
        for records, stride, _ in dump(sock, request(1 << LISTEN, family)):
            cols = (records[OFF_STATE::stride], records[OFF_SPORT::stride], records[OFF_SPORT + 1::stride])
            for state, hi, lo in set(zip(*cols)):
                if state == LISTEN:  # the kernel sends only these; a stray record must not hide endpoints
                    port = hi << 8 | lo
                    bits[port >> 3] |= 1 << (port & 7)
    return bytes(bits)


def open_socket() -> socket.socket:
    """A sock_diag socket in the calling thread's network namespace."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
