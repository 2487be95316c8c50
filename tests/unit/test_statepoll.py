"""Entering namespaces (the failures only: no namespace is entered here) and StatePoller's handling
of namespaces that cannot be polled, on faked socket reads."""

import contextlib
import errno
import logging
import math
import os
import socket
import threading
from collections import Counter

import pytest

from monitor.sockets import poller as poller_module
from monitor.sockets.kstats import Limits
from monitor.sockets.netns import NetnsError, entered, label_for
from monitor.sockets.poller import DUMP_TIMEOUT, StatePoller, Target
from monitor.sockets.sockdiag import SockDiagError

from .tally_reference import Reference

# --- netns.entered: what is refused before setns --------------------------------------------------


def own_fds():
    return sorted(os.listdir("/proc/self/fd"))


def own_netns():
    return os.stat("/proc/thread-self/ns/net").st_ino


def refusal(path):
    """The NetnsError entered(path) raises; the body must not run, and nothing may be left open
    or changed."""
    fds, ns = own_fds(), own_netns()
    ran = False
    with pytest.raises(NetnsError) as exc:
        with entered(path):
            ran = True
    assert not ran
    assert own_fds() == fds
    assert own_netns() == ns
    return exc.value


def test_missing_path(tmp_path):
    exc = refusal(str(tmp_path / "gone"))
    assert (exc.errno, exc.strerror) == (errno.ENOENT, os.strerror(errno.ENOENT))


@pytest.mark.parametrize("path", ["/etc/passwd", "regular"])
def test_regular_file_is_not_a_namespace(tmp_path, path):
    if path == "regular":
        path = tmp_path / "regular"
        path.write_text("not a namespace\n")
    exc = refusal(str(path))
    # The NS_GET_NSTYPE ioctl fails on a file that is no namespace: the kernel says ENOTTY.
    assert (exc.errno, exc.strerror) == (errno.ENOTTY, "not a namespace")


def test_another_kind_of_namespace():
    exc = refusal("/proc/self/ns/mnt")
    assert exc.errno == errno.EINVAL
    assert "not a network namespace" in exc.strerror


@pytest.mark.parametrize("path", ["/dev/null", "dir"])
def test_not_a_regular_file(tmp_path, path):
    # A device or a directory is refused without being opened.
    exc = refusal(str(tmp_path) if path == "dir" else path)
    assert (exc.errno, exc.strerror) == (errno.EINVAL, "not a namespace file")


def test_fifo_is_refused_without_blocking(tmp_path):
    # Opening a FIFO for reading blocks until a writer comes: entered() must not open it. Run in
    # a thread so that a regression fails here instead of hanging the suite.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome = []

    def attempt():
        try:
            outcome.append(refusal(str(fifo)))
        except BaseException as exc:  # an assertion in refusal(): reported below
            outcome.append(exc)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout=5)
    if t.is_alive():
        # Let the stuck open() return so the thread ends, then fail.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(timeout=5)
        pytest.fail("entered() blocked on a FIFO")
    (exc,) = outcome
    assert isinstance(exc, NetnsError), exc
    assert (exc.errno, exc.strerror) == (errno.EINVAL, "not a namespace file")


# --- labels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, label", [
    ("/var/run/netns/blue", "blue"),
    ("/run/netns/blue", "blue"),
    ("/run/netns/client-1.a", "client-1.a"),
    ("/run/netns/sub/blue", "/run/netns/sub/blue"),  # not a name `ip netns` makes
    ("/var/run/netns/sub/blue", "/var/run/netns/sub/blue"),
    ("/proc/1234/ns/net", "/proc/1234/ns/net"),
    ("/srv/run/netns/blue", "/srv/run/netns/blue"),  # the prefix only at the start
    ("/run/netnsblue", "/run/netnsblue"),
])
def test_label_for(path, label):
    assert label_for(path) == label
    assert Target.from_path(path) == Target(label, path)


@pytest.mark.parametrize("path", ["/run/netns/", "/var/run/netns/"])
def test_label_for_the_directory_is_not_the_own_label(path):
    assert label_for(path) != Target.own().label


def test_own_target():
    assert Target.own() == Target("", None)


# --- StatePoller: window --------------------------------------------------------------------------

@pytest.mark.parametrize("window", [0, -1, -0.0, 60.001, 61, 3600, math.inf, math.nan])
def test_window_out_of_range(window):
    with pytest.raises(ValueError):
        StatePoller([Target.own()], 1, TOP_N, window=window)


# --- StatePoller on faked reads -------------------------------------------------------------------

LIMITS = Limits(131072, 40000, 40099, reserved=20)  # 100 ports, 80 usable
TOP_N = 5
WEB = (socket.AF_INET, socket.inet_pton(socket.AF_INET, "198.18.0.2"), 80)
SOCKSTAT_TW = "TCP: inuse 1 orphan 0 tw 6400 alloc 1 mem 0\n"  # one walk pays
SOCKSTAT_FULL = "TCP: inuse 100 orphan 0 tw 6 alloc 100 mem 0\n"  # it does not


class FakeSock:
    def __init__(self, ns):
        self.ns = ns
        self.timeout = None
        self.closed = False

    def settimeout(self, t):
        self.timeout = t

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True


class FakeHost:
    """Stands in for the namespaces: entered() sets the current one (None: the daemon's own),
    the reads answer for it. broken: path -> exception entered() raises; poll_errors:
    namespace -> exceptions the next polls of it raise (one per poll, first the
    one-walk TCPDIAG_GETSOCK or per-family, as poll is called)."""

    def __init__(self, monkeypatch):
        self.current = None
        self.broken = {}
        self.poll_errors = {}
        self.sockstat = {}
        self.polls = []  # (namespace, port_range, kwargs)
        self.socks = []
        for name in ("entered", "read_limits", "read_kernel_counters", "read_sockstat", "open_socket", "poll"):
            monkeypatch.setattr(poller_module, name, getattr(self, name))

    @contextlib.contextmanager
    def entered(self, path):
        if path in self.broken:
            raise self.broken[path]
        self.current = path
        try:
            yield
        finally:
            self.current = None

    def read_limits(self):
        return LIMITS

    def read_kernel_counters(self):
        return {"active_opens": 7}

    def read_sockstat(self):
        return self.sockstat.get(self.current, SOCKSTAT_TW)

    def open_socket(self):
        sock = FakeSock(self.current)
        self.socks.append(sock)
        return sock

    def poll(self, sock, port_range, per_family=False, one_walk=False, recent_ms=None, top_n=None, rank_window=0.0):
        assert top_n == TOP_N  # the C counter keeps only the top ports the summary asks for
        self.polls.append((sock.ns, port_range, dict(per_family=per_family, one_walk=one_walk,
                                                     recent_ms=recent_ms)))
        errors = self.poll_errors.get(sock.ns)
        if errors:
            raise errors.pop(0)
        t = Reference(recent_ms=recent_ms)
        t.states[1] = 3
        t.remote_time_wait[WEB] = 40
        t.remote_recent[WEB] = 30
        t.remote_other[WEB] = 5
        return t


OWN, BLUE, RED = Target.own(), Target("blue", "/run/netns/blue"), Target("red", "/run/netns/red")
ENOENT = NetnsError(errno.ENOENT, os.strerror(errno.ENOENT))


def warning_for(target, why):
    name = f"netns {target.label!r} ({target.path})" if target.path else "own netns"
    return f"{name}: cannot poll sockets: {why}; its series are dropped until it can be polled again"


def messages(caplog, level=None):
    return [r.getMessage() for r in caplog.records
            if r.name == "monitor.sockets.poller" and (level is None or r.levelno == level)]


@pytest.fixture
def host(monkeypatch):
    return FakeHost(monkeypatch)


def test_polls_every_target(host):
    host.sockstat["/run/netns/red"] = SOCKSTAT_FULL
    poller = StatePoller([OWN, BLUE, RED], 1, TOP_N, window=20.0, clock=lambda: 1234.5)
    poller.poll_once()
    assert set(poller.results()) == {"", "blue", "red"}
    assert poller.errors() == {"": 0, "blue": 0, "red": 0}
    assert [(ns, rng, kw["one_walk"], kw["recent_ms"], kw["per_family"]) for ns, rng, kw in host.polls] == [
        (None, (40000, 40099), True, 40000, False),
        ("/run/netns/blue", (40000, 40099), True, 40000, False),
        ("/run/netns/red", (40000, 40099), False, 40000, False)]
    # Every socket got the dump timeout and was closed.
    assert [(s.timeout, s.closed) for s in host.socks] == [(DUMP_TIMEOUT, True)] * 3
    blue = poller.results()["blue"]
    assert blue.label == "blue" and blue.finished == 1234.5 and blue.kernel == {"active_opens": 7}
    assert blue.limits == LIMITS and blue.sockets["ESTABLISHED"] == 3
    # The rate is the recent entries over the window: 30 / 20 s; the forecast uses the 80 usable ports.
    (web,) = blue.endpoints
    assert (web.remote, web.time_wait, web.other, web.entry_rate) == ("198.18.0.2:80", 40, 5, 1.5)
    # demand 1.5*60 + 5 = 95 >= 80: seconds = (80 - 45) / (1.5 - 40/60) = 35 / (5/6) = 42
    # (over all 100 ports it would not run out).
    assert (web.forecast.in_use, web.forecast.demand, web.forecast.utilization) == (45, 95.0, 1.0)
    assert web.forecast.seconds_to_exhaustion == pytest.approx(42.0)


@pytest.mark.parametrize("window, recent_ms", [(30.0, 30000), (60, 0), (0.5, 59500), (45.25, 14750),
                                               (1, 59000), (0.001, 59999)])
def test_window_sets_the_recent_threshold(host, window, recent_ms):
    poller = StatePoller([OWN], 1, TOP_N, window=window)
    poller.poll_once()
    assert host.polls[0][2]["recent_ms"] == recent_ms
    (web,) = poller.results()[""].endpoints
    assert web.entry_rate == 30 / window


def test_one_warning_per_failing_stretch(host, caplog):
    caplog.set_level(logging.INFO, logger="monitor.sockets.poller")
    poller = StatePoller([OWN, BLUE], 1, TOP_N)
    host.broken["/run/netns/blue"] = ENOENT
    for _ in range(3):
        poller.poll_once()
        assert set(poller.results()) == {""}  # blue's series are dropped, the others stay
    assert poller.errors() == {"": 0, "blue": 3}
    assert messages(caplog) == [warning_for(BLUE, "No such file or directory")]
    assert messages(caplog, logging.WARNING) == messages(caplog)
    assert messages(caplog)[0] == ("netns 'blue' (/run/netns/blue): cannot poll sockets: No such file or "
                                   "directory; its series are dropped until it can be polled again")

    # It comes back: logged once at INFO, its series are back.
    caplog.clear()
    del host.broken["/run/netns/blue"]
    poller.poll_once()
    poller.poll_once()
    assert set(poller.results()) == {"", "blue"}
    assert poller.results()["blue"].endpoints[0].time_wait == 40
    assert poller.errors() == {"": 0, "blue": 3}
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.INFO, "netns 'blue': polling again")]

    # A new failing stretch warns again, with its own reason.
    caplog.clear()
    host.broken["/run/netns/blue"] = NetnsError(errno.EINVAL, "not a namespace file")
    poller.poll_once()
    poller.poll_once()
    assert poller.errors() == {"": 0, "blue": 5}
    assert messages(caplog) == [warning_for(BLUE, "not a namespace file")]


def test_failing_namespaces_are_tracked_apart(host, caplog):
    caplog.set_level(logging.INFO, logger="monitor.sockets.poller")
    poller = StatePoller([OWN, BLUE, RED], 1, TOP_N)
    host.broken["/run/netns/blue"] = ENOENT
    poller.poll_once()
    host.broken["/run/netns/red"] = ENOENT
    poller.poll_once()
    del host.broken["/run/netns/blue"]
    poller.poll_once()
    assert set(poller.results()) == {"", "blue"}
    assert poller.errors() == {"": 0, "blue": 2, "red": 2}
    assert messages(caplog) == [warning_for(BLUE, "No such file or directory"),
                                warning_for(RED, "No such file or directory"),
                                "netns 'blue': polling again"]


def test_own_namespace_failing(host, caplog):
    caplog.set_level(logging.INFO, logger="monitor.sockets.poller")
    poller = StatePoller([OWN, BLUE], 1, TOP_N)
    host.poll_errors[None] = [SockDiagError(errno.EPERM, "sock_diag dump: Operation not permitted")] * 2
    poller.poll_once()
    poller.poll_once()
    assert set(poller.results()) == {"blue"}
    poller.poll_once()
    assert set(poller.results()) == {"", "blue"}
    assert poller.errors() == {"": 2, "blue": 0}
    assert messages(caplog) == [
        "own netns: cannot poll sockets: sock_diag dump: Operation not permitted; its series are dropped until "
        "it can be polled again",
        "own netns: polling again"]


@pytest.mark.parametrize("exc, why", [
    (TimeoutError("timed out"), "timed out"),  # a dump that stalled past DUMP_TIMEOUT
    (SockDiagError(errno.EBADMSG, "malformed netlink message at offset 0 (length 3)"),
     "malformed netlink message at offset 0 (length 3)"),
    (ValueError("unpaired lines for 'Tcp' and 'Udp'"), "unpaired lines for 'Tcp' and 'Udp'"),
])
def test_failures_in_the_dump(host, caplog, exc, why):
    poller = StatePoller([BLUE], 1, TOP_N)
    host.poll_errors["/run/netns/blue"] = [exc]
    poller.poll_once()
    assert poller.results() == {} and poller.errors() == {"blue": 1}
    assert messages(caplog, logging.WARNING) == [warning_for(BLUE, why)]
    assert host.socks[0].closed  # the socket is closed on failure too


def test_failures_reading_the_namespace(host, monkeypatch, caplog):
    def unreadable():
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/proc/sys/net/ipv4/tcp_max_tw_buckets")

    monkeypatch.setattr(poller_module, "read_limits", unreadable)
    poller = StatePoller([BLUE], 1, TOP_N)
    poller.poll_once()
    assert poller.results() == {} and poller.errors() == {"blue": 1}
    assert host.polls == []
    assert messages(caplog, logging.WARNING) == [warning_for(BLUE, "Permission denied")]


def test_real_entered_on_paths_that_are_no_namespace(tmp_path, monkeypatch, caplog):
    # The real entered(): only its refusals, so no namespace is entered and nothing is polled.
    def no_poll(*args, **kwargs):
        raise AssertionError("polled a namespace that was never entered")

    monkeypatch.setattr(poller_module, "poll", no_poll)
    monkeypatch.setattr(poller_module, "open_socket", no_poll)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    regular = tmp_path / "regular"
    regular.write_text("")
    targets = [Target.from_path(str(tmp_path / "gone")), Target.from_path(str(fifo)),
               Target.from_path(str(regular))]
    poller = StatePoller(targets, 1, TOP_N)
    done = threading.Event()
    t = threading.Thread(target=lambda: (poller.poll_once(), poller.poll_once(), done.set()), daemon=True)
    t.start()
    t.join(timeout=10)
    if not done.is_set():
        for _ in range(2):  # unblock the stuck opens, so the thread ends
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            t.join(timeout=1)
        pytest.fail("polling blocked on a FIFO")
    assert poller.results() == {}
    assert poller.errors() == {str(tmp_path / "gone"): 2, str(fifo): 2, str(regular): 2}
    assert messages(caplog, logging.WARNING) == [warning_for(targets[0], "No such file or directory"),
                                                 warning_for(targets[1], "not a namespace file"),
                                                 warning_for(targets[2], "not a namespace")]


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP])
def test_per_family_fallback(host, caplog, err):
    caplog.set_level(logging.INFO, logger="monitor.sockets.poller")
    poller = StatePoller([OWN, BLUE], 1, TOP_N)
    refused = SockDiagError(err, f"sock_diag dump: {os.strerror(err)}")
    host.poll_errors[None] = [refused]
    poller.poll_once()
    # The one-walk request was refused, then the per-family one answered in the same poll.
    assert set(poller.results()) == {"", "blue"}
    assert poller.errors() == {"": 0, "blue": 0}
    assert [(ns, kw["per_family"]) for ns, _, kw in host.polls] == [
        (None, False), (None, True), ("/run/netns/blue", True)]
    assert all(kw["recent_ms"] == 30000 and kw["one_walk"] for _, _, kw in host.polls)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, f"the kernel refused the one-walk TCPDIAG_GETSOCK dump ({refused}); dumping per family")]
    # From then on per family only, without asking again or logging again.
    caplog.clear()
    host.polls.clear()
    poller.poll_once()
    poller.poll_once()
    assert [(ns, kw["per_family"]) for ns, _, kw in host.polls] == [
        (None, True), ("/run/netns/blue", True)] * 2
    assert caplog.records == []


def test_other_refusals_do_not_switch_to_per_family(host, caplog):
    caplog.set_level(logging.INFO, logger="monitor.sockets.poller")
    poller = StatePoller([BLUE], 1, TOP_N)
    host.poll_errors["/run/netns/blue"] = [SockDiagError(errno.ENOBUFS, "sock_diag dump failed part way: "
                                                                        "No buffer space available")]
    poller.poll_once()
    poller.poll_once()
    assert [kw["per_family"] for _, _, kw in host.polls] == [False, False]
    assert poller.errors() == {"blue": 1}
    assert messages(caplog) == [
        warning_for(BLUE, "sock_diag dump failed part way: No buffer space available"),
        "netns 'blue': polling again"]


def test_per_family_failing_too(host, caplog):
    # Both requests refused: the namespace fails this poll, and per family is kept for the next.
    caplog.set_level(logging.INFO, logger="monitor.sockets.poller")
    poller = StatePoller([BLUE], 1, TOP_N)
    host.poll_errors["/run/netns/blue"] = [SockDiagError(errno.EINVAL, "sock_diag dump: Invalid argument"),
                                           SockDiagError(errno.EINVAL, "sock_diag dump: Invalid argument")]
    poller.poll_once()
    assert poller.results() == {} and poller.errors() == {"blue": 1}
    poller.poll_once()
    assert set(poller.results()) == {"blue"}
    assert [kw["per_family"] for _, _, kw in host.polls] == [False, True, True]
    assert [(r.levelno, r.getMessage()) for r in caplog.records][1:] == [
        (logging.WARNING, warning_for(BLUE, "sock_diag dump: Invalid argument")),
        (logging.INFO, "netns 'blue': polling again")]
    assert "dumping per family" in caplog.records[0].getMessage()


def test_errors_is_a_copy(host):
    poller = StatePoller([BLUE], 1, TOP_N)
    poller.errors()["blue"] = 99
    assert poller.errors() == {"blue": 0}


def test_results_are_replaced_whole(host):
    poller = StatePoller([OWN, BLUE], 1, TOP_N)
    poller.poll_once()
    before = poller.results()
    host.broken["/run/netns/blue"] = ENOENT
    poller.poll_once()
    assert set(before) == {"", "blue"}  # a scrape holding the old dict sees it unchanged
    assert set(poller.results()) == {""}


def test_background_thread_survives_a_bug(host, monkeypatch, caplog):
    # An exception that is no poll failure (a bug) is logged and polling goes on.
    bugs = [RuntimeError("bug")] * 2
    real_poll = host.poll

    def buggy(*args, **kwargs):
        if bugs:
            raise bugs.pop()
        return real_poll(*args, **kwargs)

    monkeypatch.setattr(poller_module, "poll", buggy)
    poller = StatePoller([OWN], 0.01, 5)
    poller.start()
    try:
        for _ in range(500):
            if poller.results():
                break
            threading.Event().wait(0.01)
    finally:
        poller.stop()
    assert set(poller.results()) == {""}
    failed = [r for r in caplog.records if r.getMessage() == "state poll failed"]
    assert len(failed) == 2 and all(r.exc_info and r.exc_info[0] is RuntimeError for r in failed)
    assert Counter(r.levelno for r in failed) == {logging.ERROR: 2}
