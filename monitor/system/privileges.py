"""privileges.py: once the probes are attached, give up what the daemon no longer needs: every capability it can, and root when --user names an account."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

log = logging.getLogger(__name__)

CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 6, 7, 8
CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 19, 21, 38, 39
NAMES = {CAP_SYS_PTRACE: "CAP_SYS_PTRACE", CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}

PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 8, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAP_VERSION_3 = 0x20080522
_SYS_SETRESUID = {"x86_64": 117, "aarch64": 147}
_SYS_SETRESGID = {"x86_64": 119, "aarch64": 149}
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159}
UID_MAX = 2**32 - 2  # (uid_t)-1 means "unchanged" to setresuid

_libc = ctypes.CDLL(None, use_errno=True)


class PrivilegeError(OSError):
    """The kernel refused a step of the drop."""


class CredentialError(PrivilegeError):
    """The switch to another user was refused (a capability missing, or a user namespace)."""


class ReadsRefused(PrivilegeError):
    """The maps cannot be read with fewer privileges: nothing was dropped."""


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@dataclass(frozen=True)
class Account:
    """Who the daemon becomes: --user NAME or a numeric uid (then the group is the same number)."""
    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, spec: str) -> "Account":
        try:
            entry = pwd.getpwnam(spec)
        except KeyError:
            if not (spec.isascii() and spec.isdigit()):
                raise ValueError(f"no user {spec!r} on this host (useradd --system {spec}, or give a uid)") from None
            if int(spec) > UID_MAX:
                raise ValueError(f"uid {spec} is out of range (0 to {UID_MAX})") from None
            try:
                entry = pwd.getpwuid(int(spec))
            except KeyError:  # a bare uid is fine: containers often have no passwd entry for it
                return cls(spec, int(spec), int(spec))
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"{what}: {os.strerror(err)}")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def _mask(caps: Iterable[int]) -> tuple[int, int]:
    bits = 0
    for c in caps:
        bits |= 1 << c
    return bits & 0xFFFFFFFF, bits >> 32


def _capset_thread(keep: frozenset[int]) -> None:
    """Effective and permitted become keep, inheritable empty, for the calling thread only."""
    low, high = _mask(keep)
    header = _Header(_CAP_VERSION_3, 0)
    data = (_Data * 2)(_Data(low, low, 0), _Data(high, high, 0))
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _raw(ids: dict, what: str, *args: int) -> None:
    """The raw system call changes the calling thread only (glibc's wrapper changes them all)."""
    nr = ids.get(os.uname().machine)
    if nr is None:
        raise PrivilegeError(errno.ENOSYS, f"{what}: unknown architecture {os.uname().machine}")
    _check(_libc.syscall(nr, *args), what)


def _effective_has(cap: int) -> bool:
    return bool(status("/proc/thread-self/status")["CapEff"] >> cap & 1)


def status(path: str = "/proc/self/status") -> dict:
    """Uid, Gid, CapEff, CapPrm, CapBnd, CapAmb, CapInh and NoNewPrivs of a process or thread."""
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid"):
                out[key] = int(value.split()[0])
            elif key.startswith("Cap"):
                out[key] = int(value.strip(), 16)
            elif key == "NoNewPrivs":
                out[key] = int(value)
    return out


PERF_EVENT_PARANOID = "/proc/sys/kernel/perf_event_paranoid"


def can_load_programs(proc_status: str = "/proc/self/status", paranoid_path: str = PERF_EVENT_PARANOID
                      ) -> tuple[bool, str]:
    """The capabilities BPF tracepoints need (CAP_BPF+CAP_PERFMON, or CAP_SYS_ADMIN), and why not.
    Attaching a tracepoint opens a perf event: where kernel.perf_event_paranoid is above 2 (Debian's
    and Ubuntu's kernels, CONFIG_SECURITY_PERF_EVENTS_RESTRICT), that takes CAP_SYS_ADMIN, and uid 0
    without it (a systemd unit's bounding set) fails there, with EACCES."""
    try:
        eff = status(proc_status)["CapEff"]
    except (OSError, KeyError):
        eff = 0
    try:
        with open(paranoid_path) as f:
            paranoid = int(f.read())
    except (OSError, ValueError):
        paranoid = 2
    root = os.geteuid() == 0
    if eff >> CAP_SYS_ADMIN & 1:
        return True, "running as root" if root else "has CAP_SYS_ADMIN"
    if paranoid > 2:
        return False, (f"kernel.perf_event_paranoid is {paranoid}: this kernel lets only CAP_SYS_ADMIN open the perf "
                       "events that attach tracepoints; grant it (tcpstate drops it once attached) or set "
                       "kernel.perf_event_paranoid=2")
    if eff >> CAP_PERFMON & 1 and eff >> CAP_BPF & 1:
        return True, "running as root with CAP_BPF and CAP_PERFMON" if root else \
            "has CAP_BPF and CAP_PERFMON to load and attach BPF tracepoint programs"
    return False, "lacks CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN): run with sudo"


def describe(caps: Iterable[int]) -> str:
    names = sorted(NAMES.get(c, f"cap {c}") for c in caps)
    return ", ".join(names) or "none"


def try_reads(keep: frozenset[int], account: Account | None, reads: Callable[[], None]) -> OSError | None:
    """Run reads in a throwaway thread that has given up what the drop would give up (threads
    hold their own credentials), so the real, irreversible drop happens only if they work.
    Returns the error the reads met, or None."""
    result: list = []

    def probe():
        try:
            try:
                if account is not None:
                    _raw(_SYS_SETGROUPS, "setgroups", 0, 0)
                    _raw(_SYS_SETRESGID, "setresgid", account.gid, account.gid, account.gid)
                    if keep:
                        _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
                    _raw(_SYS_SETRESUID, "setresuid", account.uid, account.uid, account.uid)
                _capset_thread(keep)
            except PrivilegeError as exc:
                result.append(CredentialError(exc.errno, exc.strerror))
                return
            reads()
        except OSError as exc:
            result.append(exc)
        except Exception as exc:  # bcc raises plain Exceptions for failed map reads
            result.append(OSError(errno.EPERM, str(exc)))
        else:
            result.append(None)

    t = threading.Thread(target=probe, name="privilege-probe")
    t.start()
    t.join()
    return result[0] if result else OSError(errno.EIO, "the probe thread died")


def drop(keep: frozenset[int], account: Account | None) -> bool:
    """Give up every capability but keep, for good: the bounding and ambient sets too, with
    no_new_privs, then switch to account if given. Credentials are per thread, so this must
    run while the process has one thread; the caller makes sure. Returns whether the bounding
    set could be emptied (that takes CAP_SETPCAP)."""
    # A joined Python thread may not have left the kernel yet, nor a request thread whose
    # connection the server has just ended: wait for them, briefly.
    deadline = time.monotonic() + 10
    while len(tasks := os.listdir("/proc/self/task")) != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    if len(tasks) != 1:
        raise PrivilegeError(errno.EBUSY, f"{len(tasks)} threads running; the drop needs exactly one")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    # The bounding set limits what an exec could regain; dropping from it leaves the effective
    # set alone, so CAP_SETUID still works for the steps below. It takes CAP_SETPCAP; without
    # it (e.g. a container given only CAP_BPF and CAP_PERFMON) the set stays, which no_new_privs
    # makes harmless: nothing is executed, and an exec could not gain from it.
    bounded = _effective_has(CAP_SETPCAP)
    if bounded:
        for cap in range(_last_cap() + 1):
            if cap not in keep:
                rc = _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
                if rc != 0 and ctypes.get_errno() != errno.EINVAL:  # EINVAL: a cap this kernel lacks
                    _check(rc, f"prctl(PR_CAPBSET_DROP, {cap})")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if account is not None:
        if keep:  # else the uid change empties the permitted set we still want to keep from
            _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
        try:
            os.setgroups([])
            os.setresgid(account.gid, account.gid, account.gid)
            os.setresuid(account.uid, account.uid, account.uid)
        except OSError as exc:
            raise CredentialError(exc.errno, f"switching to {account.name}: {exc.strerror}") from None
        if os.getresuid() != (account.uid,) * 3 or os.getresgid() != (account.gid,) * 3:
            raise CredentialError(errno.EPERM, f"still uid {os.getresuid()[0]} after switching to {account.name}")
    _capset_thread(keep)
    if account is not None and keep:
        _check(_libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    return bounded


def netns_needs(paths: Iterable[str]) -> dict[int, str]:
    """Capabilities the socket-table poll keeps for --netns, with why: entering a namespace takes
    CAP_SYS_ADMIN; opening another process's /proc/PID/ns/net takes CAP_SYS_PTRACE once the
    daemon has fewer capabilities than that process (`ip netns` names need no more)."""
    paths = list(paths)
    need = {}
    if paths:
        need[CAP_SYS_ADMIN] = "enters the --netns namespaces"
    if any(os.path.abspath(p).startswith("/proc/") for p in paths):
        need[CAP_SYS_PTRACE] = "opens /proc/PID/ns/net of --netns"
    return need


def drop_after_attach(reads: Callable[[], None], account: Account | None, needs: dict[int, str]) -> str:
    """The smallest capability set with which reads still work, then the drop. Kernels from 6.5
    read maps through a held descriptor with no capability; older ones want CAP_BPF (or
    CAP_SYS_ADMIN before 5.8). needs: what the rest of the daemon keeps, and why.
    Returns a line for the log. Raises CredentialError when the user switch is refused,
    ReadsRefused when no smaller set reads the maps (nothing dropped then), and
    PrivilegeError when a step of the drop itself fails."""
    base = frozenset(needs)
    last = None
    for extra in (frozenset(), frozenset({CAP_BPF}), frozenset({CAP_SYS_ADMIN})):
        keep = base | extra
        last = try_reads(keep, account, reads)
        if isinstance(last, CredentialError):
            raise CredentialError(last.errno, f"{last.strerror} (switching users takes CAP_SETUID and "
                                  "CAP_SETGID, and a user namespace that allows setgroups)")
        if last is None:
            bounded = drop(keep, account)
            who = f"user {account.name} (uid {account.uid}, gid {account.gid})" if account else "uid 0"
            why = [f"{NAMES[c]} {reason}" for c, reason in sorted(needs.items())]
            if extra - base:
                why.append(f"{describe(extra)}: this kernel reads BPF maps only with it")
            if not bounded:
                why.append("bounding set kept: emptying it takes CAP_SETPCAP; no_new_privs is set")
            return f"privileges dropped: running as {who} with capabilities: {describe(keep)}" + (
                f" ({'; '.join(why)})" if why else "")
    raise ReadsRefused(last.errno or errno.EPERM, f"the maps cannot be read with fewer privileges ({last})")
