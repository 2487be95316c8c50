"""tally.py: a namespace's sockets counted from its sock_diag dumps by _tally.c (built at install), through ctypes."""

from __future__ import annotations

import ctypes
import errno
import heapq
import os
import socket
from array import array
from collections import Counter
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from monitor.sockets.forecast import TIME_WAIT_SECONDS
from monitor.sockets.sockdiag import (
    ALL_STATES,
    FULL_STATES,
    MINI_STATES,
    SockDiagError,
    endpoint,
    listening_ports,
    request,
)


def _library() -> Path:
    """setup.py builds _tally.c as an extension: _tally.cpython-311-x86_64-linux-gnu.so, say. It
    has no Python module in it; ctypes loads it."""
    here = Path(__file__).parent
    for suffix in EXTENSION_SUFFIXES:
        if (here / f"_tally{suffix}").exists():
            return here / f"_tally{suffix}"
    return here / f"_tally{EXTENSION_SUFFIXES[0]}"


LIBRARY = _library()

# Return codes of tcpstate_tally_chunk (keep in step with _tally.c).
MORE, DONE, MALFORMED, SHORT_RECORD, SHORT_ERROR, DUMP_ERROR, PARTIAL_ERROR, NOMEM, BAD_ERRNO = range(9)
SIDES = {"local": 0, "remote": 1}


class TallyError(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64), ("errnum", ctypes.c_int32)]


class Endpoint(ctypes.Structure):
    """struct tcpstate_endpoint, 32 bytes."""

    _fields_ = [("time_wait_recent", ctypes.c_uint32), ("time_wait_older", ctypes.c_uint32),
                ("other", ctypes.c_uint32), ("port", ctypes.c_uint16), ("family", ctypes.c_uint8),
                ("used", ctypes.c_uint8), ("addr", ctypes.c_uint8 * 16)]


def _load():
    """(library, None) or (None, why it is not there)."""
    if not LIBRARY.exists():
        return None, f"{LIBRARY} is not built: reinstall tcpstate (pip install ., or make setup in a checkout)"
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError as exc:
        return None, f"{LIBRARY}: {exc}"
    p, u64, u32, i64 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int64
    sigs = {
        "tcpstate_tally_new": (p, [u32, u32, i64]),
        "tcpstate_tally_free": (None, [p]),
        "tcpstate_tally_listening": (None, [p, ctypes.c_char_p]),
        "tcpstate_tally_chunk": (ctypes.c_int, [p, p, u64, ctypes.POINTER(TallyError)]),
        "tcpstate_tally_states": (None, [p, p]),
        "tcpstate_tally_bins": (None, [p, ctypes.c_int, p]),
        "tcpstate_tally_top": (u64, [p, ctypes.c_int, u64, p, p, ctypes.POINTER(u64)]),
        "tcpstate_tally_endpoint_count": (u64, [p]),
        "tcpstate_tally_endpoints": (u64, [p, p, u64]),
        "tcpstate_tally_top_endpoints": (u64, [p, u64, ctypes.c_double, ctypes.c_double, p, p]),
        "tcpstate_tally_sizeof_endpoint": (u64, []),
    }
    try:
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
    except AttributeError as exc:
        return None, f"{LIBRARY} is stale ({exc}); reinstall tcpstate (make setup rebuilds it)"
    if lib.tcpstate_tally_sizeof_endpoint() != ctypes.sizeof(Endpoint):
        return None, f"{LIBRARY}: struct tcpstate_endpoint size differs from tally.Endpoint; rebuild it"
    return lib, None


LIB, UNAVAILABLE = _load()


def _address(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class Tally:
    """What one poll of a namespace's socket tables found, counted by _tally.c: feed() it each
    datagram of a dump, then finish(). Python never touches a socket's record: TIME_WAIT per
    port stays in C as 65536 bins per side, endpoints in a hash table there, and finish(top_n)
    decodes only the top ones.

    states: state number -> sockets (NEW_SYN_RECV as 12). remote_time_wait / remote_other:
    sockets on a local port in the ephemeral range that no listener holds, in TIME_WAIT / in any
    other state that holds a 4-tuple (not LISTEN, not SYN_RECV), by remote endpoint (a
    listener's accepted sockets take no ephemeral port of this host). remote_recent: of
    remote_time_wait, those whose timer has at least recent_ms left, i.e. that entered TIME_WAIT
    within the last (60 s - recent_ms); None: not counted."""

    def __init__(self, port_range: tuple[int, int] | None, recent_ms: int | None, listening: bytes | None = None):
        """listening: the ports LISTEN sockets hold, as sockdiag.listening_ports() gives them
        (None: none); sockets on those ports are no endpoint's."""
        if LIB is None:
            raise RuntimeError(UNAVAILABLE)
        if listening is not None and len(listening) != 8192:
            raise ValueError("listening must be a 65536-bit set (8192 bytes)")
        first, last = port_range if port_range is not None else (0, 0)
        self.recent_ms = recent_ms
        self._t = LIB.tcpstate_tally_new(first, last, -1 if recent_ms is None else recent_ms)
        if not self._t:
            raise MemoryError("tcpstate_tally_new")
        if listening is not None:
            LIB.tcpstate_tally_listening(self._t, bytes(listening))
        self._err = TallyError()
        self.states: Counter = Counter()
        self.remote_time_wait: Counter = Counter()
        self.remote_other: Counter = Counter()
        self.remote_recent: Counter = Counter()
        self._top: dict = {}
        self._bins: dict = {}

    def feed(self, buf, length: int) -> bool:
        """Count the first length bytes of buf (bytes or a bytearray): True once the dump is done.
        Raises SockDiagError as sockdiag.split_records does."""
        if not self._t:
            raise RuntimeError("the tally is finished")
        if length > len(buf):
            raise ValueError("length beyond the buffer")
        ptr = buf if isinstance(buf, bytes) else _address(buf)
        rc = LIB.tcpstate_tally_chunk(self._t, ptr, length, ctypes.byref(self._err))
        if rc == MORE:
            return False
        if rc == DONE:
            return True
        e = self._err
        if rc == MALFORMED:
            raise SockDiagError(errno.EBADMSG, f"malformed netlink message at offset {e.offset} (length {e.length})")
        if rc == SHORT_RECORD:
            raise SockDiagError(errno.EBADMSG, f"short sock_diag record ({e.length} bytes)")
        if rc == SHORT_ERROR:
            raise SockDiagError(errno.EBADMSG, f"short NLMSG_ERROR at offset {e.offset}")
        if rc == DUMP_ERROR:
            raise SockDiagError(-e.errnum, f"sock_diag dump: {os.strerror(-e.errnum)}")
        if rc == PARTIAL_ERROR:
            raise SockDiagError(-e.errnum, f"sock_diag dump failed part way: {os.strerror(-e.errnum)}")
        if rc == BAD_ERRNO:
            raise SockDiagError(errno.EBADMSG, f"malformed error code {e.errnum} in a sock_diag dump")
        raise MemoryError("counting sock_diag endpoints")

    def finish(self, top_n: int | None = None, rank_window: float = 0.0) -> "Tally":
        """Copy the counts out of C and free it. top_n None keeps everything: all 65536 bins
        per side, every endpoint. Otherwise only what statepoll.summarize() will use is
        decoded: the top_n ports per side, and the top_n endpoints in summarize()'s order
        (ranked with the forecast over rank_window seconds of TIME_WAIT entries; 0: by ports
        in use alone, as when there is no forecast)."""
        if not self._t:
            raise RuntimeError("the tally is finished")
        try:
            states = array("Q", bytes(8 * 13))
            LIB.tcpstate_tally_states(self._t, _address(states))
            self.states = Counter({s: n for s, n in enumerate(states) if n})
            for side, code in SIDES.items():
                if top_n is None:
                    bins = array("I", bytes(4 * 65536))
                    LIB.tcpstate_tally_bins(self._t, code, _address(bins))
                    bins[0] = 0
                    self._bins[side] = bins
                else:
                    ports, counts = array("H", bytes(2 * top_n + 2)), array("I", bytes(4 * top_n + 4))
                    total = ctypes.c_uint64()
                    k = LIB.tcpstate_tally_top(self._t, code, top_n, _address(ports), _address(counts),
                                               ctypes.byref(total))
                    self._top[side] = (top_n, list(zip(ports[:k], counts[:k])), total.value)
            if top_n is None:
                n = LIB.tcpstate_tally_endpoint_count(self._t)
                entries = (Endpoint * n)()
                n = LIB.tcpstate_tally_endpoints(self._t, entries, n)
            else:
                entries, ranks = (Endpoint * top_n)(), (ctypes.c_double * top_n)()
                n = LIB.tcpstate_tally_top_endpoints(self._t, top_n, rank_window, TIME_WAIT_SECONDS, entries, ranks)
        finally:
            LIB.tcpstate_tally_free(self._t)
            self._t = None
        for e in entries[:n]:
            key = endpoint(e.family, bytes(e.addr) if e.family == socket.AF_INET6 else bytes(e.addr[:4]), e.port)
            if e.time_wait_recent + e.time_wait_older:
                self.remote_time_wait[key] += e.time_wait_recent + e.time_wait_older
            if e.time_wait_recent and self.recent_ms is not None:
                self.remote_recent[key] += e.time_wait_recent
            if e.other:
                self.remote_other[key] += e.other
        return self

    def close(self) -> None:
        if getattr(self, "_t", None):
            LIB.tcpstate_tally_free(self._t)
            self._t = None

    __del__ = close  # a tally abandoned part way (an exception in a test) still frees its C memory

    def top_ports(self, side: str, n: int) -> tuple[list, int]:
        """([(port, TIME_WAIT sockets), ...] for the n ports with most, most first, ties by
        lower port; the TIME_WAIT sockets over all ports)."""
        if side in self._top:
            kept, top, total = self._top[side]
            if n > kept:
                raise ValueError(f"finish() kept the top {kept} ports, not {n}")
            return top[:n], total
        return top_of(self.port_counts(side), n)

    def port_counts(self, side: str) -> Counter:
        if side not in self._bins:
            raise ValueError("finish(top_n) kept only the top ports")
        return Counter({p: c for p, c in enumerate(self._bins[side]) if c})



def top_of(counts: Counter, n: int) -> tuple[list, int]:
    """The n largest positive counts as [(key, count)], most first, ties by lower key; and the sum."""
    top = heapq.nsmallest(n, ((k, c) for k, c in counts.items() if c > 0), key=lambda kc: (-kc[1], kc[0]))
    return top, sum(c for c in counts.values() if c > 0)


def poll(sock: socket.socket, port_range: tuple[int, int] | None, per_family: bool = False,
         one_walk: bool = False, recent_ms: int | None = None, top_n: int | None = None,
         rank_window: float = 0.0) -> Tally:
    """Every TCP socket of the socket's namespace by state, TIME_WAIT sockets by local and
    remote port, and sockets on a local port in port_range (the ephemeral ports) by remote
    endpoint, leaving out the ports listeners hold (a dump of listeners first). Both families
    per walk; per_family uses the newer request, a walk per family, for kernels without the
    old one. one_walk: see sockdiag.one_walk_pays(). recent_ms: see Tally. top_n, rank_window:
    decode only what summarize() keeps (see Tally.finish; None: everything)."""
    listening = listening_ports(sock, per_family) if port_range is not None else None
    families = (socket.AF_INET, socket.AF_INET6) if per_family else (socket.AF_UNSPEC,)
    walks = (ALL_STATES,) if one_walk else (MINI_STATES, FULL_STATES)
    tally = Tally(port_range, recent_ms, listening)
    buf = bytearray(1 << 16)  # a dump datagram is at most 32 KB
    try:
        for req in (request(states, family) for family in families for states in walks):
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

