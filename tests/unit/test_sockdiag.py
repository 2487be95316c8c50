"""sock_diag parsing and counting: synthetic netlink datagrams checked against a plain per-record reference."""

import errno
import random
import socket
import struct
import subprocess
from collections import Counter

import pytest

from monitor.sockets import sockdiag, tally
from monitor.sockets.kstats import Limits
from monitor.sockets.poller import Target, summarize
from monitor.sockets.sockdiag import (
    SockDiagError,
    endpoint,
    endpoint_label,
    request,
    split_records,
)

from .tally_reference import Reference

HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLM_F_MULTI = 0x2
AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING, \
    NEW_SYN_RECV = range(1, 13)
# Full sockets in SYN_RECV exist (a Fast Open child); TIME_WAIT and request sockets are minisockets.
FULL = (ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING)


# --- building datagrams -------------------------------------------------------------------------

def attr(kind, payload):
    """One netlink attribute, padded to 4 bytes as the kernel pads it."""
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


SHUTDOWN, SKV6ONLY, MARK, CGROUP_ID, SOCKOPT = 8, 9, 15, 21, 22
# Attribute sets giving the record sizes the kernel sends. Minisockets carry at most the mark
# (88 bytes; 96 when dumped by root); full sockets always carry INET_DIAG_SHUTDOWN, then the
# cgroup id, socket options, the mark for root, SKV6ONLY for IPv6 listeners (104 .. 132).
ATTRS = {
    88: b"",
    96: attr(MARK, struct.pack("=I", 0)),
    104: attr(SHUTDOWN, b"\0") + attr(SOCKOPT, bytes(2)),
    116: attr(SHUTDOWN, b"\0") + attr(CGROUP_ID, struct.pack("=Q", 1)) + attr(SOCKOPT, bytes(2)),
    124: attr(SHUTDOWN, b"\0") + attr(MARK, struct.pack("=I", 7)) + attr(CGROUP_ID, struct.pack("=Q", 1))
    + attr(SOCKOPT, bytes(2)),
    132: attr(SHUTDOWN, b"\0") + attr(SKV6ONLY, b"\0") + attr(MARK, struct.pack("=I", 7))
    + attr(CGROUP_ID, struct.pack("=Q", 1)) + attr(SOCKOPT, bytes(2)),
}
assert {k: 88 + len(v) for k, v in ATTRS.items()} == {k: k for k in ATTRS}
MINI_SIZES, FULL_SIZES = (88, 96), (104, 116, 124, 132)


def record(family, state, sport, dport, dst, size=None, kind=sockdiag.SOCK_DIAG_BY_FAMILY, src=bytes(16),
           expires=0):
    """nlmsghdr + struct inet_diag_msg + attributes: ports big-endian, the rest host order.
    The size picks the attributes, and so whether the record is a full socket. expires: the
    u32 idiag_expires, milliseconds left on the socket's timer."""
    if size is None:
        size = 96 if state in (TIME_WAIT, SYN_RECV) else 124
    msg = (struct.pack("=BBBB", family, state, 0, 0) + struct.pack("!HH", sport, dport)
           + src.ljust(16, b"\0") + dst.ljust(16, b"\0")
           + struct.pack("=I", 0) + struct.pack("=Q", 0xC00C1E)  # if, cookie
           + struct.pack("=IIIII", expires, 0, 0, 0, 0))  # expires, rqueue, wqueue, uid, inode
    assert len(msg) == 72
    body = msg + ATTRS[size]
    return HDR.pack(HDR.size + len(body), kind, NLM_F_MULTI, 1, 0) + body


def mini(family, state, sport, dport, dst, size=96, expires=0):
    return record(family, state, sport, dport, dst, size, expires=expires)


def full(family, state, sport, dport, dst, size=124, expires=0):
    return record(family, state, sport, dport, dst, size, expires=expires)


def done(errno_value=0):
    return HDR.pack(20, sockdiag.NLMSG_DONE, NLM_F_MULTI, 1, 0) + struct.pack("=i", errno_value)


def error(errno_value):
    """NLMSG_ERROR: the error and the header of the request it refers to."""
    body = struct.pack("=i", errno_value) + HDR.pack(76, 18, 0x301, 1, 0)
    return HDR.pack(HDR.size + len(body), sockdiag.NLMSG_ERROR, 0, 1, 0) + body


# --- the reference ------------------------------------------------------------------------------

def has_shutdown(chunk, off, length):
    pos = off + 88
    while pos + 4 <= off + length:
        nla_len, nla_type = struct.unpack_from("=HH", chunk, pos)
        if nla_type == SHUTDOWN:
            return True
        pos += (nla_len + 3) & ~3
    return False


def parse(chunk):
    """Every socket record of a datagram as a dict, one record at a time."""
    out, off = [], 0
    while off + 16 <= len(chunk):
        length, kind = struct.unpack_from("=IH", chunk, off)
        if kind in (18, 20):
            sport, dport = struct.unpack_from("!HH", chunk, off + 20)
            (expires,) = struct.unpack_from("=I", chunk, off + 68)
            out.append(dict(family=chunk[off + 16], state=chunk[off + 17], sport=sport, dport=dport,
                            dst=chunk[off + 40:off + 56], expires=expires, full=has_shutdown(chunk, off, length)))
        off += (length + 3) & ~3
    return out


def port_set(ports):
    """A set of ports as the 65536-bit set listening_ports() returns, built bit by bit."""
    bits = bytearray(8192)
    for p in ports:
        bits[p // 8] |= 1 << p % 8
    return bytes(bits)


def reference(records, port_range, recent_ms=None, listening=()):
    """What the C counter must compute, written the obvious way, record by record. listening:
    the ports listeners hold."""
    ref = Reference(recent_ms=recent_ms)
    for r in records:
        state = r["state"]
        if 1 <= state <= 12:
            # A minisocket in SYN_RECV is a request socket: the kernel's NEW_SYN_RECV.
            ref.states[NEW_SYN_RECV if state == SYN_RECV and not r["full"] else state] += 1
        if state == TIME_WAIT:
            ref.tw_local[r["sport"]] += 1
            ref.tw_remote[r["dport"]] += 1
        if port_range is None or not port_range[0] <= r["sport"] <= port_range[1]:
            continue
        if state in (LISTEN, SYN_RECV):  # they use the listener's port, not an ephemeral one of their own
            continue
        if r["sport"] in listening:  # a listener's accepted socket: its peer picked the 4-tuple
            continue
        key = endpoint(r["family"], r["dst"], r["dport"])
        (ref.remote_time_wait if state == TIME_WAIT else ref.remote_other)[key] += 1
        # A TIME_WAIT timer starts at 60 000 ms: at least recent_ms left means it entered
        # within the last 60 s - recent_ms. Other states' timers mean something else.
        if state == TIME_WAIT and recent_ms is not None and r["expires"] >= recent_ms:
            ref.remote_recent[key] += 1
    return ref


def tally_of(chunks, port_range, recent_ms=None, listening=None):
    """What poll() counts from the datagrams of a dump, all of it decoded (returned); and, as the
    daemon asks, only the top ports and endpoints decoded, ranked in C the way summarize() ranks
    them, with a forecast (window 30 s) and without (all ports reserved): the same as far as
    they go. listening: ports listeners hold (a set)."""
    t = native_tally_of(chunks, port_range, recent_ms, listening=listening)
    for window, reserved, n in ((30.0, 0, 3), (30.0, 0, 1), (0.0, 70000, 2)):
        kept = native_tally_of(chunks, port_range, recent_ms, top_n=n, rank_window=window, listening=listening)
        assert kept.states == t.states
        for side in ("local", "remote"):
            assert kept.top_ports(side, n) == t.top_ports(side, n)
            assert kept.top_ports(side, n - 1) == t.top_ports(side, n - 1)
            with pytest.raises(ValueError):
                kept.top_ports(side, n + 1)
        first, last = port_range or (32768, 60999)
        limits = Limits(4096, first, last, reserved)
        want = summarize(Target.own(), t, limits, {}, window or 30.0, n, 0.0, 0.0, 0.0)
        got = summarize(Target.own(), kept, limits, {}, window or 30.0, n, 0.0, 0.0, 0.0)
        assert got.endpoints == want.endpoints and got.time_wait_ports == want.time_wait_ports
    return t


def native_tally_of(chunks, port_range, recent_ms=None, top_n=None, rank_window=0.0, listening=None):
    c = tally.Tally(port_range, recent_ms, None if listening is None else port_set(listening))
    for chunk in chunks:
        c.feed(chunk, len(chunk))
    return c.finish(top_n, rank_window)


def assert_same(got, want):
    # Counters compare equal ignoring zero entries; compare the positive counts.
    for name in ("states", "remote_time_wait", "remote_other", "remote_recent"):
        g, w = getattr(got, name), getattr(want, name)
        assert +g == +w, name
        assert all(v > 0 for v in g.values()), name
    for side in ("local", "remote"):
        g, w = got.port_counts(side), want.port_counts(side)
        assert +g == +w, side
        for n in (0, 1, 3, 10, 70000):
            assert got.top_ports(side, n) == tally.top_of(w, n)


def decode_both(chunk):
    """split_records, and the C counter fed the same datagram: both raise the same error."""
    errors = []
    for decode in (split_records, lambda c: tally.Tally(None, None).feed(c, len(c))):
        try:
            decode(chunk)
            errors.append(None)
        except SockDiagError as exc:
            errors.append(exc)
    py, c = errors
    assert (py is None) == (c is None)
    if py is not None:
        assert (py.errno, str(py)) == (c.errno, str(c))
        raise py


def run_count(chunk):
    runs, _ = split_records(chunk)
    return sum(len(records) // stride for records, stride, _ in runs)


# --- random record sets -------------------------------------------------------------------------

V4 = [bytes([198, 18, 0, i]) for i in range(1, 5)] + [bytes([10, 0, 0, 1])]
V6 = [socket.inet_pton(AF_INET6, a) for a in ("2001:db8::1", "2001:db8::2", "fe80::1:2:3:4", "::1")]
MAPPED = [bytes(10) + b"\xff\xff" + a for a in V4[:3]]  # the same peers reached over dual-stack sockets
RANGES = [(40000, 40100), (1024, 65535), (32768, 60999), (40000, 40000), (255, 256), (0x1200, 0x12FF)]
# recent_ms = (60 s - window) in ms, for windows of 30 s, 60 s, 1 ms, 0.5 s; thresholds on and
# off a byte boundary (the comparison runs on the high and low bytes apart); None: not counted.
RECENT = [30000, 0, 59999, 59500, 255, 256, 0x1234, 0x12FF, None]


def sport_for(rng, port_range):
    """Local ports that probe the range's edges and its high/low byte split."""
    first, last = port_range or (32768, 60999)
    edges = [first - 1, first, first + 1, last - 1, last, last + 1,
             (first & 0xFF00) | rng.randrange(256), (last & 0xFF00) | rng.randrange(256),
             rng.randint(first, last)]
    p = rng.choice(edges) if rng.random() < 0.7 else rng.randint(1, 65535)
    return min(max(p, 1), 65535)


def expires_for(rng, state, recent_ms):
    """idiag_expires probing the recent threshold: for TIME_WAIT (at most 60 000 ms) exactly
    at it, one below and one above, its byte split, and anywhere; for other states, timers
    longer than any TIME_WAIT (keepalive, a SYN-ACK retry) whose low 16 bits are at or above
    the threshold too, which must still not count as recent TIME_WAIT entries."""
    thr = 30000 if recent_ms is None else recent_ms
    if state == TIME_WAIT:
        edges = [thr - 1, thr, thr + 1, 0, 60000, (thr & 0xFF00) | rng.randrange(256),
                 ((thr & 0xFF00) + 0x100) | rng.randrange(256), ((thr & 0xFF00) - 0x100) | rng.randrange(256),
                 rng.randint(0, 60000)]
        e = rng.choice(edges) if rng.random() < 0.7 else rng.randint(0, 60000)
        return min(max(e, 0), 60000)
    return rng.choice([0, thr, 60000, 0xFFFF, 0x10000 + thr, 7_200_000, rng.randint(thr, 2**32 - 1)])


def random_records(rng, n, walk, port_range, families="mixed", mini_sizes=(96,), full_sizes=(124,),
                   garbage=False, recent_ms=None):
    """walk: "mini" (TIME_WAIT and request sockets), "full", or "one" (all interleaved)."""
    out = []
    for _ in range(n):
        fam_kind = rng.choice(["v4", "v6", "mapped"]) if families == "mixed" else families
        if fam_kind == "v4":
            family, dst = AF_INET, rng.choice(V4)
            if garbage:  # bytes past the IPv4 address must not split the key
                dst += bytes(rng.randrange(256) for _ in range(12))
        elif fam_kind == "v6":
            family, dst = AF_INET6, rng.choice(V6)
        else:
            family, dst = AF_INET6, rng.choice(MAPPED)
        is_mini = walk == "mini" or (walk == "one" and rng.random() < 0.7)
        if is_mini:
            state, size = (TIME_WAIT if rng.random() < 0.8 else SYN_RECV), rng.choice(mini_sizes)
        else:
            state, size = rng.choice(FULL), rng.choice(full_sizes)
        dport = 0 if state == LISTEN else rng.choice([80, 443, 5432, 8080, rng.randint(1, 65535)])
        out.append(record(family, state, sport_for(rng, port_range), dport, dst, size,
                          expires=expires_for(rng, state, recent_ms)))
    return out


def datagrams(rng, records, end=True):
    """Cut records into datagrams of random sizes, the last ending in NLMSG_DONE."""
    out, i = [], 0
    while i < len(records):
        k = rng.randint(1, 60)
        out.append(b"".join(records[i:i + k]))
        i += k
    if end:
        if out:
            out[-1] += done()
        else:
            out.append(done())
    return out


def check(chunks, port_range, recent_ms=None, listening=None):
    ref = reference([r for c in chunks for r in parse(c)], port_range, recent_ms, listening or ())
    assert sum(run_count(c) for c in chunks) == sum(len(parse(c)) for c in chunks)  # none lost
    got = tally_of(chunks, port_range, recent_ms, listening)
    assert_same(got, ref)
    if recent_ms is None:
        assert not got.remote_recent
    return got


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("walk", ["mini", "full"])
def test_uniform_records_match_reference(seed, walk):
    rng = random.Random(seed)
    port_range = RANGES[seed % len(RANGES)]
    recent_ms = RECENT[seed % len(RECENT)]
    recs = random_records(rng, rng.randint(1, 400), walk, port_range, recent_ms=recent_ms)
    chunks = datagrams(rng, recs)
    for chunk in chunks:  # a datagram of one record size of MIN_RUN or more is one run, uncut
        n = len(parse(chunk))
        runs, _ = split_records(chunk)
        if n >= sockdiag.MIN_RUN:
            size = 96 if walk == "mini" else 124
            assert [(len(r), s, f) for r, s, f in runs] == [(n * size, size, walk == "full")]
    check(chunks, port_range, recent_ms)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("walk", ["mini", "full", "one"])
def test_mixed_sizes_match_reference(seed, walk):
    rng = random.Random(1000 + seed)
    port_range = RANGES[seed % len(RANGES)]
    recent_ms = RECENT[seed % len(RECENT)]
    recs = random_records(rng, rng.randint(2, 400), walk, port_range, mini_sizes=MINI_SIZES,
                          full_sizes=FULL_SIZES, recent_ms=recent_ms)
    check(datagrams(rng, recs), port_range, recent_ms)


@pytest.mark.parametrize("seed", range(8))
def test_one_walk_runs_match_reference(seed):
    # Long runs of TIME_WAIT with full sockets and request sockets between them, as the
    # one-walk dump of a host dominated by TIME_WAIT sends: runs and cut records together.
    rng = random.Random(2000 + seed)
    port_range = RANGES[seed % len(RANGES)]
    recent_ms = RECENT[seed % len(RECENT)]
    recs = []
    while len(recs) < 600:
        recs += random_records(rng, rng.choice([1, 2, 3, 4, 5, 40]), rng.choice(["mini", "full"]), port_range,
                               mini_sizes=(rng.choice(MINI_SIZES),), full_sizes=(rng.choice(FULL_SIZES),),
                               recent_ms=recent_ms)
    chunks = datagrams(rng, recs)
    assert any(s != 88 for c in chunks for _, s, _ in split_records(c)[0])  # some runs uncut
    got = check(chunks, port_range, recent_ms)
    if recent_ms:
        # The records did probe the threshold: TIME_WAIT on an ephemeral port exactly at it and
        # one below, and other holding sockets with longer timers; some counted, some not.
        first, last = port_range
        counted = [r for c in chunks for r in parse(c) if first <= r["sport"] <= last]
        tw = {r["expires"] for r in counted if r["state"] == TIME_WAIT}
        assert {recent_ms, recent_ms - 1} <= tw
        assert any(r["expires"] >= recent_ms for r in counted if r["state"] not in (TIME_WAIT, LISTEN, SYN_RECV))
        assert 0 < sum(got.remote_recent.values()) < sum(got.remote_time_wait.values())


@pytest.mark.parametrize("families", ["v4", "v6", "mapped", "mixed"])
@pytest.mark.parametrize("port_range", RANGES + [None])
def test_families_and_ranges_match_reference(families, port_range):
    rng = random.Random(f"{families} {port_range}")  # str seeds are stable across runs
    for walk in ("mini", "full", "one"):
        for recent_ms in (None, 30000, rng.choice(RECENT[1:-1])):
            recs = random_records(rng, 300, walk, port_range, families=families, garbage=True,
                                  recent_ms=recent_ms)
            check(datagrams(rng, recs), port_range, recent_ms)


def listeners_for(rng, records, port_range, many):
    """Ports for listeners: about a third of those the in-range holding records use (so some
    sockets are left out), a few anywhere, and with many, 40 more in the range (on more than
    MAX_LISTENER_ROWS high bytes where the range spans them)."""
    first, last = port_range
    used = sorted({r["sport"] for r in records
                   if first <= r["sport"] <= last and r["state"] not in (LISTEN, SYN_RECV)})
    ports = set(rng.sample(used, (len(used) + 2) // 3))
    ports |= {rng.randint(1, 65535) for _ in range(5)}
    if many:
        ports |= {rng.randint(first, last) for _ in range(40)}
    return ports


@pytest.mark.parametrize("many", [False, True])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("port_range", RANGES)
def test_listener_ports_match_reference(port_range, seed, many):
    rng = random.Random(f"listeners {port_range} {seed} {many}")
    recent_ms = rng.choice(RECENT)
    recs = []
    while len(recs) < 400:
        recs += random_records(rng, rng.choice([1, 3, 40]), rng.choice(["mini", "full", "one"]), port_range,
                               mini_sizes=MINI_SIZES, full_sizes=FULL_SIZES, recent_ms=recent_ms)
    records = [r for rec in recs for r in parse(rec)]
    listening = listeners_for(rng, records, port_range, many)
    first, last = port_range
    got = check(datagrams(rng, recs), port_range, recent_ms, listening)
    # The listeners did hide sockets that would count otherwise: exactly those on their ports.
    held = [r for r in records if first <= r["sport"] <= last and r["state"] not in (LISTEN, SYN_RECV)]
    hidden = sum(r["sport"] in listening for r in held)
    assert hidden > 0
    total = sum(got.remote_time_wait.values()) + sum(got.remote_other.values())
    assert total == len(held) - hidden


@pytest.mark.parametrize("port_range", RANGES)
def test_range_edges_exactly(port_range):
    # One socket on each edge and one past each: exactly those inside count.
    first, last = port_range
    ports = [p for p in (first - 1, first, last, last + 1) if 1 <= p <= 65535]
    for recs in ([mini(AF_INET, TIME_WAIT, p, 80, V4[0]) for p in ports],
                 [mini(AF_INET, TIME_WAIT, p, 80, V4[0]) for p in ports] * 3):  # cut, and one run
        t = tally_of([b"".join(recs) + done()], port_range)
        inside = sum(first <= p <= last for p in ports) * len(recs) // len(ports)
        assert t.remote_time_wait == Counter({(AF_INET, V4[0], 80): inside})


def test_request_sockets_are_new_syn_recv():
    recs = [mini(AF_INET, SYN_RECV, 40000, 80, V4[0]), mini(AF_INET, TIME_WAIT, 40000, 80, V4[0]),
            full(AF_INET, SYN_RECV, 40000, 80, V4[0]), full(AF_INET, ESTABLISHED, 40000, 80, V4[0])]
    t = tally_of([b"".join(recs) + done()], (40000, 40100))
    assert +t.states == {NEW_SYN_RECV: 1, SYN_RECV: 1, TIME_WAIT: 1, ESTABLISHED: 1}
    # Neither kind of SYN_RECV holds an ephemeral port: they share the listener's.
    assert t.remote_time_wait == Counter({(AF_INET, V4[0], 80): 1})
    assert t.remote_other == Counter({(AF_INET, V4[0], 80): 1})


# Listeners on other ports in the range: none, or on more high bytes than MAX_LISTENER_ROWS
# (the 65536-entry table instead of byte tables); none on a port the records use.
OTHER_LISTENERS = {"none": [], "many": [0x8107 + 0x100 * i for i in range(12)]}


@pytest.mark.parametrize("others", OTHER_LISTENERS)
@pytest.mark.parametrize("copies", [1, 4])  # cut record by record, and runs
def test_a_listeners_accepted_sockets_are_no_endpoints(copies, others):
    # Port 40000 lies in the ephemeral range, and a service listens on it (IPv4), and on 40001
    # (dual stack). The sockets it accepted, in any state, took no ephemeral port of this host:
    # their peers' addresses and ports must not become endpoints. This host's own connections
    # from ephemeral ports, 40002 among them, are counted.
    port_range = (32768, 60999)
    clients = [(AF_INET, V4[0], 51000), (AF_INET, V4[1], 51001), (AF_INET6, V6[0], 51002),
               (AF_INET6, MAPPED[2], 52000)]
    accepted = [full(clients[0][0], ESTABLISHED, 40000, clients[0][2], clients[0][1]),
                mini(clients[1][0], TIME_WAIT, 40000, clients[1][2], clients[1][1], expires=59000),
                full(clients[2][0], CLOSE_WAIT, 40000, clients[2][2], clients[2][1]),
                full(clients[3][0], ESTABLISHED, 40001, clients[3][2], clients[3][1])]
    listeners = [full(AF_INET, LISTEN, 40000, 0, bytes(4)), full(AF_INET6, LISTEN, 40001, 0, bytes(16), size=132)]
    db = (AF_INET, V4[3], 5432)
    outbound = [full(AF_INET, ESTABLISHED, 45000, 5432, V4[3]), mini(AF_INET, TIME_WAIT, 45001, 5432, V4[3],
                                                                       expires=59000),
                full(AF_INET, ESTABLISHED, 40002, 5432, V4[3])]
    # The accepted sockets before their listeners, as a dump may send them.
    chunk = b"".join(r for r in accepted + outbound + listeners for _ in range(copies)) + done()
    listening = {40000, 40001, *OTHER_LISTENERS[others]}
    t = check([chunk], port_range, 30000, listening)
    assert t.remote_other == Counter({db: 2 * copies})
    assert t.remote_time_wait == Counter({db: copies}) and t.remote_recent == Counter({db: copies})
    assert not {endpoint(*c) for c in clients} & (set(t.remote_other) | set(t.remote_time_wait))
    # By state and TIME_WAIT by port they count as before.
    assert +t.states == {ESTABLISHED: 4 * copies, TIME_WAIT: 2 * copies, CLOSE_WAIT: copies, LISTEN: 2 * copies}
    assert t.port_counts("local") == Counter({40000: copies, 45001: copies})
    assert t.port_counts("remote") == Counter({51001: copies, 5432: copies})
    # Without the listeners' ports the clients were endpoints: what this leaves out.
    t = tally_of([chunk], port_range, 30000)
    assert t.remote_other == Counter({db: 2 * copies, endpoint(*clients[0]): copies, endpoint(*clients[2]): copies,
                                      endpoint(*clients[3]): copies})
    assert t.remote_time_wait == Counter({db: copies, endpoint(*clients[1]): copies})


def test_tally_refuses_a_port_set_of_another_size():
    with pytest.raises(ValueError):
        tally.Tally((32768, 60999), None, bytes(8191))


@pytest.mark.parametrize("recent_ms", [30000, 0x1200, 255, 1])
@pytest.mark.parametrize("copies", [1, 4])  # cut record by record, and runs
def test_recent_threshold_exactly(recent_ms, copies):
    # TIME_WAIT with at least recent_ms left on its timer entered within the window: the one
    # exactly at the threshold counts, the one a millisecond below does not. Other states'
    # timers (keepalive, retransmits) run longer than any TIME_WAIT, or have the same low 16
    # bits as a recent one: they are never recent. Off the ephemeral range nothing counts.
    web, db = (AF_INET, V4[0], 80), (AF_INET, V4[1], 5432)
    recs = [mini(AF_INET, TIME_WAIT, 40000, 80, V4[0], expires=e)
            for e in (recent_ms - 1, recent_ms, recent_ms + 1, 60000, 0)]
    recs += [full(AF_INET, state, 40001, 5432, V4[1], expires=e)
             for state, e in ((ESTABLISHED, recent_ms), (ESTABLISHED, 7_200_000), (FIN_WAIT1, 0x10000 + recent_ms),
                              (CLOSE_WAIT, 60000))]
    recs += [mini(AF_INET, SYN_RECV, 40002, 80, V4[0], expires=60000),  # a request socket: the listener's port
             mini(AF_INET, TIME_WAIT, 39999, 80, V4[0], expires=60000)]  # off the range
    chunk = b"".join(r for r in recs for _ in range(copies)) + done()
    t = tally_of([chunk], (40000, 40100), recent_ms)
    assert t.remote_time_wait == Counter({web: 5 * copies})
    assert t.remote_recent == Counter({web: 3 * copies})
    assert t.remote_other == Counter({db: 4 * copies})
    assert +t.states == {TIME_WAIT: 6 * copies, ESTABLISHED: 2 * copies, FIN_WAIT1: copies, CLOSE_WAIT: copies,
                         NEW_SYN_RECV: copies}
    # Without a threshold nothing is recent, and nothing else changes.
    t = tally_of([chunk], (40000, 40100))
    assert t.remote_recent == Counter() and t.remote_time_wait == Counter({web: 5 * copies})


def test_recent_needs_the_port_range():
    # Without a port range there are no endpoints, so no recent ones either.
    recs = [mini(AF_INET, TIME_WAIT, 40000, 80, V4[0], expires=60000)] * 5
    t = tally_of([b"".join(recs) + done()], None, 30000)
    assert t.port_counts("local") == Counter({40000: 5}) and not t.remote_time_wait and not t.remote_recent


class FakeDiagSocket:
    """Answers each dump request with the next reply (a list of datagrams)."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests = []
        self.pending = []

    def send(self, req):
        self.requests.append(req)
        self.pending = list(self.replies.pop(0))
        return len(req)

    def recv(self, bufsize):
        return self.pending.pop(0)

    def recv_into(self, buf):
        chunk = self.pending.pop(0)
        buf[:len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("kw, walks", [({}, 2), ({"one_walk": True}, 1), ({"per_family": True}, 4)])
def test_poll_passes_recent_ms_to_every_walk(kw, walks):
    web = (AF_INET, V4[0], 80)
    tw = b"".join(mini(AF_INET, TIME_WAIT, 40000 + i, 80, V4[0], expires=e)
                  for i, e in enumerate((29999, 30000, 45000, 1000, 60000)))
    no_listeners = [[done()]] * (2 if kw.get("per_family") else 1)
    replies = no_listeners + [[tw, done()] for _ in range(walks)]
    t = tally.poll(FakeDiagSocket(replies), (40000, 40100), recent_ms=30000, **kw)
    assert t.remote_time_wait == Counter({web: 5 * walks})
    assert t.remote_recent == Counter({web: 3 * walks})
    t = tally.poll(FakeDiagSocket(replies), (40000, 40100), **kw)
    assert t.recent_ms is None and t.remote_recent == Counter()


def listener_dump_request(family):
    return request(1 << LISTEN, family)


@pytest.mark.parametrize("per_family", [False, True])
def test_listening_ports(per_family):
    # Listeners of both families over several datagrams, two on one port (two addresses); a
    # record in another state (the kernel sends none) sets no bit.
    v4 = [full(AF_INET, LISTEN, p, 0, bytes(4)) for p in (1, 80, 80, 40000)]
    v6 = [full(AF_INET6, LISTEN, p, 0, bytes(16), size=132) for p in (443, 40000, 65535)]
    stray = full(AF_INET, ESTABLISHED, 5555, 80, V4[0])
    if per_family:
        replies = [[b"".join(v4[:2]), b"".join(v4[2:]) + stray + done()], [b"".join(v6) + done()]]
    else:
        replies = [[b"".join(v4[:3]), b"".join(v4[3:] + v6) + stray, done()]]
    sock = FakeDiagSocket(replies)
    bits = sockdiag.listening_ports(sock, per_family)
    assert bits == port_set({1, 80, 443, 40000, 65535}) and len(bits) == 8192
    families = (AF_INET, AF_INET6) if per_family else (socket.AF_UNSPEC,)
    assert sock.requests == [listener_dump_request(f) for f in families]


@pytest.mark.parametrize("per_family", [False, True])
def test_poll_leaves_out_the_ports_listeners_hold(per_family):
    # The counting dumps do not put a listener before the sockets it accepted: minisockets come
    # first, and per family the IPv4 dump before the IPv6 one that holds a dual-stack [::]:40000
    # listener. The listeners' own dump, sent first, is what tells.
    web = (AF_INET, V4[3], 80)
    children = [mini(AF_INET, TIME_WAIT, 40000, 51000 + i, V4[i], expires=59000) for i in range(3)]
    ours = [mini(AF_INET, TIME_WAIT, 45000, 80, V4[3], expires=59000)]
    open_children = [full(AF_INET, ESTABLISHED, 40000, 52000 + i, V4[i]) for i in range(2)]
    open_ours = [full(AF_INET, ESTABLISHED, 45001, 80, V4[3])]
    listener = full(AF_INET6, LISTEN, 40000, 0, bytes(16), size=132)
    walks = [[b"".join(children + ours) + done()], [b"".join(open_children + open_ours) + listener + done()]]
    if per_family:
        listen_dumps = [[done()], [listener + done()]]
        walks = [walks[0], [b"".join(open_children + open_ours) + done()], [done()], [listener + done()]]
    else:
        listen_dumps = [[listener + done()]]
    sock = FakeDiagSocket(listen_dumps + walks)
    t = tally.poll(sock, (32768, 60999), per_family=per_family, recent_ms=30000)
    assert t.remote_time_wait == Counter({web: 1}) and t.remote_recent == Counter({web: 1})
    assert t.remote_other == Counter({web: 1})
    assert +t.states == {TIME_WAIT: 4, ESTABLISHED: 3, LISTEN: 1}
    assert t.port_counts("local") == Counter({40000: 3, 45000: 1})
    families = (AF_INET, AF_INET6) if per_family else (socket.AF_UNSPEC,)
    assert sock.requests[:len(families)] == [listener_dump_request(f) for f in families]
    assert len(sock.requests) == len(families) * 3 and not sock.replies


def test_v4_mapped_and_v4_share_a_key():
    recs = [mini(AF_INET, TIME_WAIT, 40000, 80, V4[0]), mini(AF_INET6, TIME_WAIT, 40001, 80, MAPPED[0]),
            mini(AF_INET6, TIME_WAIT, 40002, 80, V6[0])]
    t = tally_of([b"".join(recs)], (40000, 40100))
    assert t.remote_time_wait == Counter({(AF_INET, V4[0], 80): 2, (AF_INET6, V6[0], 80): 1})


@pytest.mark.parametrize("kind", sockdiag.RECORD_TYPES)
def test_both_record_types_are_records(kind):
    recs = [record(AF_INET, TIME_WAIT, 40000, 80, V4[0], 96, kind=kind)] * 5
    runs, is_done = split_records(b"".join(recs) + done())
    assert ([(len(r), s, f) for r, s, f in runs], is_done) == ([(480, 96, False)], True)


def test_the_c_counter_is_built():
    # Installing the package compiles it (setup.py); without it the daemon does not start.
    assert tally.LIB is not None, tally.UNAVAILABLE


def test_the_c_counter_missing_or_broken_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(tally, "LIBRARY", tmp_path / "_tally.so")
    assert tally._load() == (None, f"{tmp_path / '_tally.so'} is not built: reinstall tcpstate (pip install ., or "
                                   "make setup in a checkout)")
    (tmp_path / "_tally.so").write_text("not a library")
    lib, why = tally._load()
    assert lib is None and why.startswith(f"{tmp_path / '_tally.so'}: ") and "\n" not in why


def test_tally_refuses_use_after_finish():
    t = tally.Tally(None, None)
    chunk = mini(AF_INET, TIME_WAIT, 40000, 80, V4[0]) + done()
    t.feed(chunk, len(chunk))
    t.finish()
    with pytest.raises(RuntimeError):
        t.feed(chunk, len(chunk))
    with pytest.raises(RuntimeError):
        t.finish()
    t.close()  # harmless


@pytest.mark.parametrize("code", [-2**31, -4096, 5, 2**31 - 1])
def test_out_of_range_error_codes_are_malformed(code):
    for msg in (struct.pack("=IHHIIi", 20, sockdiag.NLMSG_DONE, 2, 1, 0, code) if code < 0 else None,
                struct.pack("=IHHIIi", 20, sockdiag.NLMSG_ERROR, 0, 1, 0, code)):
        if msg is None:
            continue
        with pytest.raises(SockDiagError) as exc:
            decode_both(msg)
        assert exc.value.errno == errno.EBADMSG and f"malformed error code {code}" in str(exc.value)


def test_crafted_input():
    # Not what the kernel sends, but the C decoder must read it as split_records does: a message of another
    # type ends the records of a datagram; a family other than IPv6 keys 4 address bytes;
    # a TIME_WAIT timer is compared on its low 16 bits.
    noop = HDR.pack(16, 1, 0, 1, 0)
    tw = mini(AF_INET, TIME_WAIT, 40000, 80, V4[0], expires=0x10005)
    odd = record(7, TIME_WAIT, 40001, 80, MAPPED[0], 96, expires=40000)
    for chunks, counted in (([noop + tw + done()], 0), ([tw + noop + tw + done()], 1), ([odd + tw + done()], 2)):
        t = tally_of(chunks, (40000, 40100), 30000)
        assert t.states[TIME_WAIT] == counted
        assert all(sockdiag.endpoint_label(k) for k in t.remote_time_wait)


def test_native_endpoint_struct_size():
    assert tally.ctypes.sizeof(tally.Endpoint) == 32 == tally.LIB.tcpstate_tally_sizeof_endpoint()


def test_native_top_ports_ties_and_totals():
    recs = [mini(AF_INET, TIME_WAIT, port, 80 + i % 3, V4[0]) for port, k in
            ((40005, 3), (40001, 3), (40003, 5), (40002, 1), (65535, 3), (1, 1)) for i in range(k)]
    t = native_tally_of([b"".join(recs) + done()], None)
    assert t.top_ports("local", 4) == ([(40003, 5), (40001, 3), (40005, 3), (65535, 3)], 16)
    assert t.top_ports("remote", 10) == ([(80, 7), (81, 5), (82, 4)], 16)
    assert t.top_ports("local", 0) == ([], 16)
    assert native_tally_of([done()], None, top_n=10).top_ports("local", 10) == ([], 0)


def test_native_endpoint_table_grows():
    # Far more distinct endpoints than the table starts with (64 slots), each counted exactly.
    recs = [mini(AF_INET6, TIME_WAIT, 40000, port, V6[port % 4]) for port in range(1, 5001)] * 2
    t = native_tally_of([b"".join(recs[i:i + 300]) for i in range(0, len(recs), 300)] + [done()], (1024, 65535))
    assert len(t.remote_time_wait) == 5000 and set(t.remote_time_wait.values()) == {2}


# --- split_records --------------------------------------------------------------------------------

def test_done_flag_only_with_nlmsg_done():
    recs = b"".join(mini(AF_INET, TIME_WAIT, 40000 + i, 80, V4[0]) for i in range(5))
    mixed = recs + full(AF_INET, ESTABLISHED, 40000, 80, V4[0])
    assert split_records(recs)[1] is False
    assert split_records(recs + done())[1] is True
    assert split_records(mixed)[1] is False
    assert split_records(mixed + done())[1] is True
    assert split_records(done()) == ([], True)


def test_a_run_is_returned_uncut():
    recs = b"".join(full(AF_INET, ESTABLISHED, 40000 + i, 80, V4[0], size=124) for i in range(4))
    assert split_records(recs + done()) == ([(recs, 124, True)], True)


def test_short_runs_are_cut_to_88_bytes_by_kind():
    a = mini(AF_INET, TIME_WAIT, 40000, 80, V4[0], size=96)
    b = full(AF_INET6, ESTABLISHED, 40001, 443, V6[0], size=116)
    c = mini(AF_INET, SYN_RECV, 40002, 80, V4[0], size=96)
    runs, is_done = split_records(a + b + c + done())
    assert is_done
    assert sorted(runs, key=lambda r: r[2]) == [(a[:88] + c[:88], 88, False), (b[:88], 88, True)]


def test_runs_and_cut_records_in_one_datagram():
    tw = [mini(AF_INET, TIME_WAIT, 40000 + i, 80, V4[0]) for i in range(6)]
    est = full(AF_INET, ESTABLISHED, 40100, 80, V4[0])
    runs, _ = split_records(b"".join(tw[:3]) + est + b"".join(tw[3:]) + done())
    # 3 + 1 + 3: no run reaches MIN_RUN, all are cut
    assert sorted((len(r) // s, s, f) for r, s, f in runs) == [(1, 88, True), (6, 88, False)]
    runs, _ = split_records(b"".join(tw) + est + b"".join(tw) + done())
    assert sorted((len(r) // s, s, f) for r, s, f in runs) == [(1, 88, True), (6, 96, False), (6, 96, False)]


@pytest.mark.parametrize("sizes", [(124, 96), (124, 124, 96), (116, 88), (124,) * 5 + (96,), (132,) * 40 + (124,)])
def test_shorter_last_record_is_kept(sizes):
    # Longer records, then a shorter one that fits in less than a stride (as when a datagram
    # ends with an IPv4 listener after IPv6 ones, which carry SKV6ONLY), no NLMSG_DONE behind.
    recs = [record(AF_INET, LISTEN if s >= 104 else TIME_WAIT, 40000 + i, 0, V4[0], s) for i, s in enumerate(sizes)]
    assert run_count(b"".join(recs)) == len(sizes)


def test_is_full_socket():
    for size in MINI_SIZES:
        assert not sockdiag.is_full_socket(mini(AF_INET, TIME_WAIT, 1, 2, V4[0], size), 0, size)
    for size in FULL_SIZES:
        assert sockdiag.is_full_socket(full(AF_INET, LISTEN, 1, 0, V4[0], size), 0, size)
    # the type's top bits are flags (nested, byte order), not part of the type
    rec = mini(AF_INET, ESTABLISHED, 1, 2, V4[0], 88) + attr(SHUTDOWN | 0x4000, b"\0")
    rec = struct.pack("=I", len(rec)) + rec[4:]
    assert sockdiag.is_full_socket(rec, 0, len(rec))


def test_control_messages_end_the_datagram():
    recs = [mini(AF_INET, TIME_WAIT, 40000, 80, V4[0])]
    runs, is_done = split_records(recs[0] + done() + recs[0])
    assert is_done and sum(len(r) // s for r, s, _ in runs) == 1


@pytest.mark.parametrize("prefix", ["none", "run", "cut"])
def test_nlmsg_error_raises_its_errno(prefix):
    recs = {"none": b"",
            "run": mini(AF_INET, TIME_WAIT, 40000, 80, V4[0]) * 5,
            "cut": mini(AF_INET, TIME_WAIT, 40000, 80, V4[0]) + full(AF_INET, 1, 40000, 80, V4[0]),
            }[prefix]
    with pytest.raises(SockDiagError) as exc:
        decode_both(recs + error(-errno.EINVAL))
    assert exc.value.errno == errno.EINVAL


def test_nlmsg_error_zero_is_an_ack_that_ends_the_dump():
    assert split_records(error(0)) == ([], True)


def test_message_length_below_header_raises():
    bad = HDR.pack(8, sockdiag.NLMSG_DONE, 0, 1, 0)
    with pytest.raises(SockDiagError) as exc:
        decode_both(mini(AF_INET, TIME_WAIT, 40000, 80, V4[0]) + bad + bytes(12))
    assert exc.value.errno == errno.EBADMSG
    with pytest.raises(SockDiagError):
        decode_both(bad + bytes(12))
    with pytest.raises(SockDiagError):  # a zero length would loop forever if let through
        decode_both(bytes(16))


def test_message_longer_than_the_datagram_raises():
    a = mini(AF_INET, TIME_WAIT, 40000, 80, V4[0])
    b = full(AF_INET, ESTABLISHED, 40000, 80, V4[0], size=116)
    with pytest.raises(SockDiagError) as exc:
        decode_both(a + b[:100])
    assert exc.value.errno == errno.EBADMSG


def test_truncated_last_record_of_a_run_raises():
    rec = mini(AF_INET, TIME_WAIT, 40000, 80, V4[0])
    for whole in (2, 6):
        with pytest.raises(SockDiagError):
            decode_both(rec * whole + rec[:50])


def test_truncated_only_record_raises():
    with pytest.raises(SockDiagError):
        decode_both(full(AF_INET, ESTABLISHED, 40000, 80, V4[0], size=116)[:100])


@pytest.mark.parametrize("length", [16, 72, 87])
def test_short_record_raises(length):
    short = HDR.pack(length, sockdiag.SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, 1, 0) + bytes(length - 16)
    short += bytes(-len(short) % 4)
    with pytest.raises(SockDiagError) as exc:
        decode_both(short + done())
    assert exc.value.errno == errno.EBADMSG
    with pytest.raises(SockDiagError):
        decode_both(mini(AF_INET, TIME_WAIT, 40000, 80, V4[0]) * 5 + short + done())


# --- request ------------------------------------------------------------------------------------

def test_request_unspec_is_tcpdiag_getsock():
    req = request(sockdiag.MINI_STATES, socket.AF_UNSPEC, seq=7)
    length, kind, flags, seq, pid = HDR.unpack_from(req)
    assert (length, kind, flags, seq, pid) == (len(req), 18, 0x301, 7, 0)
    assert len(req) == 16 + 60
    body = req[16:]
    assert body[:4] == bytes(4)  # family, src_len, dst_len, ext
    assert body[4:52] == bytes(48)  # sockid: any
    assert struct.unpack_from("=II", body, 52) == (sockdiag.MINI_STATES, 0)  # states, dbs


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_request_per_family_is_sock_diag_by_family(family):
    req = request(sockdiag.FULL_STATES, family)
    length, kind, flags, seq, pid = HDR.unpack_from(req)
    assert (length, kind, flags, seq, pid) == (len(req), 20, 0x301, 1, 0)
    assert len(req) == 16 + 56
    body = req[16:]
    assert tuple(body[:4]) == (family, socket.IPPROTO_TCP, 0, 0)  # family, protocol, ext, pad
    assert struct.unpack_from("=I", body, 4)[0] == sockdiag.FULL_STATES
    assert body[8:] == bytes(48)


def test_the_two_walks_cover_every_state_once():
    assert sockdiag.FULL_STATES | sockdiag.MINI_STATES == sockdiag.ALL_STATES == sum(1 << s for s in range(1, 13))
    assert not sockdiag.FULL_STATES & sockdiag.MINI_STATES
    assert sockdiag.MINI_STATES == 1 << TIME_WAIT | 1 << NEW_SYN_RECV | 1 << SYN_RECV


SOCKSTAT = ("sockets: used 300\nTCP: inuse {} orphan 0 tw {} alloc 12 mem 3\nUDP: inuse 1 mem 0\n"
            "UDPLITE: inuse 0\nRAW: inuse 0\nFRAG: inuse 0 memory 0\n")
# sockstat6 has no tw: TCP's tw in sockstat counts both families' TIME_WAIT sockets.
SOCKSTAT6 = "TCP6: inuse {}\nUDP6: inuse 2\nUDPLITE6: inuse 0\nRAW6: inuse 1\nFRAG6: inuse 0 memory 0\n"


def test_one_walk_pays_when_time_wait_dominates():
    assert sockdiag.one_walk_pays(SOCKSTAT.format(5, 320))
    assert not sockdiag.one_walk_pays(SOCKSTAT.format(5, 319))
    assert sockdiag.one_walk_pays(SOCKSTAT.format(0, 64))  # no full sockets at all
    assert not sockdiag.one_walk_pays(SOCKSTAT.format(0, 63))
    assert not sockdiag.one_walk_pays("UDP: inuse 1 mem 0\n")
    assert not sockdiag.one_walk_pays("")


def test_one_walk_pays_counts_ipv6_sockets_in_use():
    # inuse: 3 IPv4 + 2 IPv6 full sockets, so TIME_WAIT must reach 64 * 5 = 320.
    assert sockdiag.one_walk_pays(SOCKSTAT.format(3, 320) + SOCKSTAT6.format(2))
    assert not sockdiag.one_walk_pays(SOCKSTAT.format(3, 319) + SOCKSTAT6.format(2))
    # The same IPv4 numbers pay on their own (192 >= 64 * 3), not with IPv6 sockets added.
    assert sockdiag.one_walk_pays(SOCKSTAT.format(3, 192))
    assert not sockdiag.one_walk_pays(SOCKSTAT.format(3, 192) + SOCKSTAT6.format(2))
    # Only IPv6 sockets in use: they alone set the bar; UDP6 and UDPLITE6 are not TCP6.
    assert sockdiag.one_walk_pays(SOCKSTAT.format(0, 128) + SOCKSTAT6.format(2))
    assert not sockdiag.one_walk_pays(SOCKSTAT.format(0, 127) + SOCKSTAT6.format(2))
    # sockstat6 first (the order does not matter), and sockstat6 alone has no TIME_WAIT.
    assert sockdiag.one_walk_pays(SOCKSTAT6.format(2) + SOCKSTAT.format(3, 320))
    assert not sockdiag.one_walk_pays(SOCKSTAT6.format(0))


# --- endpoints ----------------------------------------------------------------------------------

def test_endpoint_keys():
    v4 = socket.inet_pton(AF_INET, "198.18.0.2")
    assert endpoint(AF_INET, v4 + bytes(12), 80) == (AF_INET, v4, 80)
    assert endpoint(AF_INET, v4 + b"\x01" * 12, 80) == (AF_INET, v4, 80)
    mapped = socket.inet_pton(AF_INET6, "::ffff:198.18.0.2")
    assert endpoint(AF_INET6, mapped, 80) == (AF_INET, v4, 80)
    v6 = socket.inet_pton(AF_INET6, "2001:db8::1")
    assert endpoint(AF_INET6, v6, 443) == (AF_INET6, v6, 443)
    # Only ::ffff:0:0/96 is IPv4: the deprecated v4-compatible ::a.b.c.d stays IPv6.
    compat = bytes(12) + v4
    assert endpoint(AF_INET6, compat, 80) == (AF_INET6, compat, 80)


def test_endpoint_labels():
    v4 = socket.inet_pton(AF_INET, "198.18.0.2")
    assert endpoint_label((AF_INET, v4, 80)) == "198.18.0.2:80"
    assert endpoint_label((AF_INET6, socket.inet_pton(AF_INET6, "2001:db8::1"), 443)) == "[2001:db8::1]:443"
    assert endpoint_label(endpoint(AF_INET6, socket.inet_pton(AF_INET6, "::ffff:192.0.2.7"), 8080)) \
        == "192.0.2.7:8080"


# --- the real kernel ----------------------------------------------------------------------------

POLLS = [{}, {"one_walk": True}, {"per_family": True}]


def listen_counts():
    with sockdiag.open_socket() as sock:
        return [tally.poll(sock, None, **kw).states[LISTEN] for kw in POLLS]


def test_poll_counts_a_new_listener():
    # Listening only: no packet is sent. Other processes may open or close listeners meanwhile,
    # so a few attempts are allowed; an undisturbed one must show exactly our listener, in
    # every kind of walk.
    for _ in range(5):
        with socket.socket(AF_INET, socket.SOCK_STREAM) as lst:
            lst.bind(("127.0.0.1", 0))
            lst.listen()
            with_ours = listen_counts()
        without = listen_counts()
        assert min(with_ours) >= 1
        diffs = [a - b for a, b in zip(with_ours, without)]
        if diffs == [1, 1, 1]:
            break
    assert diffs == [1, 1, 1], (with_ours, without)


def test_poll_agrees_with_ss():
    def ss():
        out = subprocess.run(["ss", "-Htln"], capture_output=True, text=True, check=True).stdout
        return len(out.splitlines())

    seen = []
    for _ in range(5):
        before, ours, after = ss(), listen_counts()[0], ss()
        seen.append((before, ours, after))
        if before == after:
            break
    before, ours, after = seen[-1]
    assert before == after, f"listeners kept changing: {seen}"
    assert ours == before, seen


def test_done_with_an_error_raises():
    """A dump that fails part way ends with NLMSG_DONE carrying -errno: a partial count must not pass as whole."""
    done = struct.pack("=IHHIIi", 20, sockdiag.NLMSG_DONE, 2, 1, 0, -errno.ENOBUFS)
    with pytest.raises(sockdiag.SockDiagError) as exc:
        decode_both(done)
    assert exc.value.errno == errno.ENOBUFS
    ok = struct.pack("=IHHIIi", 20, sockdiag.NLMSG_DONE, 2, 1, 0, 0)
    assert sockdiag.split_records(ok) == ([], True)


@pytest.mark.parametrize("msg", [
    struct.pack("=IHHII", 16, sockdiag.NLMSG_ERROR, 0, 1, 0),  # NLMSG_ERROR without its errno
    struct.pack("=IHHIIi", 40, sockdiag.NLMSG_DONE, 2, 1, 0, 0),  # longer than the datagram
])
def test_malformed_control_messages_raise(msg):
    with pytest.raises(SockDiagError) as exc:
        decode_both(msg)
    assert exc.value.errno == errno.EBADMSG
