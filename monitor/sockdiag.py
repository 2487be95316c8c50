"""sockdiag.py: count TCP sockets by state, TIME_WAIT port and remote endpoint from sock_diag netlink (what `ss` uses)."""

from __future__ import annotations

import errno
import heapq
import os
import socket
import struct
import sys
from array import array
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from . import native
from .states import NUMBERS

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
OFF_FAMILY, OFF_STATE, OFF_SPORT, OFF_DPORT, OFF_DST, OFF_EXPIRES = 16, 17, 20, 22, 40, 68
# idiag_expires is a host-order u32 of milliseconds; a TIME_WAIT timer is at most 60 000, so
# its low 16 bits are all of it. (high byte offset, low byte offset) of those 16 bits:
EXPIRES_16 = (OFF_EXPIRES + 1, OFF_EXPIRES) if sys.byteorder == "little" else (OFF_EXPIRES + 2, OFF_EXPIRES + 3)

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
BATCH = 1 << 20


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
    if family == socket.AF_INET:
        return f"{socket.inet_ntop(socket.AF_INET, addr)}:{port}"
    if family == socket.AF_INET6 and len(addr) == 16:
        return f"[{socket.inet_ntop(socket.AF_INET6, addr)}]:{port}"
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


def _and(a: bytes, b: bytes) -> bytes:
    """Bytewise AND of two equal-length byte strings, as one big-integer operation."""
    return (int.from_bytes(a, "big") & int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _or(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") | int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _table(pred) -> bytes:
    """A bytes.translate table mapping each byte value to 0xFF where pred holds, else 0."""
    return bytes(0xFF if pred(b) else 0 for b in range(256))


_TW = _table(lambda b: b == TIME_WAIT)
# Sockets that hold a local port for a 4-tuple of their own: not listeners, and not the
# server side of a handshake (a request socket or SYN_RECV child uses the listener's port).
_HOLDING = _table(lambda b: b not in (LISTEN, SYN_RECV))
# The flag byte of an endpoint key: 1 for TIME_WAIT entered within the recent window,
# 3 for older TIME_WAIT, 2 for any other holding state.
_KIND = bytes(1 if b == TIME_WAIT else 2 for b in range(256))
_NOT_TO_2 = bytes(2 if b == 0 else 0 for b in range(256))  # 0x00 (not recent) -> 2


@lru_cache(maxsize=8)
def _range_tables(first: int, last: int) -> tuple:
    fh, fl, lh, ll = first >> 8, first & 0xFF, last >> 8, last & 0xFF
    if fh == lh:
        return (_table(lambda b: b == fh), _table(lambda b: fl <= b <= ll))
    return (_table(lambda b: fh < b < lh), _table(lambda b: b == fh), _table(lambda b: b >= fl),
            _table(lambda b: b == lh), _table(lambda b: b <= ll))


def in_range_mask(hi: bytes, lo: bytes, first: int, last: int) -> bytes:
    """0xFF for each port (given as its high and low bytes) in [first, last], else 0x00."""
    tables = _range_tables(first, last)
    if len(tables) == 2:
        return _and(hi.translate(tables[0]), lo.translate(tables[1]))
    inside, eq_first, ge_first, eq_last, le_last = tables
    low_edge = _and(hi.translate(eq_first), lo.translate(ge_first))
    high_edge = _and(hi.translate(eq_last), lo.translate(le_last))
    return _or(hi.translate(inside), _or(low_edge, high_edge))


_INVERT = bytes(0xFF if b == 0 else 0 for b in range(256))  # a mask's complement

# At most this many distinct high bytes among the listening ports in range are matched by
# byte tables (a pass over the records each, ~4 ns per record); more by a 65536-entry table,
# one lookup per record (~40 ns), whatever their number.
MAX_LISTENER_ROWS = 8


@lru_cache(maxsize=8)
def _listener_tables(listening: bytes, first: int, last: int) -> tuple:
    """((high-byte table, low-byte table) per high byte of the listening ports in [first, last])
    when there are at most MAX_LISTENER_ROWS of them, else a 65536-entry table, 0xFF for
    each of those ports."""
    ports = [p for i in range(first >> 3, (last >> 3) + 1) if listening[i]  # skip empty bytes whole
             for p in range(8 * i, 8 * i + 8) if first <= p <= last and listening[i] >> (p & 7) & 1]
    rows: dict[int, set] = {}
    for p in ports:
        rows.setdefault(p >> 8, set()).add(p & 0xFF)
    if len(rows) <= MAX_LISTENER_ROWS:
        return tuple((_table(lambda b, h=h: b == h), _table(lambda b, lows=lows: b in lows))
                     for h, lows in sorted(rows.items()))
    table = bytearray(65536)
    for p in ports:
        table[p] = 0xFF
    return bytes(table)


def not_listening_mask(hi: bytes, lo: bytes, listening: bytes, first: int, last: int) -> bytes | None:
    """0x00 for each port (given as its high and low bytes) in [first, last] that a listener
    holds (bit p of listening, as listening_ports() gives it), else 0xFF; None when no
    listener holds a port in the range."""
    tables = _listener_tables(listening, first, last)
    if not tables:
        return None
    if isinstance(tables, bytes):
        held = bytes(map(tables.__getitem__, _ports(hi, lo, b"\xff" * len(hi))))
    else:
        held = bytes(len(hi))
        for high, low in tables:
            held = _or(held, _and(hi.translate(high), lo.translate(low)))
    return held.translate(_INVERT)


def _ports(hi: bytes, lo: bytes, mask: bytes) -> array:
    """16-bit ports given as byte columns, as an array; masked-out entries become port 0."""
    buf = bytearray(2 * len(hi))
    first, second = (lo, hi) if sys.byteorder == "little" else (hi, lo)
    buf[0::2] = _and(first, mask)
    buf[1::2] = _and(second, mask)
    return array("H", buf)  # Counter iterates an array faster than a memoryview


@dataclass
class Tally:
    """What one poll of a namespace's socket tables found."""

    states: Counter = field(default_factory=Counter)  # state number -> sockets (NEW_SYN_RECV as 12)
    tw_local: Counter = field(default_factory=Counter)  # local port -> TIME_WAIT sockets
    tw_remote: Counter = field(default_factory=Counter)  # remote port -> TIME_WAIT sockets
    # (family, address bytes (4 or 16), port) -> sockets on a local port in the ephemeral range
    # that no listener holds, in TIME_WAIT / in any other state that holds a 4-tuple (not
    # LISTEN, not SYN_RECV). A listener's accepted sockets take no ephemeral port of this host,
    # and their peers (outsiders' choice) are no endpoints.
    remote_time_wait: Counter = field(default_factory=Counter)
    remote_other: Counter = field(default_factory=Counter)
    # Of remote_time_wait, the sockets whose timer has at least recent_ms left: those that
    # entered TIME_WAIT within the last (60 s - recent_ms). None: not counted.
    recent_ms: int | None = None
    remote_recent: Counter = field(default_factory=Counter)
    # The ports LISTEN sockets hold, as listening_ports() gives them; None: none.
    listening: bytes | None = field(default=None, repr=False)
    _endpoint_keys: Counter = field(default_factory=Counter, repr=False, compare=False)

    def add(self, records: bytes, stride: int, mini: bool, port_range: tuple[int, int] | None) -> None:
        """Count one run of records (record i at i * stride; mini: minisockets, whose SYN_RECV
        is a request socket). Every step runs over whole columns (bytes slices, translate,
        big-integer AND, Counter): Python never loops per socket."""
        st = records[OFF_STATE::stride]
        states = Counter({s: n for s in range(1, 13) if (n := st.count(s))})  # memchr speed
        if mini and SYN_RECV in states:
            states[NEW_SYN_RECV] += states.pop(SYN_RECV)
        self.states.update(states)
        sp_hi, sp_lo = records[OFF_SPORT::stride], records[OFF_SPORT + 1::stride]
        dp_hi, dp_lo = records[OFF_DPORT::stride], records[OFF_DPORT + 1::stride]
        if states.get(TIME_WAIT):
            tw = st.translate(_TW)
            # Counted straight into the totals (a Counter merged into another is a Python loop);
            # the masked-out port 0 is dropped at the end, in finish().
            self.tw_local.update(_ports(sp_hi, sp_lo, tw))
            self.tw_remote.update(_ports(dp_hi, dp_lo, tw))
        if port_range is None:
            return
        kind = st.translate(_KIND)
        if self.recent_ms is not None and states.get(TIME_WAIT):
            hi, lo = EXPIRES_16
            recent = in_range_mask(records[hi::stride], records[lo::stride], self.recent_ms, 0xFFFF)
            kind = _or(kind, recent.translate(_NOT_TO_2))  # TIME_WAIT: 1 if recent, else 3
        flag = _and(_and(in_range_mask(sp_hi, sp_lo, *port_range), st.translate(_HOLDING)), kind)
        if self.listening is not None and flag.strip(b"\0"):
            free = not_listening_mask(sp_hi, sp_lo, self.listening, *port_range)
            if free is not None:
                flag = _and(flag, free)
        if flag.strip(b"\0"):
            self._add_remotes(records, stride, flag, dp_hi, dp_lo)

    def top_ports(self, side: str, n: int) -> tuple[list, int]:
        """([(port, TIME_WAIT sockets), ...] for the n ports with most, most first, ties by
        lower port; the TIME_WAIT sockets over all ports). side: "local" or "remote"."""
        return top_of(self.port_counts(side), n)

    def port_counts(self, side: str) -> Counter:
        return self.tw_local if side == "local" else self.tw_remote

    def finish(self) -> "Tally":
        """Drop the placeholder port 0 of non-TIME_WAIT records (no socket has port 0), and
        decode the endpoint keys, once per distinct key rather than once per batch."""
        self.tw_local.pop(0, None)
        self.tw_remote.pop(0, None)
        for k, count in self._endpoint_keys.items():
            w = k if isinstance(k, tuple) else (k, 0, 0)
            head = w[0].to_bytes(8, sys.byteorder)
            if not head[0]:
                continue
            family = head[1]
            port = head[2] << 8 | head[3]
            if family != socket.AF_INET6:
                addr = head[4:8]
            else:
                addr = head[4:8] + w[1].to_bytes(8, sys.byteorder) + w[2].to_bytes(8, sys.byteorder)[:4]
            key = endpoint(family, addr, port)
            if head[0] == 2:
                self.remote_other[key] += count
            else:
                self.remote_time_wait[key] += count
                if head[0] == 1 and self.recent_ms is not None:
                    self.remote_recent[key] += count
        self._endpoint_keys.clear()
        return self

    def _add_remotes(self, records, stride, flag, dp_hi, dp_lo) -> None:
        # Key per record: flag, family, remote port, first 4 address bytes, as one 64-bit word,
        # counted straight into _endpoint_keys at C speed.
        n = len(flag)
        fam = records[OFF_FAMILY::stride]
        key = bytearray(8 * n)
        key[0::8], key[1::8], key[2::8], key[3::8] = flag, fam, dp_hi, dp_lo
        for i in range(4):
            key[4 + i::8] = records[OFF_DST + i::stride]
        words = array("Q", key)
        if fam.find(socket.AF_INET6) < 0:
            self._endpoint_keys.update(words)
        else:  # IPv6 needs the other 12 address bytes: two more words per record
            mid, low = bytearray(8 * n), bytearray(8 * n)
            for i in range(8):
                mid[i::8] = records[OFF_DST + 4 + i::stride]
            for i in range(4):
                low[i::8] = records[OFF_DST + 12 + i::stride]
            # An IPv4 record here gets (word, 0, 0): the same key finish() gives a bare word.
            self._endpoint_keys.update(zip(words, array("Q", mid), array("Q", low)))


def top_of(counts: Counter, n: int) -> tuple[list, int]:
    """The n largest positive counts as [(key, count)], most first, ties by lower key; and the sum."""
    top = heapq.nsmallest(n, ((k, c) for k, c in counts.items() if c > 0), key=lambda kc: (-kc[1], kc[0]))
    return top, sum(c for c in counts.values() if c > 0)


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


def poll(sock: socket.socket, port_range: tuple[int, int] | None, per_family: bool = False,
         one_walk: bool = False, recent_ms: int | None = None, top_n: int | None = None,
         rank_window: float = 0.0, use_native: bool | None = None):
    """Every TCP socket of the socket's namespace by state, TIME_WAIT sockets by local and
    remote port, and sockets on a local port in port_range (the ephemeral ports) by remote
    endpoint, leaving out the ports listeners hold (a dump of listeners first). Both families
    per walk; per_family uses the newer request, a walk per family, for kernels without the
    old one. one_walk: see one_walk_pays(). recent_ms: see Tally. Counted by _tally.c when it
    is built (use_native None), else by Tally. top_n, rank_window: decode only what
    summarize() keeps (see NativeTally.finish; None: everything)."""
    if use_native is None:
        use_native = native.LIB is not None
    listening = listening_ports(sock, per_family) if port_range is not None else None
    families = (socket.AF_INET, socket.AF_INET6) if per_family else (socket.AF_UNSPEC,)
    walks = (ALL_STATES,) if one_walk else (MINI_STATES, FULL_STATES)
    requests = [request(states, family) for family in families for states in walks]
    if use_native:
        return _poll_native(sock, requests, port_range, recent_ms, listening, top_n, rank_window)
    tally = Tally(recent_ms=recent_ms, listening=listening)
    for req in requests:
        # Runs of one kind are counted in batches of about BATCH bytes: few passes, and
        # buffers small enough to stay in cache and be reused instead of faulted in.
        groups: dict[tuple, list] = {}
        for records, stride, full in dump(sock, req):
            parts = groups.setdefault((stride, full), [])
            parts.append(records)
            if len(parts) * len(records) >= BATCH:
                tally.add(b"".join(parts), stride, not full, port_range)
                parts.clear()
        for (stride, full), parts in groups.items():
            if parts:
                tally.add(b"".join(parts), stride, not full, port_range)
    return tally.finish()


def _poll_native(sock, requests, port_range, recent_ms, listening, top_n, rank_window):
    tally = native.NativeTally(port_range, recent_ms, listening)
    buf = bytearray(1 << 16)  # a dump datagram is at most 32 KB
    try:
        for req in requests:
            sock.send(req)
            while True:
                n = sock.recv_into(buf)
                if not n:
                    raise SockDiagError(errno.EIO, "sock_diag dump ended without NLMSG_DONE")
                if tally.feed(buf, n):
                    break
    except BaseException:
        tally.close()
        raise
    return tally.finish(top_n, rank_window)


def open_socket() -> socket.socket:
    """A sock_diag socket in the calling thread's network namespace."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
