#!/usr/bin/env python3
"""run.py: make test-fresh: a fresh Debian 12 booted under QEMU with systemd as PID 1 runs a new user's steps; a timed report.

The image comes from build-image.sh (cached outside the repository by recipe). Each run boots a
throw-away copy of it (a qcow2 overlay), with a second disk that carries this checkout's HEAD as
a git bundle and tests/fresh/guest.sh; the guest runs the steps at boot, writes its results to
that disk and powers off. Its progress comes over the serial console; the results are read back
from the disk with debugfs. Exit 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# The guest's steps, in order, and what each proves (guest.sh runs them; the report names them).
STEPS = {
    "facts": "the fresh machine: kernel, systemd, package count, disk used",
    "clone": "newuser clones the checkout (a git bundle of HEAD)",
    "make-run": "`sudo make run` from nothing until /-/ready is 200",
    "count-run": "20 real connections counted exactly (active and passive opens)",
    "sigterm": "SIGTERM: the daemon and `sudo make run` exit 0 within 2 s",
    "owned": "everything sudo made in the clone belongs to newuser",
    "footprint-run": "packages and disk after make run; no service enabled or running",
    "make-test": "`sudo make test` sets up the test tools and passes the unit tests and a kernel test",
    "footprint-test": "packages and disk after make test; no service enabled or running (prometheus)",
    "owned-test": "still everything in the clone belongs to newuser",
    "make-install": "`sudo make install`: the unit enabled and started under systemd",
    "unit-checks": "tests/fresh/unit_checks.py: the unit under the real systemd",
    "git-clean": "newuser's own `git clean -fdx` leaves nothing behind",
}
# --unit: make install from nothing and the unit under systemd only (a shorter run).
UNIT_STEPS = {k: STEPS[k] for k in ("facts", "clone", "make-install")}
UNIT_STEPS["unit-deps"] = "the checks' own tools from Debian: bpftool, python3-pytest"
UNIT_STEPS.update({k: STEPS[k] for k in ("unit-checks", "git-clean")})
# The unit tests and one kernel test (a daemon-less attach, 20 connections counted exactly).
DEFAULT_TESTS = "tests/unit tests/kernel/test_counts.py::test_client_closes_first"


def default_cache() -> Path:
    env = os.environ.get("TCPSTATE_FRESH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "tcpstate", "fresh")


def say(msg: str) -> None:
    print(f"test-fresh: {msg}", file=sys.stderr, flush=True)


def build_image(cache: Path) -> tuple[Path, float]:
    t0 = time.monotonic()
    done = subprocess.run(["bash", str(HERE / "build-image.sh"), str(cache)], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"build-image.sh exited {done.returncode}")
    return Path(done.stdout.strip().splitlines()[-1]), time.monotonic() - t0


def make_io_disk(work: Path, tests: str, connections: int, profile: str) -> Path:
    """The second disk: the checkout's HEAD as a bundle, guest.sh as /run, its settings."""
    io = work / "io"
    shutil.rmtree(io, ignore_errors=True)
    io.mkdir(parents=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout
    if dirty:
        say("the work tree has uncommitted changes: the guest tests the last commit (HEAD), without them")
    subprocess.run(["git", "-C", str(REPO), "bundle", "create", "-q", str(io / "tcpstate.bundle"), "HEAD"], check=True)
    shutil.copy(HERE / "guest.sh", io / "run")
    (io / "run").chmod(0o755)
    (io / "env").write_text(f"TESTS='{tests}'\nN={connections}\nPROFILE={profile}\n")
    disk = work / "io.img"
    disk.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-L", "fresh-io", "-d", str(io), str(disk), "2G"], check=True,
                   stdout=subprocess.DEVNULL)
    return disk


def boot(image: Path, io_disk: Path, work: Path, cpus: int, memory: str, timeout: float) -> dict:
    overlay = work / "root.qcow2"
    overlay.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image / "root.img"),
                    str(overlay)], check=True)
    console = work / "console.log"
    console.write_bytes(b"")
    # TCG: this host's /dev/kvm cannot boot stock Debian kernels (README, "Tests").
    cmd = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-machine", "q35", "-cpu", "max",
           "-smp", str(cpus), "-m", memory, "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
           "-append", "root=/dev/vda ro console=ttyS0 quiet",
           "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
           "-drive", f"file={io_disk},if=virtio,format=raw",
           "-nic", "user,model=virtio-net-pci", "-display", "none", "-vga", "none", "-monitor", "none",
           "-serial", f"file:{console}", "-no-reboot"]
    t0 = time.monotonic()
    times: dict = {"booted": None, "finished": None}
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(work / "qemu.log", "wb"))
    say(f"booting {image.name} under QEMU (TCG, {cpus} vCPUs, {memory}; console: {console}), pid {qemu.pid}")
    seen = 0
    try:
        while qemu.poll() is None:
            if time.monotonic() - t0 > timeout:
                say(f"no result after {timeout:.0f} s: stopping QEMU (pid {qemu.pid})")
                qemu.terminate()
                qemu.wait(30)
                break
            text = console.read_bytes().decode(errors="replace")
            lines = text.splitlines()
            for line in lines[seen:len(lines) - (0 if text.endswith("\n") else 1)]:
                seen += 1
                if "fresh: " in line:
                    msg = line[line.index("fresh: ") + 7:]
                    if msg.startswith("guest started") and times["booted"] is None:
                        times["booted"] = time.monotonic() - t0
                    say(f"[{time.monotonic() - t0:6.0f} s] guest: {msg}")
            time.sleep(1)
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    times["finished"] = time.monotonic() - t0
    return times


def read_results(io_disk: Path, work: Path) -> Path:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    # rdump writes out/ itself into the target directory.
    subprocess.run(["debugfs", "-R", f"rdump /out {work}", str(io_disk)], check=True, capture_output=True)
    return out


def junit_cases(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        return []
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        verdict = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                verdict = tag
        cases.append((case.get("name"), verdict))
    return cases


def report(out: Path, image_seconds: float | None, image: Path, times: dict, wall: float,
           expected: dict = STEPS) -> tuple[str, bool]:
    steps = []
    if (out / "steps").is_file():
        for line in (out / "steps").read_text().splitlines():
            name, status, seconds = line.split("\t")
            steps.append((name, int(status), float(seconds)))
    facts: dict[str, str] = {}
    if (out / "facts").is_file():
        for line in (out / "facts").read_text().splitlines():
            key, _, value = line.partition(" ")
            facts[key] = value
    status = (out / "status").read_text().strip() if (out / "status").is_file() else None
    ran = [s[0] for s in steps]
    ok = status == "0" and ran == list(expected) and all(s[1] == 0 for s in steps)

    rows = ["| step | what it proves | result | seconds |", "|---|---|---|---:|"]
    build = f"{image_seconds:.0f}" if image_seconds is not None and image_seconds > 5 else "cached"
    rows.append(f"| image | mmdebstrap bookworm + the kernel, {image.name} | ok | {build} |")
    boot = "-" if times["booted"] is None else f"{times['booted']:.0f}"
    rows.append(f"| boot | QEMU start to the guest's first step (systemd, network up) | "
                f"{'ok' if times['booted'] is not None else 'FAIL'} | {boot} |")
    for name, what in expected.items():
        found = [s for s in steps if s[0] == name]
        if found:
            rows.append(f"| {name} | {what} | {'ok' if found[0][1] == 0 else 'FAIL'} | {found[0][2]:.0f} |")
        else:
            rows.append(f"| {name} | {what} | not run | - |")
    for case, verdict in junit_cases(out / "unit-checks.xml"):
        rows.append(f"| ↳ {case} | | {verdict} | |")
    lines = rows + ["", f"total {wall:.0f} s (guest {times['finished']:.0f} s)"]
    keys = ("kernel", "systemd_version", "packages_fresh", "disk_mb_fresh", "make_run_setup_seconds",
            "make_run_ready_seconds", "make_run_sigterm_seconds", "packages_run", "disk_mb_run",
            "make_test_setup_seconds", "packages_test", "disk_mb_test", "unit_start_seconds", "restart_seconds",
            "stop_seconds", "systemd", "exposure", "reload_refused")
    lines += [f"{k}: {facts[k]}" for k in keys if k in facts]
    if not ok:
        failed = next((s[0] for s in steps if s[1] != 0), None)
        lines.append(f"FAILED at step {failed}" if failed else f"guest status {status}: incomplete run")
        if failed and (out / f"{failed}.log").is_file():
            lines.append(f"--- last lines of {out / (failed + '.log')}:")
            lines += (out / f"{failed}.log").read_text(errors="replace").splitlines()[-40:]
    return "\n".join(lines), ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Boot a fresh Debian 12 under QEMU and run a new user's steps in it.",
                                 epilog="Example: sudo make test-fresh FRESH_ARGS='--timeout 3600'")
    ap.add_argument("--cache", type=Path, default=default_cache(),
                    help="Where images are kept (default: %(default)s; $TCPSTATE_FRESH_CACHE).")
    ap.add_argument("--out", type=Path, default=Path("/tmp/tcpstate-fresh"),
                    help="The run's files: console.log, the disks, out/ with each step's log (default: %(default)s).")
    ap.add_argument("--tests", default=DEFAULT_TESTS, help="What `make test` runs in the guest (default: %(default)s).")
    ap.add_argument("--connections", type=int, default=20, help="Connections made and counted (default: %(default)s).")
    ap.add_argument("--unit", action="store_true", help="Only make install from nothing and the unit under systemd "
                    "(skips make run and make test; the checks' tools come from Debian).")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--memory", default="4G")
    ap.add_argument("--timeout", type=float, default=5400, help="Seconds before the guest is stopped (default: %(default)s).")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("test-fresh: must run as root (sudo make test-fresh): mmdebstrap and the image need it", file=sys.stderr)
        return 2
    for tool in ("mmdebstrap", "qemu-system-x86_64", "qemu-img", "mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None:
            print(f"test-fresh: {tool} is missing (sudo make setup-test installs it)", file=sys.stderr)
            return 1
    # A SIGTERM (a CI timeout) unwinds like Ctrl-C: boot()'s finally stops QEMU.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    try:
        image, image_seconds = build_image(args.cache)
    except RuntimeError as exc:
        print(f"test-fresh: cannot build the image: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    io_disk = make_io_disk(args.out, args.tests, args.connections, "unit" if args.unit else "full")
    times = boot(image, io_disk, args.out, args.cpus, args.memory, args.timeout)
    out = read_results(io_disk, args.out)
    text, ok = report(out, image_seconds, image, times, time.monotonic() - t0, UNIT_STEPS if args.unit else STEPS)
    print(text)
    (args.out / "report.md").write_text(text + "\n")
    if ok:  # the booted copy: gigabytes; kept after a failure, for a look inside
        (args.out / "root.qcow2").unlink(missing_ok=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
