"""unit_sandbox.py: start a systemd unit's ExecStart under the unit's own sandboxing, applied as systemd applies it (mounts, capabilities, no_new_privs, seccomp filters), on hosts where systemd is not PID 1.

Usage, as root: unshare --mount --uts --propagation private -- python3 unit_sandbox.py UNIT_FILE
The environment is systemd's: PATH, NOTIFY_SOCKET (from ours), Environment= and EnvironmentFile=.
A directive this file neither applies nor lists in NOT_APPLIED stops it with exit 2, so a unit
cannot gain a setting the test never exercised.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import shlex
import subprocess
import sys
import tempfile

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Directives that shape only what systemd does around the process, or that this file does
# not reproduce, with the reason the test can do without them.
NOT_APPLIED = {
    "Type": "the test reads NOTIFY_SOCKET itself",
    "NotifyAccess": "only the main process exists",
    "Restart": "the test restarts nothing", "RestartSec": "the test restarts nothing",
    "ExecReload": "test_faults sends SIGHUP itself (make test-fresh reloads under the real systemd)",
    "TimeoutStartSec": "the test has its own deadline", "TimeoutStopSec": "the test has its own deadline",
    "LogsDirectory": "the test writes events to stdout", "LogsDirectoryMode": "as LogsDirectory",
    "RestrictRealtime": "the daemon sets no scheduling policy",
    "RestrictSUIDSGID": "the daemon creates no files",
    "LockPersonality": "the daemon never calls personality()",
    "ProtectClock": "its calls (@clock) are outside the SystemCallFilter= allow list anyway",
}
APPLIED = {
    "ExecStart", "Environment", "EnvironmentFile", "CapabilityBoundingSet", "AmbientCapabilities",
    "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
    "ProtectKernelLogs", "ProtectControlGroups", "ProtectHostname", "RestrictNamespaces", "MemoryDenyWriteExecute",
    "UMask", "RestrictAddressFamilies", "SystemCallArchitectures", "SystemCallFilter", "LimitMEMLOCK",
}
CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
        "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10,
        "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21,
        "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39}
FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}
CLONE_NEW = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000

_libc = ctypes.CDLL(None, use_errno=True)


def die(msg: str) -> None:
    print(f"unit_sandbox: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_service(path: str) -> dict[str, list[str]]:
    """[Service] assignments in order; an empty assignment resets the list, as in systemd."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in open(path):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]":
            continue
        key, _, value = line.partition("=")
        if value == "":
            out[key] = []
        else:
            out.setdefault(key, []).append(value)
    return out


def yes(unit: dict, key: str) -> bool:
    return unit.get(key, ["no"])[-1].lower() in ("yes", "true", "1", "on")


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return sorted(set(points), key=lambda p: p.count("/"))


def remount_ro(point: str) -> None:
    r = subprocess.run(["mount", "-o", "remount,bind,ro", point], capture_output=True, text=True)
    if r.returncode != 0:
        die(f"read-only remount of {point}: {r.stderr.strip()}")


def inaccessible(path: str, empty_file: str) -> None:
    if os.path.isdir(path):
        run("mount", "-t", "tmpfs", "-o", "mode=000,ro,nosuid,nodev,noexec", "tmpfs", path)
    elif os.path.exists(path):
        run("mount", "--bind", empty_file, path)


def read_only(path: str) -> None:
    """path and every mount below it read-only."""
    if not os.path.exists(path):
        return
    if path not in mountpoints():
        run("mount", "--bind", path, path)
    for point in mountpoints():
        if point == path or point.startswith(path + "/"):
            remount_ro(point)


def private_devices() -> None:
    """A /dev with only the pseudo devices, like systemd's PrivateDevices=."""
    stage = tempfile.mkdtemp(prefix="unit-sandbox-dev-")
    run("mount", "-t", "tmpfs", "-o", "mode=755,nosuid", "tmpfs", stage)
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        open(f"{stage}/{name}", "w").close()
        run("mount", "--bind", f"/dev/{name}", f"{stage}/{name}")
    for name in ("pts", "shm", "mqueue"):
        os.mkdir(f"{stage}/{name}")
    run("mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", f"{stage}/shm")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{stage}/{name}")
    run("mount", "--move", stage, "/dev")


def apply_mounts(unit: dict) -> None:
    fd, empty = tempfile.mkstemp(prefix="unit-sandbox-empty-")  # under /tmp, which PrivateTmp hides later
    os.close(fd)  # a file open for writing would keep its file system from going read-only
    os.chmod(empty, 0)
    if yes(unit, "PrivateDevices"):
        private_devices()
    if unit.get("ProtectSystem", ["strict"])[-1] != "strict":
        die(f"ProtectSystem={unit['ProtectSystem'][-1]} is not reproduced here")
    if "ProtectSystem" in unit:  # all read-only but the API file systems, which the options below handle
        for point in mountpoints():
            if not point.startswith(("/dev", "/proc", "/sys")):
                remount_ro(point)
    if yes(unit, "ProtectKernelTunables"):
        for path in ("/proc/sys", "/proc/sysrq-trigger", "/proc/latency_stats", "/proc/acpi", "/proc/timer_stats",
                     "/proc/fs", "/proc/irq", "/sys"):
            read_only(path)
    if yes(unit, "ProtectControlGroups"):
        read_only("/sys/fs/cgroup")
    if yes(unit, "ProtectKernelLogs"):
        inaccessible("/proc/kmsg", empty)
        inaccessible("/dev/kmsg", empty)
    if yes(unit, "ProtectHome"):
        for path in ("/home", "/root", "/run/user"):
            inaccessible(path, empty)
    if yes(unit, "PrivateTmp"):
        for path in ("/tmp", "/var/tmp"):
            run("mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", path)


def environment(unit: dict) -> dict:
    env = {"PATH": PATH}
    if "NOTIFY_SOCKET" in os.environ:
        env["NOTIFY_SOCKET"] = os.environ["NOTIFY_SOCKET"]
    for item in unit.get("Environment", []):
        for word in shlex.split(item):
            key, _, value = word.partition("=")
            env[key] = value
    for item in unit.get("EnvironmentFile", []):
        optional = item.startswith("-")
        path = item.lstrip("-")
        try:
            lines = open(path).read().splitlines()
        except FileNotFoundError:
            if optional:
                continue
            die(f"EnvironmentFile {path} missing")
        for line in lines:
            line = line.strip()
            if line and not line.startswith(("#", ";")):
                key, _, value = line.partition("=")
                env[key.strip()] = " ".join(shlex.split(value))
    return env


def syscall_group(name: str, seen: set) -> set[str]:
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], check=True, capture_output=True, text=True)
    calls = set()
    for line in out.stdout.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        calls |= syscall_group(word, seen) if word.startswith("@") else {word}
    return calls


def filters(unit: dict) -> list:
    """The seccomp filters systemd would install, each loaded as its own filter (the kernel
    applies the strictest verdict), built before the mounts hide systemd-analyze."""
    import seccomp

    out = []
    if yes(unit, "MemoryDenyWriteExecute"):
        f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        eperm = seccomp.ERRNO(errno.EPERM)
        f.add_rule(eperm, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC))
        f.add_rule(eperm, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.add_rule(eperm, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.add_rule(eperm, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
        out.append(f)
    if unit.get("RestrictAddressFamilies"):
        allowed = set()
        for item in unit["RestrictAddressFamilies"]:
            if item.startswith("~"):
                die("deny-list RestrictAddressFamilies= is not reproduced here")
            allowed |= {FAMILIES[w] for w in item.split()}
        f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        for family in range(64):
            if family not in allowed:
                f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, family))
        f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.GE, 64))
        out.append(f)
    if unit.get("RestrictNamespaces"):
        if unit["RestrictNamespaces"][-1] != "yes":
            die("RestrictNamespaces= other than yes is not reproduced here")
        f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        eperm = seccomp.ERRNO(errno.EPERM)
        f.add_rule(eperm, "setns")
        f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # systemd's way: glibc falls back to clone
        for flag in CLONE_NEW:
            f.add_rule(eperm, "unshare", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
            f.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        out.append(f)
    if unit.get("SystemCallArchitectures", ["native"])[-1] != "native":
        die("SystemCallArchitectures= other than native is not reproduced here")
    allow: set[str] = set()
    for item in unit.get("SystemCallFilter", []):
        if item.startswith("~"):
            die("deny-list SystemCallFilter= is not reproduced here")
        for word in item.split():
            allow |= syscall_group(word, set()) if word.startswith("@") else {word}
    if allow:
        f = seccomp.SyscallFilter(defaction=seccomp.KILL_PROCESS)
        for name in sorted(allow):
            try:
                f.add_rule(seccomp.ALLOW, name)
            except (RuntimeError, ValueError):  # a call this architecture lacks
                pass
        out.append(f)  # last: once loaded, it forbids loading more filters
    # libseccomp filters admit the native architecture only: SystemCallArchitectures=native.
    return out


def drop_capabilities(unit: dict) -> None:
    if unit.get("AmbientCapabilities"):
        die("AmbientCapabilities= is not reproduced here")
    if "CapabilityBoundingSet" in unit:
        keep = {CAPS[w] for item in unit["CapabilityBoundingSet"] for w in item.split()}
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
        for cap in range(last + 1):
            if cap not in keep and _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                die(f"PR_CAPBSET_DROP {cap}: {os.strerror(ctypes.get_errno())}")
    if yes(unit, "NoNewPrivileges") and _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        die(f"PR_SET_NO_NEW_PRIVS: {os.strerror(ctypes.get_errno())}")


def main() -> None:
    # ProtectHostname=: the caller's `unshare --uts` gives the process its own hostname namespace.
    if len(sys.argv) != 2:
        die("usage: unit_sandbox.py UNIT_FILE (as root, inside unshare --mount --uts)")
    unit = parse_service(sys.argv[1])
    unknown = sorted(set(unit) - APPLIED - set(NOT_APPLIED))
    if unknown:
        die(f"the unit sets {', '.join(unknown)}, which this sandbox neither applies nor waives")
    argv = shlex.split(unit["ExecStart"][-1])
    if argv[0][0] in "-@+!:":
        die(f"ExecStart prefix {argv[0][0]!r} is not reproduced here")
    env = environment(unit)
    seccomp_filters = filters(unit)
    apply_mounts(unit)
    if "UMask" in unit:
        os.umask(int(unit["UMask"][-1], 8))
    if "LimitMEMLOCK" in unit:
        value = unit["LimitMEMLOCK"][-1]
        if value != "infinity":
            die(f"LimitMEMLOCK={value} is not reproduced here")
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        except ValueError:  # this host withholds CAP_SYS_RESOURCE: the daemon runs under a lower limit
            print("unit_sandbox: LimitMEMLOCK=infinity not applied (no CAP_SYS_RESOURCE here); the lower "
                  "limit is stricter than the unit's", file=sys.stderr)
    os.chdir("/")
    drop_capabilities(unit)
    for f in seccomp_filters:
        f.load()
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    main()
