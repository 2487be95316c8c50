#!/usr/bin/env python3
"""kernels.py: boot Debian's kernels under QEMU (virtme-ng, TCG) and run the kernel test suite inside each.

make test-kernels runs it. Per kernel of MATRIX it resolves the suite's linux-image-amd64 with a
private apt state (the host's /etc/apt is never touched), downloads the image and header packages,
unpacks them with dpkg-deb into a cache outside the repository, then boots the image with the
host's root filesystem shared read-only and runs tests/vm/guest.sh there. A kernel already in the
cache is used as it is: a second run fetches nothing (--refresh looks for newer ones).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class Kernel:
    name: str  # what --kernel and the report call it
    suite: str  # the Debian suite whose linux-image-amd64 is booted
    archive: str


MATRIX = (
    Kernel("5.10", "bullseye-security", "http://deb.debian.org/debian-security"),
    Kernel("6.1", "bookworm-security", "http://deb.debian.org/debian-security"),
    Kernel("6.12", "trixie", "http://deb.debian.org/debian"),
)


def default_cache() -> Path:
    """Outside the repository, and somewhere the guest sees: virtme-ng puts tmpfs over /var/tmp
    and /var/cache, so the unpacked headers there would not resolve inside the guest."""
    env = os.environ.get("TCPSTATE_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "tcpstate", "kernels")


def say(msg: str) -> None:
    print(f"test-kernels: {msg}", file=sys.stderr, flush=True)


class Apt:
    """apt-get and apt-cache over one suite, with state and downloads under the cache."""

    def __init__(self, cache: Path, kernel: Kernel):
        self.root = cache / "apt" / kernel.suite
        self.kernel = kernel

    def _opts(self) -> list[str]:
        r = self.root
        return [f"-o=Dir::Etc::SourceList={r}/sources.list", "-o=Dir::Etc::SourceParts=/dev/null",
                f"-o=Dir::State::Lists={r}/lists", f"-o=Dir::Cache={r}/cache", "-o=Dir::State::status=/dev/null",
                "-o=Debug::NoLocking=1", "-o=APT::Sandbox::User=root"]

    def update(self) -> None:
        for d in ("lists/partial", "cache/archives/partial"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "sources.list").write_text(
            f"deb [signed-by={KEYRING}] {self.kernel.archive} {self.kernel.suite} main\n")
        subprocess.run(["apt-get", *self._opts(), "-q", "update"], check=True, stdout=subprocess.DEVNULL)

    def depends(self, package: str) -> list[str]:
        """The package names in the newest version's Depends (alternatives: the first)."""
        out = subprocess.run(["apt-cache", *self._opts(), "show", package], check=True, capture_output=True,
                             text=True).stdout
        stanza = out.split("\n\n")[0]
        for line in stanza.splitlines():
            if line.startswith("Depends:"):
                return [alt.split("|")[0].split("(")[0].strip() for alt in line[len("Depends:"):].split(",")]
        return []

    def download(self, packages: list[str], into: Path) -> list[Path]:
        into.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", *self._opts(), "-q", "download", *packages], check=True, cwd=into,
                       stdout=subprocess.DEVNULL)
        debs = []
        for p in packages:
            found = sorted(into.glob(f"{p}_*.deb"))
            if not found:
                raise RuntimeError(f"apt-get download left no {p}_*.deb in {into}")
            debs.append(found[-1])
        return debs


def resolve(apt: Apt) -> tuple[str, list[str]]:
    """(kernel release, packages to unpack): the image that linux-image-amd64 depends on, its headers
    and the headers' -common half (bcc needs both: lib/modules/KVER/build and source)."""
    (image,) = [d for d in apt.depends("linux-image-amd64") if d.startswith("linux-image-")]
    kver = image[len("linux-image-"):]
    headers = f"linux-headers-{kver}"
    common = [d for d in apt.depends(headers) if d.startswith("linux-headers-") and d.endswith("-common")]
    return kver, [image, headers, *common]


def unpack(debs: list[Path], kver: str, dest: Path) -> None:
    """dpkg-deb -x into dest; the build/source links made relative (they point at /usr/src, which
    is the host's, not ours); .ko.xz/.ko.zst decompressed (virtme-ng's initramfs loads plain .ko
    only) and modules.dep rebuilt."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    # trixie's packages install to /usr/lib/modules (merged /usr), older ones to /lib/modules.
    moddir = next(d for d in (tmp / "lib" / "modules" / kver, tmp / "usr" / "lib" / "modules" / kver) if d.is_dir())
    src = sorted(p.name for p in (tmp / "usr" / "src").iterdir())
    common = [s for s in src if s.endswith("-common")]
    for link, target in (("build", f"linux-headers-{kver}"), ("source", common[0] if common else None)):
        if target is None:
            raise RuntimeError(f"no linux-headers-*-common unpacked for {kver}")
        path = moddir / link
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(os.path.relpath(tmp / "usr" / "src" / target, moddir))
    for unzip, suffix in ((["xz", "-d", "-q"], ".ko.xz"), (["zstd", "-d", "-q", "--rm"], ".ko.zst")):
        packed = [str(p) for p in moddir.rglob(f"*{suffix}")]
        for i in range(0, len(packed), 500):
            subprocess.run([*unzip, *packed[i:i + 500]], check=True)
    subprocess.run(["depmod", "-a", "-b", str(moddir.parents[2]), kver], check=True)
    if not (tmp / "boot" / f"vmlinuz-{kver}").is_file():
        raise RuntimeError(f"no boot/vmlinuz-{kver} in the image package")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def fetch(cache: Path, kernel: Kernel, refresh: bool) -> Path:
    """The unpacked tree of this matrix entry's kernel (cache/KVER), fetched if not there yet."""
    pointer = cache / f"{kernel.name}.release"
    if not refresh and pointer.is_file():
        tree = cache / pointer.read_text().strip()
        if (tree / ".complete").is_file():
            return tree
    apt = Apt(cache, kernel)
    say(f"{kernel.name}: resolving linux-image-amd64 in {kernel.suite}")
    apt.update()
    kver, packages = resolve(apt)
    tree = cache / kver
    if not (tree / ".complete").is_file():
        say(f"{kernel.name}: fetching {', '.join(packages)}")
        debs = apt.download(packages, cache / "debs")
        unpack(debs, kver, tree)
        (tree / ".complete").write_text(" ".join(d.name for d in debs) + "\n")
        for deb in debs:  # the unpacked tree is what is kept
            deb.unlink()
    pointer.write_text(kver + "\n")
    return tree


@dataclass
class Result:
    kernel: Kernel
    release: str = ""
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: int = 0
    boot_seconds: float | None = None
    compile_seconds: float | None = None
    wall_seconds: float = 0.0
    status: int | None = None  # the guest script's exit status; None: it never reported one
    failures: list[str] = field(default_factory=list)
    # The end of each failure's traceback: the output directory is overwritten by the next run,
    # so the report (CI's log) has to carry what failed and why.
    tracebacks: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 0 and self.failed == 0 and self.errors == 0 and self.passed > 0


def read_junit(path: Path, result: Result) -> None:
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        failure, error = case.find("failure"), case.find("error")
        if failure is not None:
            result.failed += 1
            result.failures.append(name)
            result.tracebacks[name] = failure.text or failure.get("message", "")
        elif error is not None:
            result.errors += 1
            result.failures.append(name)
            result.tracebacks[name] = error.text or error.get("message", "")
        elif case.find("skipped") is not None:
            result.skipped += 1
            result.failures.append(name + " (skipped)")
        else:
            result.passed += 1


def boot(kernel: Kernel, tree: Path, out: Path, pytest_args: list[str], cpus: int, memory: str,
         timeout: float, append: tuple[str, ...] = ()) -> Result:
    kver = tree.name
    result = Result(kernel, release=kver)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    vng = Path(sys.executable).parent / "vng"
    env = dict(os.environ, PATH=f"{vng.parent}:{os.environ.get('PATH', '')}")
    # The second 9p export of / ("fastroot") is mounted with caching by guest.sh.
    fastroot = ("-fsdev local,id=fastroot,path=/,security_model=none,readonly=on,multidevs=remap "
                "-device virtio-9p-pci,fsdev=fastroot,mount_tag=fastroot")
    cmd = [str(vng), "--run", str(tree / "boot" / f"vmlinuz-{kver}"), "--disable-kvm", "--force-9p",
           *(a for opt in append for a in ("--append", opt)),
           "--cpus", str(cpus), "--memory", memory, "--rwdir", str(out), "--cwd", str(REPO),
           f"--qemu-opts={fastroot}",
           "--exec", shlex.join(["/bin/bash", str(REPO / "tests" / "vm" / "guest.sh"), str(out), str(tree),
                                 *pytest_args])]
    say(f"{kernel.name}: booting {kver} (TCG, {cpus} vCPUs, {memory})")
    t0 = time.monotonic()
    (out / "host-start").write_text(f"{time.time()}\n")
    with open(out / "console.log", "wb") as console:
        # vng exits 255 when the guest lacks udev even if the run passed: the status comes back
        # through the shared directory instead. Its own session, so that a timeout stops QEMU
        # too (vng does not pass the signal on).
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO, start_new_session=True)
        RUNNING.add(proc.pid)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            say(f"{kernel.name}: no result after {timeout:.0f} s, stopped")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            RUNNING.discard(proc.pid)
    result.wall_seconds = time.monotonic() - t0
    status = out / "status"
    if status.is_file():
        result.status = int(status.read_text().split()[0])
    times = {}
    if (out / "times").is_file():
        for line in (out / "times").read_text().splitlines():
            key, _, value = line.partition(" ")
            times[key] = float(value)
    if "booted" in times:
        result.boot_seconds = times["booted"] - float((out / "host-start").read_text())
    if "check_end" in times:
        result.compile_seconds = times["check_end"] - times["check_start"]
    if (out / "junit.xml").is_file():
        read_junit(out / "junit.xml", result)
    return result



FIXTURES = REPO / "tests" / "unit" / "data" / "kernels"
# The tracepoints tcpstate reads, or could (guest.sh copies all of sock/ and tcp/ and skb/kfree_skb).
FIXTURE_TRACEPOINTS = ("sock/inet_sock_set_state", "sock/inet_sk_error_report", "tcp/tcp_send_reset",
                       "tcp/tcp_receive_reset", "tcp/tcp_destroy_sock", "tcp/tcp_retransmit_skb",
                       "tcp/tcp_retransmit_synack", "skb/kfree_skb")


def save_formats(src: Path, dest: Path) -> int:
    """Replace dest's *.format files with src's fixture tracepoints (the unit tests' data for one kernel)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.format"):
        old.unlink()
    n = 0
    for tp in FIXTURE_TRACEPOINTS:
        f = src / f"{tp.split('/')[1]}.format"
        if f.is_file():
            shutil.copyfile(f, dest / f.name)
            n += 1
    return n


def host_formats(into: Path) -> Path:
    """The running kernel's formats, collected as guest.sh does."""
    into.mkdir(parents=True, exist_ok=True)
    for tp in FIXTURE_TRACEPOINTS:
        f = Path("/sys/kernel/tracing/events", tp, "format")
        if f.is_file():
            shutil.copyfile(f, into / f"{f.parent.name}.format")
    return into


TRACEBACK_LINES = 25


def report(results: list[Result], out_root: Path) -> str:
    rows = ["| kernel | release | passed | failed | skipped | boot s | compile s | wall s | result |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        verdict = "ok" if r.ok else ("no result" if r.status is None else "FAIL")
        rows.append(f"| {r.kernel.name} | {r.release} | {r.passed} | {r.failed + r.errors} | {r.skipped} | "
                    f"{fmt(r.boot_seconds)} | {fmt(r.compile_seconds)} | {r.wall_seconds:.0f} | {verdict} |")
    lines = rows[:]
    for r in results:
        for f in r.failures:
            lines.append(f"{r.kernel.name}: {f}")
            tail = r.tracebacks.get(f, "").rstrip().splitlines()[-TRACEBACK_LINES:]
            lines.extend(f"    {t}" for t in tail)
        if not r.ok:
            lines.append(f"{r.kernel.name}: guest output in {out_root / r.kernel.name}/ (pytest.log, console.log)")
    return "\n".join(lines)


RUNNING: set[int] = set()  # the sessions of the guests running now


def stop_guests(signum, _frame) -> None:
    """SIGTERM or Ctrl-C: the guests run in sessions of their own, out of the signal's reach."""
    for session in list(RUNNING):
        try:
            os.killpg(session, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Boot each kernel of the matrix under QEMU and run tests/kernel inside it.",
        epilog="Extra arguments after -- go to pytest in every guest, e.g. -- -k counts -x. "
               "Example: sudo make test-kernels KERNELS='6.1 5.10'")
    ap.add_argument("--kernel", action="append", choices=[k.name for k in MATRIX],
                    help="Only this kernel of the matrix (repeatable; default: all).")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="Where kernels are kept (default: %(default)s; "
                    "$TCPSTATE_KERNEL_CACHE).")
    ap.add_argument("--out", type=Path, default=Path("/tmp/tcpstate-kernels"),
                    help="Per-kernel results: junit.xml, pytest.log, console.log (default: %(default)s).")
    ap.add_argument("--refresh", action="store_true", help="Look for newer kernels in the archive.")
    ap.add_argument("--fetch-only", action="store_true", help="Fetch and unpack; boot nothing.")
    ap.add_argument("--save-formats", action="store_true",
                    help=f"Copy each guest's tracepoint formats, and the running kernel's, into {FIXTURES.relative_to(REPO)}/.")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--memory", default="3G")
    ap.add_argument("--timeout", type=float, default=2400, help="Seconds per kernel before the guest is stopped.")
    # One guest keeps about one host CPU busy (the tests and bcc's compiles are mostly one thread):
    # two at once use a 2-CPU host whole. Timing bounds in the guests already allow for it
    # (TCPSTATE_TEST_SLOWDOWN).
    ap.add_argument("--jobs", type=int, default=2, help="Guests booted at once (default: %(default)s).")
    ap.add_argument("--append", action="append", default=None,
                    help="A kernel boot option for the guests (repeatable). mitigations=off measured no faster: "
                         "5.10's check took 101 s with it, 118-129 s without on a busier host.")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, stop_guests)
    signal.signal(signal.SIGINT, stop_guests)
    if os.geteuid() != 0:
        print("test-kernels: must run as root (sudo make test-kernels): the guests run the kernel tests as root",
              file=sys.stderr)
        return 2
    chosen = [k for k in MATRIX if not args.kernel or k.name in args.kernel]
    trees = {}
    for k in chosen:
        try:
            trees[k.name] = fetch(args.cache, k, args.refresh)
        except subprocess.CalledProcessError as exc:
            print(f"test-kernels: {k.name}: cannot fetch the kernel from {k.suite}: {exc.cmd[0]} exited "
                  f"{exc.returncode}", file=sys.stderr)
            return 1
        except (RuntimeError, ValueError, OSError) as exc:
            print(f"test-kernels: {k.name}: cannot fetch the kernel from {k.suite}: {exc}", file=sys.stderr)
            return 1
    if args.fetch_only:
        for k in chosen:
            print(f"{k.name}: {trees[k.name]}")
        return 0
    def run(k: Kernel) -> Result:
        r = boot(k, trees[k.name], args.out / k.name, args.pytest_args, args.cpus, args.memory, args.timeout,
                 tuple(args.append or ()))
        say(f"{k.name}: {r.passed} passed, {r.failed + r.errors} failed, {r.skipped} skipped in {r.wall_seconds:.0f} s")
        return r

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run, chosen))  # in the matrix's order, whichever ends first
    say(f"all kernels in {time.monotonic() - t0:.0f} s, {max(1, args.jobs)} at a time")
    for k in chosen:
        if args.save_formats:
            n = save_formats(args.out / k.name / "formats", FIXTURES / k.name)
            say(f"{k.name}: {n} formats saved in {FIXTURES / k.name}")
    if args.save_formats:
        release = os.uname().release
        host = ".".join(release.split(".")[:2])
        n = save_formats(host_formats(args.out / "host-formats"), FIXTURES / host)
        say(f"{host} (this host, {release}): {n} formats saved in {FIXTURES / host}")
    text = report(results, args.out)
    print(text)
    (args.out / "report.md").write_text(text + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
