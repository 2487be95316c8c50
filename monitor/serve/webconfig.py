"""webconfig.py: --web-config-file, the exporter-toolkit web config (TLS, basic auth, headers) for Python's ssl."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import errno
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import ssl
import threading
from collections import OrderedDict
from dataclasses import dataclass

import bcrypt
import yaml

log = logging.getLogger(__name__)

# The toolkit's names for TLS versions (web/tls_config.go).
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# Go's crypto/tls CipherSuites() names (the ones the toolkit accepts) and OpenSSL's names for them.
# TLS 1.3 suites map to None: neither Go nor OpenSSL lets cipher_suites change them.
CIPHER_SUITES = {
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
}

# Go's curve names; Python's ssl (set_ecdh_curve) can pin one NIST curve and nothing else.
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": None}

CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go accepts a certificate it does not verify for these; Python's ssl verifies every
# certificate it asks for, so honouring them is impossible and a silent upgrade would
# change who gets in.
CLIENT_AUTH_UNSUPPORTED = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")

# The toolkit allows only these headers, and for two of them only these values (web/handler.go).
HEADERS = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "client_allowed_sans", "min_version",
            "max_version", "cipher_suites", "prefer_server_cipher_suites", "curve_preferences")
# Keys of newer toolkits that this implementation refuses by name rather than as unknown.
NOT_SUPPORTED = {
    "tls_server_config.cert": "inline certificates are not supported: put the PEM in a file and give cert_file",
    "tls_server_config.key": "inline keys are not supported: put the PEM in a file and give key_file",
    "tls_server_config.client_ca": "inline CAs are not supported: put the PEM in a file and give client_ca_file",
    "rate_limit": "not supported by tcpstate",
}

BCRYPT_HASH = re.compile(r"^\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}$")
BCRYPT_MAX_PASSWORD = 72  # bytes; bcrypt ignores the rest, the bcrypt module refuses longer ones
AUTH_CACHE_SIZE = 100  # successful verifications remembered, as the toolkit's cache


class WebConfigError(ValueError):
    """The web config file is wrong; the message is one line that starts with the file's path."""


@dataclass(frozen=True)
class TLSSettings:
    cert_file: str
    key_file: str
    client_auth: str
    client_ca_file: str | None
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion
    ciphers: tuple  # OpenSSL names, TLS 1.2 and below
    prefer_server_ciphers: bool
    curve: str | None  # OpenSSL name
    allowed_sans: tuple | None

    def files(self) -> tuple:
        return tuple(f for f in (self.cert_file, self.key_file, self.client_ca_file) if f)


@dataclass(frozen=True)
class Settings:
    tls: TLSSettings | None
    users: dict  # name -> bcrypt hash (bytes)
    headers: tuple  # (name, value) pairs
    http2: bool


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, as the toolkit's strict YAML decoding does."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key; the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _Reader:
    """Typed access to the parsed YAML; every failure names the file and the key."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, key: str, problem: str):
        raise WebConfigError(f"{self.path}: {key}: {problem}" if key else f"{self.path}: {problem}")

    def mapping(self, value, key: str, allowed) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping, not {_kind(value)}")
        for k in value:
            name = f"{key}.{k}" if key else str(k)
            if name in NOT_SUPPORTED:
                self.fail(name, NOT_SUPPORTED[name])
            if allowed is not None and k not in allowed:
                self.fail(name, "unknown key (allowed: " + ", ".join(allowed) + ")")
        return value

    def string(self, value, key: str) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            self.fail(key, f"must be a string, not {_kind(value)}")
        return value

    def boolean(self, value, key: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {value!r}")
        return value

    def strings(self, value, key: str) -> list | None:
        if value is None:
            return None
        if not isinstance(value, list):
            self.fail(key, f"must be a list of strings, not {_kind(value)}")
        for item in value:
            if not isinstance(item, str):
                self.fail(key, f"{item!r} is not a string")
        return value

    def choice(self, value, key: str, choices, default: str) -> str:
        value = self.string(value, key) or default
        if value not in choices:
            self.fail(key, f"unknown value {value!r} (one of: {', '.join(choices)})")
        return value


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _resolve(base_dir: str, name: str) -> str:
    # Like the toolkit: relative file names are relative to the config file's directory.
    return name if not name or os.path.isabs(name) else os.path.join(base_dir, name)


def parse(path: str) -> Settings:
    """Read and check the config file; certificates are checked by build_context()."""
    path = os.path.abspath(path)
    r = _Reader(path)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        r.fail("", f"cannot read: {exc.strerror}")
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        r.fail("", f"{where}not valid YAML: {exc.problem or exc.context}")
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        r.fail("", f"not valid YAML: {str(exc).splitlines()[0]}")
    top = r.mapping(doc, "", ("tls_server_config", "http_server_config", "basic_auth_users"))
    tls = _parse_tls(r, top.get("tls_server_config"), os.path.dirname(path))

    http = r.mapping(top.get("http_server_config"), "http_server_config", ("http2", "headers"))
    http2 = r.boolean(http.get("http2"), "http_server_config.http2", True)
    headers = []
    for name, value in r.mapping(http.get("headers"), "http_server_config.headers", tuple(HEADERS)).items():
        key = f"http_server_config.headers.{name}"
        value = r.string(value, key)
        if "\r" in value or "\n" in value:  # it would end the header and start another
            r.fail(key, "a header value cannot hold a line break")
        if HEADERS[name] and value not in HEADERS[name]:
            r.fail(key, f"{value!r} is not allowed (one of: {', '.join(HEADERS[name])})")
        if value:  # blank means unset
            headers.append((name, value))

    users = {}
    for name, hashed in r.mapping(top.get("basic_auth_users"), "basic_auth_users", None).items():
        if not isinstance(name, str):
            r.fail("basic_auth_users", f"user name {name!r} is not a string: quote it")
        key = f"basic_auth_users.{name}"
        if not name or ":" in name:
            r.fail(key, "a user name must be non-empty and without ':' (basic auth splits at the first ':')")
        hashed = r.string(hashed, key)
        m = BCRYPT_HASH.match(hashed)
        if not m:
            r.fail(key, "not a bcrypt hash ($2a$, $2b$ or $2y$, cost, 53 characters of salt and hash)")
        if not 4 <= int(m.group(1)) <= 31:
            r.fail(key, f"bcrypt cost {m.group(1)} is outside 4..31")
        users[name] = hashed.encode()
    return Settings(tls=tls, users=users, headers=tuple(headers), http2=http2)


def _parse_tls(r: _Reader, value, base_dir: str) -> TLSSettings | None:
    c = r.mapping(value, "tls_server_config", TLS_KEYS)
    k = "tls_server_config."
    cert_file = _resolve(base_dir, r.string(c.get("cert_file"), k + "cert_file"))
    key_file = _resolve(base_dir, r.string(c.get("key_file"), k + "key_file"))
    ca_file = _resolve(base_dir, r.string(c.get("client_ca_file"), k + "client_ca_file")) or None
    auth = r.string(c.get("client_auth_type"), k + "client_auth_type") or "NoClientCert"
    if auth in CLIENT_AUTH_UNSUPPORTED:
        r.fail(k + "client_auth_type", f"{auth} is not supported: Python's ssl verifies every client certificate"
               " it asks for; use VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file")
    auth = r.choice(auth, k + "client_auth_type", tuple(CLIENT_AUTH), "NoClientCert")
    if not (cert_file or key_file or ca_file or c.get("client_auth_type")):
        # The toolkit serves plain HTTP here and ignores the rest; refusing is safer than an
        # operator believing min_version or cipher_suites protect anything.
        if any(c.get(key) is not None for key in TLS_KEYS):
            r.fail("tls_server_config", "no cert_file and key_file, so TLS would be off: give both, or remove the section")
        return None
    if not cert_file:
        r.fail(k + "cert_file", "missing (TLS needs cert_file and key_file)")
    if not key_file:
        r.fail(k + "key_file", "missing (TLS needs cert_file and key_file)")
    if ca_file and auth == "NoClientCert":
        r.fail(k + "client_ca_file", "given without client_auth_type (VerifyClientCertIfGiven or RequireAndVerifyClientCert)")
    if auth != "NoClientCert" and not ca_file:
        r.fail(k + "client_auth_type", f"{auth} needs client_ca_file, the CA that signs client certificates")
    sans = r.strings(c.get("client_allowed_sans"), k + "client_allowed_sans")
    if sans is not None:
        if auth != "RequireAndVerifyClientCert":
            r.fail(k + "client_allowed_sans", "needs client_auth_type RequireAndVerifyClientCert")
        if not sans:
            r.fail(k + "client_allowed_sans", "is empty, so no client could connect")
    min_v = r.choice(c.get("min_version"), k + "min_version", tuple(TLS_VERSIONS), "TLS12")
    max_v = r.choice(c.get("max_version"), k + "max_version", tuple(TLS_VERSIONS), "TLS13")
    if TLS_VERSIONS[min_v] > TLS_VERSIONS[max_v]:
        r.fail(k + "min_version", f"{min_v} is above max_version {max_v}: no handshake could succeed")
    ciphers = []
    for name in r.strings(c.get("cipher_suites"), k + "cipher_suites") or ():
        if name not in CIPHER_SUITES:
            r.fail(k + "cipher_suites", f"unknown cipher suite {name!r} (Go's names, e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)")
        if CIPHER_SUITES[name]:
            ciphers.append(CIPHER_SUITES[name])
    curve = None
    curves = r.strings(c.get("curve_preferences"), k + "curve_preferences") or []
    for name in curves:
        if name not in CURVES:
            r.fail(k + "curve_preferences", f"unknown curve {name!r} (one of: {', '.join(CURVES)})")
    if len(curves) > 1 or (curves and CURVES[curves[0]] is None):
        r.fail(k + "curve_preferences", "Python's ssl can pin one of CurveP256, CurveP384, CurveP521 and no list"
               " or X25519: give one of those or leave the key out for OpenSSL's defaults")
    if curves:
        curve = CURVES[curves[0]]
    return TLSSettings(
        cert_file=cert_file, key_file=key_file, client_auth=auth, client_ca_file=ca_file,
        min_version=TLS_VERSIONS[min_v], max_version=TLS_VERSIONS[max_v], ciphers=tuple(ciphers),
        prefer_server_ciphers=r.boolean(c.get("prefer_server_cipher_suites"), k + "prefer_server_cipher_suites", True),
        curve=curve, allowed_sans=tuple(sans) if sans is not None else None)


class _Encrypted(Exception):
    pass


def _no_password():
    raise _Encrypted()


def _read_pem(r: _Reader, key: str, name: str, marker: bytes) -> None:
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as exc:
        r.fail(key, f"{name}: {exc.strerror}")
    if marker not in data:
        r.fail(key, f"{name}: no PEM {marker.decode().strip('-')} in it")
    if b"ENCRYPTED" in data and key.endswith("key_file"):
        r.fail(key, f"{name}: the key is encrypted; the daemon cannot ask for a passphrase")


def build_context(path: str, tls: TLSSettings) -> ssl.SSLContext:
    """A server SSLContext from the files as they are now."""
    r = _Reader(path)
    k = "tls_server_config."
    _read_pem(r, k + "cert_file", tls.cert_file, b"-----BEGIN CERTIFICATE-----")
    _read_pem(r, k + "key_file", tls.key_file, b"PRIVATE KEY-----")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.minimum_version = tls.min_version
        ctx.maximum_version = tls.max_version
    except (ValueError, ssl.SSLError) as exc:
        r.fail(k + "min_version", f"this OpenSSL cannot set it: {exc}")
    if tls.prefer_server_ciphers:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.ciphers:
        try:
            ctx.set_ciphers(":".join(tls.ciphers))
        except ssl.SSLError:
            r.fail(k + "cipher_suites", "this OpenSSL offers none of them")
    if tls.curve:
        try:
            ctx.set_ecdh_curve(tls.curve)
        except (ValueError, ssl.SSLError) as exc:
            r.fail(k + "curve_preferences", f"this OpenSSL cannot set {tls.curve}: {exc}")
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
    except _Encrypted:
        r.fail(k + "key_file", f"{tls.key_file}: the key is encrypted; the daemon cannot ask for a passphrase")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            r.fail(k + "key_file", f"{tls.key_file} does not belong to the certificate in {tls.cert_file}")
        r.fail(k + "cert_file", f"cannot load {tls.cert_file} with {tls.key_file}: {exc.reason or exc}")
    except OSError as exc:
        r.fail(k + "cert_file", f"cannot load {tls.cert_file} with {tls.key_file}: {exc.strerror or exc}")
    ctx.verify_mode = CLIENT_AUTH[tls.client_auth]
    if tls.client_ca_file:
        _read_pem(r, k + "client_ca_file", tls.client_ca_file, b"-----BEGIN CERTIFICATE-----")
        try:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            r.fail(k + "client_ca_file", f"{tls.client_ca_file}: cannot load: {getattr(exc, 'reason', None) or exc}")
    return ctx


def _signature(names) -> tuple:
    """What changes when a file is replaced or rewritten (a Kubernetes secret swaps a symlink)."""
    sig = []
    for name in names:
        try:
            st = os.stat(name)
            sig.append((name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError as exc:
            sig.append((name, exc.errno))
    return tuple(sig)


class WebConfig:
    """A loaded web config. The file and the certificates it names are re-read when they
    change (checked per handshake and per request, as the toolkit reads them per handshake),
    so certificates rotate without a restart. A change that does not load fails closed:
    handshakes and requests fail until the files are fixed, and the error is logged once."""

    def __init__(self, path: str, settings: Settings, context: ssl.SSLContext | None, signatures: tuple):
        self.path = os.path.abspath(path)
        self.tls = settings.tls is not None  # fixed: a listener cannot switch TLS on or off
        self._settings = settings
        self._context = context
        self._config_sig, self._files_sig = signatures  # taken before the files were read
        self._error: WebConfigError | None = None
        self._failed_sig = None
        self._warned_unreadable = False
        self._lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()  # one bcrypt at a time: it is CPU-bound by design
        self._cache_key = secrets.token_bytes(32)
        self._cache: OrderedDict = OrderedDict()

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def headers(self) -> tuple:
        return self._settings.headers

    def describe(self) -> str:
        s = self._settings
        parts = [f"TLS on (client certificates: {s.tls.client_auth})" if s.tls else "TLS off"]
        parts.append(f"basic auth for {len(s.users)} user(s)" if s.users else "no basic auth")
        if s.headers:
            parts.append("headers " + ", ".join(name for name, _ in s.headers))
        return "; ".join(parts)

    def refresh(self) -> None:
        """Pick up changes to the config file and the certificates; raise WebConfigError
        while they do not load."""
        with self._lock:
            config_sig = _signature([self.path])
            if self._unreadable([self.path]):
                return
            settings = self._settings
            if config_sig != self._config_sig:
                try:
                    settings = parse(self.path)
                    if (settings.tls is not None) != self.tls:
                        raise WebConfigError(f"{self.path}: tls_server_config: TLS cannot be turned "
                                             f"{'on' if settings.tls else 'off'} without a restart")
                except WebConfigError as exc:
                    self._fail((config_sig, None), exc)
            files_sig = _signature(settings.tls.files()) if settings.tls else ()
            if settings.tls and self._unreadable(settings.tls.files()):
                # The certificates stay as loaded; users and headers still follow the file.
                if config_sig != self._config_sig:
                    self._settings = dataclasses.replace(settings, tls=self._settings.tls)
                    self._config_sig = config_sig
                    log.info("web config reloaded, certificates kept as loaded: %s", self.path)
                    with self._cache_lock:
                        self._cache.clear()
                return
            if config_sig == self._config_sig and files_sig == self._files_sig:
                self._error = self._failed_sig = None  # unchanged, or back to what last loaded
                return
            if (config_sig, files_sig) == self._failed_sig:
                raise self._error
            try:
                context = build_context(self.path, settings.tls) if settings.tls else None
            except WebConfigError as exc:
                self._fail((config_sig, files_sig), exc)
            log.info("web config reloaded: %s", self.path)
            self._settings, self._context = settings, context
            self._config_sig, self._files_sig = config_sig, files_sig
            self._error = self._failed_sig = None
            with self._cache_lock:
                self._cache.clear()

    def _unreadable(self, names) -> bool:
        """After --user, files may be out of the daemon's reach. What was loaded as root keeps
        serving; to pick up changes they must be readable, and the log says so once."""
        denied = []
        for name in names:
            try:
                os.stat(name)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM):
                    denied.append(name)
                continue  # a missing file is a change that fails to load, reported as such
            if not os.access(name, os.R_OK):
                denied.append(name)
        if denied and not self._warned_unreadable:
            log.warning("web config: cannot read %s as this user (permission denied); serving what was loaded "
                        "from it: make it readable to this user to pick up changes", ", ".join(denied))
            self._warned_unreadable = True
        return bool(denied)

    def _fail(self, sig, exc: WebConfigError):
        if sig != self._failed_sig:  # once per broken state, not per request
            log.error("web config not reloaded; refusing connections until it is fixed: %s", exc)
            self._error, self._failed_sig = exc, sig
        raise self._error

    def ssl_context(self) -> ssl.SSLContext:
        """The context for the next handshake, rebuilt if the certificates changed."""
        self.refresh()
        return self._context

    def peer_allowed(self, peercert: dict | None) -> bool:
        """client_allowed_sans: the verified client certificate names one of them."""
        tls = self._settings.tls
        if tls is None or tls.allowed_sans is None:
            return True
        for kind, value in (peercert or {}).get("subjectAltName", ()):
            if kind == "IP Address":
                try:
                    value = str(ipaddress.ip_address(value.strip()))
                except ValueError:
                    continue
            if value in tls.allowed_sans:
                return True
        return False

    def check_auth(self, header_value: str | None) -> bool:
        """True when no users are configured or the Authorization header holds a user's
        password. Unknown users cost a bcrypt run like known ones, so timing does not tell
        which users exist; successful checks are cached (keyed by an HMAC, never the password)."""
        if self._error is not None:
            return False
        users = self._settings.users
        if not users:
            return True
        scheme, _, encoded = (header_value or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            raw = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user_raw, colon, password = raw.partition(b":")
        if not colon:
            return False
        try:
            user = user_raw.decode("utf-8")
        except UnicodeDecodeError:
            return False
        hashed = users.get(user)
        known = hashed is not None
        if not known:
            hashed = self._decoy()
        # Length-prefixed, so no other (user, hash, password) can give the same bytes.
        material = b"".join(b"%d:%s" % (len(part), part) for part in (user_raw, hashed, password))
        key = hmac.new(self._cache_key, material, hashlib.sha256).digest()
        with self._cache_lock:
            if known and key in self._cache:
                self._cache.move_to_end(key)
                return True
        ok = False
        if len(password) <= BCRYPT_MAX_PASSWORD:
            with self._bcrypt_lock:
                try:
                    ok = bcrypt.checkpw(password, hashed)
                except ValueError:
                    ok = False
        ok = ok and known
        if ok:
            with self._cache_lock:
                self._cache[key] = True
                while len(self._cache) > AUTH_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return ok

    def _decoy(self) -> bytes:
        # A configured hash of the highest cost: an unknown user costs what the slowest
        # real user does, and the result is thrown away.
        return max(self._settings.users.values(), key=lambda h: int(h[4:6]))


def load(path: str) -> WebConfig:
    """Read the file and the certificates it names; WebConfigError("PATH: ...") when wrong."""
    path = os.path.abspath(path)
    config_sig = _signature([path])
    settings = parse(path)
    files_sig = _signature(settings.tls.files()) if settings.tls else ()
    context = build_context(path, settings.tls) if settings.tls else None
    return WebConfig(path, settings, context, (config_sig, files_sig))
