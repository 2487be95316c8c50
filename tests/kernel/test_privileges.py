"""The drop of privileges after attach, on the real kernel: every thread of the daemon ends with no
capability (or only what --netns needs) and, with --user, another uid; the maps, the socket
tables and the --netns polls still read; counting stays exact."""

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from monitor.system import privileges

from . import traffic
from .netns import NetnsPair, netns_path
from .pace import seconds
from .test_daemon import NOT_READY, TCPSTATE, free_port, get, samples, wait_ready

N = 10
SYS_BPF = 321  # x86_64


def thread_states(pid: int) -> list[dict]:
    """Every thread's credentials; a request thread may end between the listing and the read."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.append(privileges.status(f"/proc/{pid}/task/{tid}/status"))
        except FileNotFoundError:
            pass
    return out


def test_the_probe_thread_holds_the_reduced_set_and_the_rest_of_the_process_keeps_its_own():
    seen = {}

    def reads():
        seen.update(privileges.status("/proc/thread-self/status"))

    before = privileges.status()
    assert privileges.try_reads(frozenset({privileges.CAP_BPF}), privileges.Account.lookup("nobody"), reads) is None
    assert seen["Uid"] == 65534 and seen["Gid"] == 65534 and seen["CapEff"] == seen["CapPrm"] == 1 << privileges.CAP_BPF
    assert privileges.status() == before  # the test process is unchanged

    def refused():
        raise PermissionError(1, "Operation not permitted")

    err = privileges.try_reads(frozenset(), None, refused)
    assert isinstance(err, PermissionError)


def test_a_kernel_that_wants_cap_bpf_for_map_reads_keeps_only_that():
    """Kernels before 6.5 check CAP_BPF on every bpf() call; the reads here act as such a
    kernel would, and the drop must settle on CAP_BPF alone (in a child: drops are final)."""
    code = textwrap.dedent("""
        from monitor.system import privileges
        def reads():
            eff = privileges.status("/proc/thread-self/status")["CapEff"]
            if not eff & (1 << privileges.CAP_BPF):
                raise PermissionError(1, "Operation not permitted")
        print(privileges.drop_after_attach(reads, None, {}))
        st = privileges.status()
        print(st["CapEff"], st["CapPrm"], st["CapBnd"], st["NoNewPrivs"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == ("privileges dropped: running as uid 0 with capabilities: CAP_BPF "
                      "(CAP_BPF: this kernel reads BPF maps only with it)")
    assert out[1].split() == [str(1 << privileges.CAP_BPF)] * 3 + ["1"]


def test_nothing_is_dropped_when_even_root_cannot_read():
    code = textwrap.dedent("""
        from monitor.system import privileges
        def reads():
            raise PermissionError(1, "Operation not permitted")
        try:
            privileges.drop_after_attach(reads, None, {})
        except privileges.PrivilegeError as exc:
            print("refused:", exc.strerror)
        print(privileges.status()["CapEff"] != 0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["refused: the maps cannot be read with fewer privileges ([Errno 1] Operation not permitted)", "True"]


def run_daemon(*extra):
    port = free_port()
    proc = subprocess.Popen([TCPSTATE, "run", "--listen-address", f"127.0.0.1:{port}", "--include-cidr",
                             "198.18.0.0/15", "--state-interval", "0.5", "--events", "/dev/null", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc)
    return proc, base


def stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=seconds(15)) == 0
    return proc.stderr.read()


def test_user_nobody_every_thread_and_exact_counts():
    pair = NetnsPair("pv")
    pair.down()
    pair.up()
    proc, base = run_daemon("--user", "nobody", "--netns", netns_path(pair.client))
    try:
        before = samples(get(base + "/metrics")[1])
        with traffic.Listener(pair.server, pair.SERVER_ADDR) as listener:
            traffic.client_closes_first(pair.client, listener, N)
        opened = lambda s, d: s[("tcpstate_connections_opened_total", (("direction", d),))]  # noqa: E731
        tw = ("tcpstate_sockets", (("netns", pair.client), ("state", "TIME_WAIT")))
        deadline = time.monotonic() + seconds(20)
        while True:  # the last ACKs, and a poll of the client's namespace after them
            after = samples(get(base + "/metrics")[1])
            done = (opened(after, "active") - opened(before, "active") >= N and after.get(tw, 0) >= N)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        threads = thread_states(proc.pid)
        # --netns keeps CAP_SYS_ADMIN (setns); nothing else, in any thread, HTTP and poller included.
        assert len(threads) >= 3
        for st in threads:
            assert (st["Uid"], st["Gid"]) == (65534, 65534), st
            assert st["CapEff"] == st["CapPrm"] == st["CapBnd"] == 1 << privileges.CAP_SYS_ADMIN, st
            assert st["CapAmb"] == st["CapInh"] == 0 and st["NoNewPrivs"] == 1, st
        assert (opened(after, "active") - opened(before, "active"), opened(after, "passive") - opened(before, "passive")) == (N, N)
        ns = pair.client
        assert after[("tcpstate_state_poll_errors_total", (("netns", ns),))] == 0
        assert after[("tcpstate_state_poll_age_seconds", (("netns", ns),))] < 2
        assert after[tw] == N  # the client closed first
        assert after[("tcpstate_map_read_errors_total", ())] == 0
    finally:
        log = stop(proc)
        pair.down()
    assert ("privileges dropped: running as user nobody (uid 65534, gid 65534) with capabilities: CAP_SYS_ADMIN "
            "(CAP_SYS_ADMIN enters the --netns namespaces)") in log


def map_reads_need_cap_bpf() -> bool:
    """Whether this kernel refuses a read of a map the caller holds to a thread without CAP_BPF:
    some kernels check kernel.unprivileged_bpf_disabled on every bpf() call (Debian's 5.10 does,
    its 6.1 does not). Asked of the kernel itself: an array map made here, read by a thread that
    has dropped every capability, as the daemon's drop tries its own reads."""
    libc = ctypes.CDLL(None, use_errno=True)
    create = (ctypes.c_uint32 * 30)(2, 4, 4, 1)  # BPF_MAP_CREATE: an array, 4-byte keys and values, 1 entry
    fd = libc.syscall(SYS_BPF, 0, create, ctypes.sizeof(create))
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        key, value = ctypes.c_uint32(0), ctypes.c_uint32(0)
        lookup = (ctypes.c_uint64 * 4)(fd, ctypes.addressof(key), ctypes.addressof(value), 0)

        def reads():
            if libc.syscall(SYS_BPF, 1, lookup, ctypes.sizeof(lookup)) != 0:  # BPF_MAP_LOOKUP_ELEM
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))

        return privileges.try_reads(frozenset(), None, reads) is not None
    finally:
        os.close(fd)


def test_without_user_the_daemon_stays_uid_0_with_no_capability_and_scrapes_under_load():
    kept = 1 << privileges.CAP_BPF if map_reads_need_cap_bpf() else 0
    proc, base = run_daemon()
    try:
        errors = []

        def scrape():
            for _ in range(20):
                try:
                    status, body = get(base + "/metrics")
                except OSError as exc:  # a timeout too: reported by the assertion below, with the rest
                    errors.append(repr(exc))
                    continue
                if status != 200 or "tcpstate_build_info" not in body:
                    errors.append(status)

        scrapers = [threading.Thread(target=scrape) for _ in range(4)]
        for t in scrapers:
            t.start()
        for t in scrapers:
            t.join(timeout=seconds(60))
        assert errors == [] and not any(t.is_alive() for t in scrapers), errors
        for st in thread_states(proc.pid):
            assert st["Uid"] == 0 and st["CapEff"] == st["CapPrm"] == st["CapBnd"] == kept and st["NoNewPrivs"] == 1, st
    finally:
        log = stop(proc)
    assert ("privileges dropped: running as uid 0 with capabilities: "
            + ("CAP_BPF (CAP_BPF: this kernel reads BPF maps only with it)" if kept else "none")) in log


def test_an_unknown_user_is_a_usage_error_before_anything_is_attached():
    done = subprocess.run([TCPSTATE, "run", "--user", "no-such-user-here"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr == ("tcpstate run: error: Invalid value for '--user': no user 'no-such-user-here' on this "
                           "host (useradd --system no-such-user-here, or give a uid) (see 'tcpstate run --help')\n")


@pytest.mark.host_only  # the HTTP and web-config side of the drop, the same on every kernel
def test_tls_and_basic_auth_keep_serving_after_the_drop_to_a_user(tmp_path):
    """--web-config-file with --user nobody and the files in a root-only directory, as a key file
    usually is: what was loaded as root keeps serving, and the log says rotation needs access."""
    import base64
    import ssl
    import urllib.error
    import urllib.request

    import bcrypt

    from tests.unit.test_webconfig import make_cert, openssl

    pki = tmp_path / "pki"
    pki.mkdir(mode=0o700)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=ca", cwd=pki)
    make_cert(pki, "server", "ca", "server", "IP:127.0.0.1")
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    (pki / "web.yml").write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                                 f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    port = free_port()
    proc = subprocess.Popen([TCPSTATE, "run", "--listen-address", f"127.0.0.1:{port}", "--events", "/dev/null",
                             "--user", "nobody", "--web-config-file", str(pki / "web.yml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))

    def fetch(path, password):
        req = urllib.request.Request(f"https://127.0.0.1:{port}{path}")
        req.add_header("Authorization", "Basic " + base64.b64encode(f"prometheus:{password}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    try:
        deadline = time.monotonic() + seconds(60)
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if fetch("/-/ready", "s3cret")[0] == 200:
                    break
            except NOT_READY:
                pass
            time.sleep(0.2)
        status, body = fetch("/metrics", "s3cret")
        assert status == 200 and "tcpstate_build_info{" in body
        assert fetch("/metrics", "wrong")[0] == 401
        st = privileges.status(f"/proc/{proc.pid}/status")
        assert st["Uid"] == 65534 and st["CapEff"] == 0
    finally:
        log = stop(proc)
    assert f"ready: serving https://127.0.0.1:{port}/metrics (TLS on (client certificates: NoClientCert); " \
           "basic auth for 1 user(s))" in log
    assert log.count("web config: cannot read") == 1 and "make it readable to this user to pick up changes" in log


def test_a_bad_web_config_is_a_usage_error(tmp_path):
    bad = tmp_path / "web.yml"
    bad.write_text("tls_server_config:\n  cert_file: nowhere.crt\n  key_file: nowhere.key\n")
    done = subprocess.run([TCPSTATE, "run", "--web-config-file", str(bad)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.startswith(f"tcpstate run: error: Invalid value for '--web-config-file': {bad}: ")
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.host_only  # the HTTP and web-config side of the drop, the same on every kernel
def test_without_cap_setpcap_everything_else_is_still_dropped():
    """As in `docker run --cap-drop ALL --cap-add BPF --cap-add PERFMON`: the bounding set cannot
    be emptied, so it stays, and the effective and permitted sets still go."""
    port = free_port()
    proc = subprocess.Popen(["setpriv", "--bounding-set=-all,+bpf,+perfmon", "--inh-caps=-all", "--", TCPSTATE, "run",
                             "--listen-address", f"127.0.0.1:{port}", "--events", "/dev/null"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        for st in thread_states(proc.pid):
            assert st["CapEff"] == st["CapPrm"] == 0 and st["NoNewPrivs"] == 1, st
            assert st["CapBnd"] == 1 << privileges.CAP_BPF | 1 << privileges.CAP_PERFMON, st
    finally:
        log = stop(proc)
    assert ("privileges dropped: running as uid 0 with capabilities: none (bounding set kept: emptying it takes "
            "CAP_SETPCAP; no_new_privs is set)") in log


@pytest.mark.host_only  # the HTTP and web-config side of the drop, the same on every kernel
def test_a_client_trickling_bytes_during_the_compile_cannot_stop_the_drop():
    """A connection accepted before the drop is ended by it, however slowly its client writes;
    the drop goes ahead, and the client's socket is closed."""
    port = free_port()
    proc = subprocess.Popen([TCPSTATE, "run", "--listen-address", f"127.0.0.1:{port}", "--events", "/dev/null"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import socket

    client = None
    try:
        deadline = time.monotonic() + seconds(30)
        while client is None and time.monotonic() < deadline:  # the port listens before the compile
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=1)
            except OSError:
                time.sleep(0.01)
        assert client is not None
        assert get(f"http://127.0.0.1:{port}/-/ready")[0] == 503  # still compiling: the race is real
        ended = None
        # One byte a second, bounded. What the server sends back when the drop cuts the request
        # short (a 400 for the half request line) is read whole: only its end, a FIN or a reset,
        # says the connection was ended.
        client.settimeout(1.0)
        for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"x" * 60:
            try:
                client.sendall(bytes([byte]))
                while client.recv(65536):
                    pass
                ended = "closed"
                break
            except socket.timeout:
                continue
            except OSError:
                ended = "reset"
                break
        assert ended, "the slow connection was never ended"
        wait_ready(f"http://127.0.0.1:{port}", proc)
    finally:
        if client is not None:
            client.close()
        log = stop(proc)
    assert "privileges dropped: running as uid 0 with capabilities: none" in log


@pytest.mark.host_only  # the HTTP and web-config side of the drop, the same on every kernel
def test_after_the_drop_a_readable_config_still_applies_with_a_root_only_key():
    """The usual layout: config and certificate readable, the key root's alone (0600). After
    --user, a changed password in the config applies; the key stays as loaded, said once."""
    import base64
    import shutil
    import ssl
    import urllib.error
    import urllib.request

    import bcrypt

    from tests.unit.test_webconfig import make_cert, openssl

    d = Path(f"/run/tcpstate-test-web-{os.getpid()}")  # a directory every user can traverse
    d.mkdir(mode=0o755)
    port = free_port()
    proc = None
    try:
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=ca", cwd=d)
        make_cert(d, "server", "ca", "server", "IP:127.0.0.1")
        os.chmod(d / "server.key", 0o600)
        os.chmod(d / "server.crt", 0o644)

        def config(password):
            hashed = bcrypt.hashpw(password, bcrypt.gensalt(4)).decode()
            (d / "web.yml.new").write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                                           f"basic_auth_users:\n  prometheus: '{hashed}'\n")
            os.chmod(d / "web.yml.new", 0o644)
            os.replace(d / "web.yml.new", d / "web.yml")

        config(b"one")
        proc = subprocess.Popen([TCPSTATE, "run", "--listen-address", f"127.0.0.1:{port}", "--events", "/dev/null",
                                 "--user", "nobody", "--web-config-file", str(d / "web.yml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))

        def status(password):
            req = urllib.request.Request(f"https://127.0.0.1:{port}/-/ready")
            req.add_header("Authorization", "Basic " + base64.b64encode(b"prometheus:" + password).decode())
            try:
                with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        deadline = time.monotonic() + seconds(60)
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if status(b"one") == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert status(b"one") == 200
        config(b"two")
        assert (status(b"two"), status(b"one")) == (200, 401)
    finally:
        log = stop(proc) if proc is not None else ""
        shutil.rmtree(d, ignore_errors=True)
    assert log.count("web config: cannot read") == 1 and f"{d}/server.key" in log
    assert "web config reloaded, certificates kept as loaded" in log
