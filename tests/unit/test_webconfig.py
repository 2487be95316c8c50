"""--web-config-file: TLS, client certificates, basic auth and headers with real clients (curl, Python's ssl,
Prometheus), certificate rotation, load errors, and agreement with Debian's promtool (prometheus 2.42)."""

import base64
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Counter

from monitor.serve import http as server
from monitor.serve import webconfig
from monitor.serve.http import HttpServer
from monitor.serve.webconfig import WebConfigError
from monitor.settings import ListenAddress

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PASSWORD = "s3cret pass"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
MTLS = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
USERS = f"basic_auth_users:\n  alice: '{HASH}'\n"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_cert(d, name, ca, subject, san):
    """A P-256 key and a certificate signed by CA (a name in d), with one SAN."""
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={subject}", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-set_serial",
            str(abs(hash(name)) % 10**9), "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "foreign-ca"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-subj", f"/CN={ca}", cwd=d)
    make_cert(d, "server", "ca", "server-1", "IP:127.0.0.1")
    make_cert(d, "server2", "ca", "server-2", "IP:127.0.0.1")
    make_cert(d, "client", "ca", "scraper", "DNS:scraper.example")
    make_cert(d, "client-other", "ca", "other", "DNS:other.example")
    make_cert(d, "foreign-client", "foreign-ca", "scraper", "DNS:scraper.example")
    openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:x", "-out", "encrypted.key", cwd=d)
    return d


@pytest.fixture
def conf(pki, tmp_path):
    """Writes web.yml next to copies of the certificates (relative names resolve there)."""
    for f in pki.iterdir():
        shutil.copy(f, tmp_path / f.name)

    def write(text, name="web.yml"):
        (tmp_path / name).write_text(text)
        return tmp_path / name
    write.dir = tmp_path
    return write


@pytest.fixture
def serve():
    started = []

    def start(web_config):
        reg = CollectorRegistry()
        Counter("tcpstate_test", "A test counter.", registry=reg).inc(3)
        exp = HttpServer(ListenAddress("127.0.0.1", 0), reg, web_config=web_config)
        exp.start()
        started.append(exp)
        return exp
    yield start
    for exp in started:
        exp.stop()


def curl(url, *args):
    """(HTTP status, headers and body, exit code) from the curl CLI; status 0 when there was no answer."""
    r = subprocess.run(["curl", "-sS", "-i", "--max-time", "10", "-w", "\n%{http_code}", *args, url],
                       capture_output=True, text=True, timeout=20)
    out, _, code = r.stdout.rpartition("\n")
    return int(code or 0), out, r.returncode


def client_context(pki, cert=None, **versions):
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    for k, v in versions.items():
        setattr(ctx, k, v)
    return ctx


def py_get(url, ctx=None, user=None, password=None):
    """(status, body) from urllib with Python's ssl."""
    req = urllib.request.Request(url)
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def peer_cn(port, pki):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return dict(x[0] for x in s.getpeercert()["subject"])["commonName"]


def promtool_ok(path):
    r = subprocess.run([PROMTOOL, "check", "web-config", str(path)], capture_output=True, text=True, timeout=30)
    assert ("SUCCESS" in r.stdout + r.stderr) == (r.returncode == 0), r.stdout + r.stderr
    return r.returncode == 0


# --- TLS and basic auth with real clients ------------------------------------------------------

def test_tls_and_basic_auth_with_curl_and_python(conf, serve, pki):
    path = conf(TLS + USERS + "http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    assert promtool_ok(path)
    exp = serve(webconfig.load(path))
    url = f"https://127.0.0.1:{exp.port}/metrics"
    ca = ["--cacert", str(pki / "ca.crt")]

    status, out, rc = curl(url, *ca, "-u", f"alice:{PASSWORD}")
    assert (status, rc) == (200, 0)
    assert "\ntcpstate_test_total 3.0\n" in out and "\nX-Frame-Options: deny\n" in out
    for auth in (["-u", "alice:wrong"], [], ["-u", f"mallory:{PASSWORD}"]):  # wrong, none, unknown user
        status, out, rc = curl(url, *ca, *auth)
        assert (status, rc) == (401, 0), auth
        assert "\nWWW-Authenticate: Basic\n" in out and "tcpstate_test_total" not in out
        assert "\nX-Frame-Options: deny\n" in out  # headers on refusals too, as the toolkit does

    ctx = client_context(pki)
    status, body = py_get(url, ctx, "alice", PASSWORD)
    assert status == 200 and "\ntcpstate_test_total 3.0\n" in body
    assert py_get(url, ctx, "alice", "wrong")[0] == 401
    assert py_get(url, ctx)[0] == 401
    # every path needs the password
    for path_ in ("/", "/api/v1/summary", "/static/page.js", "/-/healthy", "/-/ready", "/missing"):
        assert py_get(f"https://127.0.0.1:{exp.port}{path_}", ctx)[0] == 401, path_
    assert py_get(f"https://127.0.0.1:{exp.port}/-/healthy", ctx, "alice", PASSWORD) == (200, "OK\n")
    assert py_get(f"https://127.0.0.1:{exp.port}/missing", ctx, "alice", PASSWORD)[0] == 404
    assert py_get(f"https://127.0.0.1:{exp.port}/static/page.css", ctx, "alice", PASSWORD)[0] == 200


def test_the_certificate_is_checked_by_clients(conf, serve, pki):
    exp = serve(webconfig.load(conf(TLS)))
    status, _, rc = curl(f"https://127.0.0.1:{exp.port}/metrics")  # no --cacert: the system CAs
    assert status == 0 and rc == 60  # curl: peer certificate cannot be authenticated
    status, out, rc = curl(f"https://127.0.0.1:{exp.port}/metrics", "--cacert", str(pki / "ca.crt"))
    assert (status, rc) == (200, 0) and "tcpstate_test_total 3.0" in out  # no users: no auth


def test_plain_http_to_the_tls_port_gets_400_and_serving_goes_on(conf, serve, pki):
    exp = serve(webconfig.load(conf(TLS)))
    for _ in range(3):
        status, out, rc = curl(f"http://127.0.0.1:{exp.port}/metrics")
        assert (status, rc) == (400, 0)
        assert out.endswith("Client sent an HTTP request to an HTTPS server.\n")
        assert py_get(f"http://127.0.0.1:{exp.port}/metrics")[0] == 400
        assert py_get(f"https://127.0.0.1:{exp.port}/metrics", client_context(pki))[0] == 200


def test_a_silent_client_does_not_block_others(conf, serve, pki, monkeypatch):
    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT", 3.0)
    exp = serve(webconfig.load(conf(TLS)))
    silent = [socket.create_connection(("127.0.0.1", exp.port)) for _ in range(5)]  # never say hello
    try:
        t = time.monotonic()
        assert py_get(f"https://127.0.0.1:{exp.port}/-/healthy", client_context(pki)) == (200, "OK\n")
        assert time.monotonic() - t < 1.5
        silent[0].settimeout(10)
        assert silent[0].recv(1) == b""  # and the server gives up on them
        assert 2.5 < time.monotonic() - t < 6
    finally:
        for s in silent:
            s.close()


def test_require_and_verify_client_cert(conf, serve, pki):
    path = conf(MTLS)
    assert promtool_ok(path)
    exp = serve(webconfig.load(path))
    url = f"https://127.0.0.1:{exp.port}/metrics"
    ca = ["--cacert", str(pki / "ca.crt")]

    status, out, rc = curl(url, *ca, "--cert", str(pki / "client.crt"), "--key", str(pki / "client.key"))
    assert (status, rc) == (200, 0) and "tcpstate_test_total 3.0" in out
    assert curl(url, *ca)[0] == 0  # no certificate: no answer
    assert curl(url, *ca, "--cert", str(pki / "foreign-client.crt"), "--key", str(pki / "foreign-client.key"))[0] == 0

    assert py_get(url, client_context(pki, "client"))[0] == 200
    for ctx in (client_context(pki), client_context(pki, "foreign-client")):
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            py_get(url, ctx)
    assert py_get(url, client_context(pki, "client"))[0] == 200  # still serving


def test_verify_client_cert_if_given(conf, serve, pki):
    path = conf(TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.crt\n")
    assert promtool_ok(path)
    exp = serve(webconfig.load(path))
    url = f"https://127.0.0.1:{exp.port}/metrics"
    assert py_get(url, client_context(pki))[0] == 200
    assert py_get(url, client_context(pki, "client"))[0] == 200
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        py_get(url, client_context(pki, "foreign-client"))


def test_client_allowed_sans(conf, serve, pki):
    # promtool 2.42 does not know client_allowed_sans (exporter-toolkit added it later): not checked there.
    exp = serve(webconfig.load(conf(MTLS + "  client_allowed_sans: [scraper.example]\n")))
    url = f"https://127.0.0.1:{exp.port}/metrics"
    assert py_get(url, client_context(pki, "client"))[0] == 200
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError, OSError)):
        py_get(url, client_context(pki, "client-other"))  # the right CA, a SAN not on the list
    status, _, rc = curl(url, "--cacert", str(pki / "ca.crt"), "--cert", str(pki / "client-other.crt"),
                         "--key", str(pki / "client-other.key"))
    assert status == 0 and rc != 0


def test_min_version_tls13_refuses_a_tls12_client(conf, serve, pki):
    path = conf(TLS + "  min_version: TLS13\n")
    assert promtool_ok(path)
    exp = serve(webconfig.load(path))
    url = f"https://127.0.0.1:{exp.port}/metrics"
    ca = ["--cacert", str(pki / "ca.crt")]
    assert curl(url, *ca, "--tls-max", "1.2")[0] == 0
    assert curl(url, *ca, "--tlsv1.3")[0] == 200
    with pytest.raises((ssl.SSLError, urllib.error.URLError)):
        py_get(url, client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2))
    assert py_get(url, client_context(pki, minimum_version=ssl.TLSVersion.TLSv1_3))[0] == 200


def test_cipher_suites_and_one_curve_are_honoured(conf, serve, pki):
    path = conf(TLS + "  max_version: TLS12\n  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]\n"
                "  curve_preferences: [CurveP256]\n")
    assert promtool_ok(path)
    exp = serve(webconfig.load(path))
    with socket.create_connection(("127.0.0.1", exp.port), timeout=10) as raw:
        with client_context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.version() == "TLSv1.2" and s.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    ctx = client_context(pki)
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")  # a suite the server does not allow
    with pytest.raises((ssl.SSLError, urllib.error.URLError)):
        py_get(f"https://127.0.0.1:{exp.port}/metrics", ctx)
    # The pinned curve: a client offering only X25519 for the key exchange gets no handshake.
    for group, ok in (("X25519", False), ("P-256", True)):
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{exp.port}", "-groups", group,
                            "-CAfile", str(pki / "ca.crt")], input="", capture_output=True, text=True, timeout=20)
        assert (r.returncode == 0) == ok, group


def test_the_cipher_table_matches_openssl_and_go():
    r = subprocess.run(["openssl", "ciphers", "-stdname", "ALL"], capture_output=True, text=True, check=True)
    iana = {line.split()[0]: line.split()[2] for line in r.stdout.splitlines() if line.startswith("TLS_")}
    for go, ours in webconfig.CIPHER_SUITES.items():
        if ours is not None:
            assert iana[go] == ours, go
        else:
            assert go in iana and iana[go] == go  # TLS 1.3: the same name on both sides


def test_all_cipher_names_are_gos(conf):
    # Every name the table knows is one promtool (Go's crypto/tls CipherSuites()) accepts.
    names = ", ".join(webconfig.CIPHER_SUITES)
    path = conf(TLS + f"  cipher_suites: [{names}]\n")
    assert promtool_ok(path)
    webconfig.load(path)


# --- rotation and reload ---------------------------------------------------------------------

def test_certificate_rotation_without_restart(conf, serve, pki):
    d = conf.dir
    exp = serve(webconfig.load(conf(TLS)))
    assert peer_cn(exp.port, pki) == "server-1"
    # Replaced by rename, as cert-manager or a Kubernetes secret volume does.
    shutil.copy(d / "server2.crt", d / "new.crt")
    shutil.copy(d / "server2.key", d / "new.key")
    os.replace(d / "new.key", d / "server.key")
    os.replace(d / "new.crt", d / "server.crt")
    assert peer_cn(exp.port, pki) == "server-2"
    # Rewritten in place.
    (d / "server.crt").write_bytes((d / "client.crt").read_bytes())  # half-way: key and cert differ
    with pytest.raises((ssl.SSLError, ConnectionError)):
        peer_cn(exp.port, pki)
    (d / "server.key").write_bytes((pki / "server.key").read_bytes())
    (d / "server.crt").write_bytes((pki / "server.crt").read_bytes())
    assert peer_cn(exp.port, pki) == "server-1"


def test_config_changes_apply_and_a_broken_file_fails_closed(conf, serve, pki, caplog):
    path = conf(USERS)
    exp = serve(webconfig.load(path))
    url = f"http://127.0.0.1:{exp.port}/metrics"
    assert py_get(url, None, "alice", PASSWORD)[0] == 200
    new_hash = bcrypt.hashpw(b"new password", bcrypt.gensalt(4)).decode()
    conf(f"basic_auth_users:\n  alice: '{new_hash}'\n")
    assert py_get(url, None, "alice", PASSWORD)[0] == 401  # a cached success does not outlive its hash
    assert py_get(url, None, "alice", "new password")[0] == 200
    with caplog.at_level(logging.ERROR, logger="monitor.serve.webconfig"):
        conf("basic_auth_users:\n  alice: not-a-hash\n")
        for _ in range(3):
            assert py_get(url, None, "alice", "new password")[0] == 500
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "basic_auth_users.alice: not a bcrypt hash" in errors[0]
    conf(f"basic_auth_users:\n  alice: '{new_hash}'\n")
    assert py_get(url, None, "alice", "new password")[0] == 200


def test_tls_cannot_be_switched_off_by_a_reload(conf, serve, pki):
    path = conf(TLS)
    exp = serve(webconfig.load(path))
    conf(USERS)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        peer_cn(exp.port, pki)
    conf(TLS)
    assert peer_cn(exp.port, pki) == "server-1"


# --- check_auth ------------------------------------------------------------------------------

def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_check_auth_cache_and_decoy(conf, monkeypatch):
    other = bcrypt.hashpw(b"bob's", bcrypt.gensalt(5)).decode()
    wc = webconfig.load(conf(USERS + f"  bob: '{other}'\n"))
    calls = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda pw, h: calls.append(h) or real(pw, h))

    assert wc.check_auth(basic("alice", PASSWORD)) and len(calls) == 1
    assert wc.check_auth(basic("alice", PASSWORD)) and len(calls) == 1  # cached
    assert not wc.check_auth(basic("alice", "wrong")) and len(calls) == 2
    assert not wc.check_auth(basic("alice", "wrong")) and len(calls) == 3  # failures are not cached
    # An unknown user costs a bcrypt run against the costliest configured hash, even with a
    # password that hash accepts.
    assert not wc.check_auth(basic("mallory", "bob's")) and calls[-1] == other.encode() and len(calls) == 4
    for header in (None, "", "Bearer x", "Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode(),
                   basic("alice", "x" * 73)):
        assert not wc.check_auth(header)
    assert len(calls) == 4  # malformed headers and over-long passwords never reach bcrypt
    assert wc.check_auth("basic " + basic("alice", PASSWORD).split()[1])  # the scheme is case-insensitive
    assert all(len(k) == 32 and PASSWORD.encode() not in k for k in wc._cache)  # no password kept


def test_the_cache_is_bounded(conf, monkeypatch):
    users = {f"u{i}": bcrypt.hashpw(f"p{i}".encode(), bcrypt.gensalt(4)).decode() for i in range(webconfig.AUTH_CACHE_SIZE + 1)}
    wc = webconfig.load(conf("basic_auth_users:\n" + "".join(f"  {u}: '{h}'\n" for u, h in users.items())))
    for i in range(len(users)):
        assert wc.check_auth(basic(f"u{i}", f"p{i}"))
    assert len(wc._cache) == webconfig.AUTH_CACHE_SIZE
    calls = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda pw, h: calls.append(h) or real(pw, h))
    assert wc.check_auth(basic(f"u{len(users) - 1}", f"p{len(users) - 1}")) and calls == []
    assert wc.check_auth(basic("u0", "p0")) and len(calls) == 1  # the oldest was evicted


def test_unknown_users_take_as_long_as_known_ones(conf):
    cost10 = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    wc = webconfig.load(conf(f"basic_auth_users:\n  alice: '{cost10}'\n"))

    def timed(header):
        t = time.perf_counter()
        assert not wc.check_auth(header)
        return time.perf_counter() - t
    known = sorted(timed(basic("alice", "wrong")) for _ in range(3))[1]
    unknown = sorted(timed(basic("mallory", "wrong")) for _ in range(3))[1]
    assert unknown > known * 0.5, (known, unknown)  # without the decoy: microseconds against ~50 ms


def test_passwords_are_never_logged(conf, serve, pki, caplog):
    exp = serve(webconfig.load(conf(TLS + USERS)))
    with caplog.at_level(logging.DEBUG):
        for pw in (PASSWORD, "wrong-password-xyz"):
            py_get(f"https://127.0.0.1:{exp.port}/metrics", client_context(pki), "alice", pw)
    assert caplog.records  # the debug request log did run
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert PASSWORD not in text and "wrong-password-xyz" not in text
    assert base64.b64encode(f"alice:{PASSWORD}".encode()).decode() not in text


# --- a real Prometheus -----------------------------------------------------------------------

def test_prometheus_scrapes_with_tls_client_cert_and_basic_auth(conf, serve, pki, tmp_path):
    """Debian's Prometheus, configured as the docs say, scrapes; a wrong password shows as down."""
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus missing: make setup installs Debian's prometheus package"
    exp = serve(webconfig.load(conf(MTLS + USERS)))
    (tmp_path / "right").write_text(PASSWORD)
    (tmp_path / "wrong").write_text("nope")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jobs = "".join(
        f"  - job_name: {job}\n    scheme: https\n"
        f"    tls_config: {{ca_file: {pki / 'ca.crt'}, cert_file: {pki / 'client.crt'}, key_file: {pki / 'client.key'}}}\n"
        f"    basic_auth: {{username: alice, password_file: {tmp_path / job}}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{exp.port}']}}]\n" for job in ("right", "wrong"))
    (tmp_path / "prometheus.yml").write_text("global: {scrape_interval: 1s}\nscrape_configs:\n" + jobs)
    prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(expr):
        url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
        with urllib.request.urlopen(url, timeout=5) as r:
            return {s["metric"].get("job"): s["value"][1] for s in json.load(r)["data"]["result"]}
    try:
        deadline = time.monotonic() + 30
        seen = {}
        while time.monotonic() < deadline:
            assert prom.poll() is None, "prometheus exited"
            try:
                seen = query("up") | {"value": query("tcpstate_test_total").get("right")}
            except OSError:
                pass
            if seen.get("right") == "1" and seen.get("wrong") == "0" and seen.get("value"):
                break
            time.sleep(0.5)
        assert seen == {"right": "1", "wrong": "0", "value": "3"}
    finally:
        prom.terminate()
        prom.wait(timeout=10)


# --- load errors -----------------------------------------------------------------------------

BAD_HASH_COST = "$2b$99$" + HASH[7:]
# (id, file, text expected in our one-line error, whether promtool 2.42 accepts the file, why they differ)
ERRORS = [
    ("unknown-key", "foo: 1\n", "foo: unknown key", False, ""),
    ("unknown-tls-key", TLS + "  certfile: x\n", "tls_server_config.certfile: unknown key", False, ""),
    ("duplicate-key", USERS + f"  alice: '{HASH}'\n", "line 3 column 3: not valid YAML: key 'alice' given twice", False, ""),
    ("not-yaml", "tls_server_config: [\n", "not valid YAML", False, ""),
    ("not-a-mapping", "- a\n", "must be a mapping, not a list", False, ""),
    ("tls-not-a-mapping", "tls_server_config: x\n", "tls_server_config: must be a mapping, not a string", False, ""),
    ("cert-missing", TLS.replace("server.crt", "nope.crt"), "tls_server_config.cert_file: {dir}/nope.crt: No such file or directory", False, ""),
    ("cert-is-a-directory", TLS.replace("server.crt", "."), "tls_server_config.cert_file: {dir}/.: Is a directory", False, ""),
    ("cert-is-a-key", TLS.replace("server.crt", "client.key"), "tls_server_config.cert_file: {dir}/client.key: no PEM BEGIN CERTIFICATE", False, ""),
    ("key-mismatch", TLS.replace("server.key", "client.key"), "tls_server_config.key_file: {dir}/client.key does not belong to the certificate in {dir}/server.crt", False, ""),
    ("key-encrypted", TLS.replace("server.key", "encrypted.key"), "tls_server_config.key_file: {dir}/encrypted.key: the key is encrypted", False, ""),
    ("key-file-missing", "tls_server_config:\n  cert_file: server.crt\n", "tls_server_config.key_file: missing", False, ""),
    ("cert-file-missing", "tls_server_config:\n  key_file: server.key\n", "tls_server_config.cert_file: missing", False, ""),
    ("client-auth-bogus", TLS + "  client_auth_type: Bogus\n", "tls_server_config.client_auth_type: unknown value 'Bogus'", False, ""),
    ("ca-without-auth", TLS + "  client_ca_file: ca.crt\n", "tls_server_config.client_ca_file: given without client_auth_type", False, ""),
    ("ca-missing", MTLS.replace("ca.crt", "nope.crt"), "tls_server_config.client_ca_file: {dir}/nope.crt: No such file", False, ""),
    ("min-version-bogus", TLS + "  min_version: TLS14\n", "tls_server_config.min_version: unknown value 'TLS14'", False, ""),
    ("cipher-bogus", TLS + "  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256]\n", "tls_server_config.cipher_suites: unknown cipher suite 'TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256'", False, ""),
    ("curve-bogus", TLS + "  curve_preferences: [Bogus]\n", "tls_server_config.curve_preferences: unknown curve 'Bogus'", False, ""),
    ("prefer-not-bool", TLS + "  prefer_server_cipher_suites: yes please\n", "tls_server_config.prefer_server_cipher_suites: must be true or false", False, ""),
    ("http2-not-bool", "http_server_config:\n  http2: maybe\n", "http_server_config.http2: must be true or false", False, ""),
    ("header-value", "http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "http_server_config.headers.X-Frame-Options: 'allow' is not allowed", False, ""),
    ("header-name", "http_server_config:\n  headers:\n    X-Powered-By: me\n", "http_server_config.headers.X-Powered-By: unknown key", False, ""),
    ("not-bcrypt", "basic_auth_users:\n  alice: secret\n", "basic_auth_users.alice: not a bcrypt hash", False, ""),
    ("bcrypt-cost", f"basic_auth_users:\n  alice: '{BAD_HASH_COST}'\n", "basic_auth_users.alice: bcrypt cost 99 is outside 4..31", False, ""),
    ("inline-cert", TLS + "  cert: x\n", "tls_server_config.cert: inline certificates are not supported", False, "promtool 2.42: unknown field"),
    ("rate-limit", "rate_limit: {interval: 1s, burst: 2}\n", "rate_limit: not supported", False, "promtool 2.42: unknown field"),
    ("sans-without-mtls", TLS + "  client_allowed_sans: [x]\n", "tls_server_config.client_allowed_sans: needs client_auth_type RequireAndVerifyClientCert", False, "promtool 2.42: unknown field"),
    # Where we are stricter than the toolkit (promtool accepts; the comment says why we do not):
    ("request-client-cert", TLS + "  client_auth_type: RequestClientCert\n  client_ca_file: ca.crt\n",
     "tls_server_config.client_auth_type: RequestClientCert is not supported", True,
     "Go asks for a certificate without verifying it; Python's ssl verifies every certificate it asks for"),
    ("require-any-client-cert", TLS + "  client_auth_type: RequireAnyClientCert\n",
     "tls_server_config.client_auth_type: RequireAnyClientCert is not supported", True, "as RequestClientCert"),
    ("verify-without-ca", TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
     "tls_server_config.client_auth_type: RequireAndVerifyClientCert needs client_ca_file", True,
     "Go would verify client certificates against the system's web CAs; that is never what is meant"),
    ("ca-without-certificates", MTLS.replace("client_ca_file: ca.crt", "client_ca_file: ca.key"),
     "tls_server_config.client_ca_file: {dir}/ca.key: no PEM BEGIN CERTIFICATE", True,
     "Go ignores a CA file with no certificate in it, and then no client can connect"),
    ("min-above-max", TLS + "  min_version: TLS13\n  max_version: TLS12\n",
     "tls_server_config.min_version: TLS13 is above max_version TLS12", True, "Go fails every handshake instead"),
    ("curve-x25519", TLS + "  curve_preferences: [X25519]\n", "tls_server_config.curve_preferences: Python's ssl can pin one", True,
     "Python's ssl cannot set X25519 or a preference list"),
    ("curve-list", TLS + "  curve_preferences: [CurveP256, CurveP384]\n", "tls_server_config.curve_preferences: Python's ssl can pin one", True,
     "as curve-x25519"),
    ("tls-options-without-cert", "tls_server_config:\n  min_version: TLS13\n",
     "tls_server_config: no cert_file and key_file, so TLS would be off", True,
     "the toolkit quietly serves plain HTTP, which the operator did not mean"),
    ("colon-in-user", f"basic_auth_users:\n  'a:b': '{HASH}'\n", "basic_auth_users.a:b: a user name must be non-empty and without ':'", True,
     "basic auth splits at the first ':', so that user could never log in"),
    ("numeric-user", f"basic_auth_users:\n  123: '{HASH}'\n", "basic_auth_users: user name 123 is not a string: quote it", True,
     "Go's YAML reads the key as text; PyYAML as a number"),
]


@pytest.mark.parametrize("text,expected,promtool_accepts,why", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_load_errors(conf, text, expected, promtool_accepts, why):
    path = conf(text)
    with pytest.raises(WebConfigError) as err:
        webconfig.load(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    assert expected.format(dir=conf.dir) in msg, msg
    assert promtool_ok(path) == promtool_accepts, why


def test_missing_file(tmp_path):
    with pytest.raises(WebConfigError, match=rf"^{tmp_path}/none.yml: cannot read: No such file or directory$"):
        webconfig.load(tmp_path / "none.yml")
    assert not promtool_ok(tmp_path / "none.yml")


def test_relative_names_resolve_against_the_file_not_the_cwd(conf, monkeypatch, tmp_path_factory):
    path = conf(TLS)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    wc = webconfig.load(os.path.relpath(path))
    assert wc.tls and wc.path == str(path)
    assert webconfig.parse(path).tls.cert_file == str(conf.dir / "server.crt")


HEADERS = ("http_server_config:\n  http2: true\n  headers:\n    Strict-Transport-Security: max-age=31536000\n"
           "    X-Content-Type-Options: nosniff\n    X-Frame-Options: sameorigin\n    X-XSS-Protection: '1; mode=block'\n"
           "    Content-Security-Policy: \"default-src 'self'\"\n")
VALID = [
    ("empty", ""),
    ("users-only", USERS),
    ("tls", TLS),
    ("everything", MTLS + "  min_version: TLS12\n  max_version: TLS13\n  prefer_server_cipher_suites: false\n"
     "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]\n"
     "  curve_preferences: [CurveP384]\n"
     + HEADERS + USERS),
    ("null-sections", "tls_server_config:\nhttp_server_config:\nbasic_auth_users:\n"),
]


@pytest.mark.parametrize("text", [v[1] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_files_load_and_promtool_agrees(conf, text):
    path = conf(text)
    wc = webconfig.load(path)
    assert wc.tls == ("cert_file" in text)
    assert promtool_ok(path)


def test_headers_are_served(conf, serve):
    exp = serve(webconfig.load(conf(HEADERS)))
    status, out, _ = curl(f"http://127.0.0.1:{exp.port}/")
    assert status == 200 and "tcpstate" in out
    for line in ("Strict-Transport-Security: max-age=31536000", "X-Content-Type-Options: nosniff",
                 "X-Frame-Options: sameorigin", "X-XSS-Protection: 1; mode=block",
                 "Content-Security-Policy: default-src 'self'"):
        assert f"\n{line}\n" in out, line


def test_the_deploy_example(pki, tmp_path):
    shutil.copy(ROOT / "deploy/web-config.yml", tmp_path / "web-config.yml")
    shutil.copy(pki / "server.crt", tmp_path / "tcpstate.crt")
    shutil.copy(pki / "server.key", tmp_path / "tcpstate.key")
    wc = webconfig.load(tmp_path / "web-config.yml")
    assert wc.tls and wc.check_auth(basic("prometheus", "change-me")) and not wc.check_auth(basic("prometheus", "x"))
    assert promtool_ok(tmp_path / "web-config.yml")


def test_a_header_value_cannot_split_the_response(conf):
    path = conf("http_server_config:\n  headers:\n    Content-Security-Policy: |\n      default-src 'self'\n"
                "      X-Injected: 1\n")
    with pytest.raises(webconfig.WebConfigError) as err:
        webconfig.load(path)
    assert str(err.value) == (f"{path}: http_server_config.headers.Content-Security-Policy: "
                              "a header value cannot hold a line break")
