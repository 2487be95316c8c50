"""make test-fresh's harness and the host setup, without a machine: the runner's verdict, the step lists, the scripts' lint."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FRESH = ROOT / "tests" / "fresh"
SETUP = ROOT / "deploy" / "setup-host.sh"

sys.path.insert(0, str(FRESH))
import run  # noqa: E402


def guest_steps() -> list[str]:
    return re.findall(r"^ *step (\S+) ", (FRESH / "guest.sh").read_text(), re.M)


def test_the_runner_knows_every_step_the_guest_runs_in_order():
    """guest.sh runs the --unit profile's steps first (and finishes), then the full run's."""
    steps = guest_steps()
    assert steps[:len(run.UNIT_STEPS)] == list(run.UNIT_STEPS)
    assert steps[:2] + steps[len(run.UNIT_STEPS):] == list(run.STEPS)


def write_out(out: Path, steps, status="0", facts=""):
    out.mkdir()
    (out / "steps").write_text("".join(f"{name}\t{code}\t{secs}\n" for name, code, secs in steps))
    if status is not None:
        (out / "status").write_text(status + "\n")
    (out / "facts").write_text(facts)


TIMES = {"booted": 21.0, "finished": 900.0}


def test_report_passes_only_a_complete_run(tmp_path):
    write_out(tmp_path / "out", [(s, 0, 1.5) for s in run.STEPS], facts="exposure 2.8\nsystemd systemd 252\n")
    text, ok = run.report(tmp_path / "out", 70.0, tmp_path, TIMES, 1000.0)
    assert ok
    assert "| make-run | `sudo make run` from nothing until /-/ready is 200 | ok | 2 |" in text
    assert "| image |" in text and "| 70 |" in text
    assert "exposure: 2.8" in text and "total 1000 s" in text


def test_report_fails_a_failed_step_and_shows_its_log(tmp_path):
    steps = [(s, 0, 1.0) for s in run.STEPS][:3]
    steps[2] = (steps[2][0], 2, 400.0)
    write_out(tmp_path / "out", steps, status="1")
    (tmp_path / "out" / "make-run.log").write_text("fatal error: errno.h: No such file or directory\n")
    text, ok = run.report(tmp_path / "out", None, tmp_path, TIMES, 500.0)
    assert not ok
    assert "| make-run | `sudo make run` from nothing until /-/ready is 200 | FAIL | 400 |" in text
    assert "| git-clean | newuser's own `git clean -fdx` leaves nothing behind | not run | - |" in text
    assert "FAILED at step make-run" in text and "errno.h" in text


def test_report_fails_a_run_that_stopped_without_a_status(tmp_path):
    """A guest stopped by the timeout, or one that powered off early: every step so far passed."""
    write_out(tmp_path / "out", [(s, 0, 1.0) for s in list(run.STEPS)[:5]], status=None)
    text, ok = run.report(tmp_path / "out", None, tmp_path, {"booted": None, "finished": 2700.0}, 2700.0)
    assert not ok and "incomplete run" in text and "| boot |" in text and "| FAIL | - |" in text


def test_report_fails_when_a_step_is_missing_even_with_status_0(tmp_path):
    write_out(tmp_path / "out", [(s, 0, 1.0) for s in run.STEPS if s != "unit-checks"])
    assert not run.report(tmp_path / "out", None, tmp_path, TIMES, 1.0)[1]


def test_junit_cases_of_the_unit_checks(tmp_path):
    (tmp_path / "u.xml").write_text(
        '<testsuites><testsuite><testcase classname="unit_checks" name="test_a"/>'
        '<testcase classname="unit_checks" name="test_b"><failure message="x"/></testcase></testsuite></testsuites>')
    assert run.junit_cases(tmp_path / "u.xml") == [("test_a", "passed"), ("test_b", "failure")]


def package_list(name: str) -> set[str]:
    m = re.search(rf"^{name}=\(([^)]*)\)", SETUP.read_text(), re.M)
    assert m, f"setup-host.sh has no {name}=(...) list"
    return set(m.group(1).split())


def test_the_daemon_set_has_what_a_fresh_machine_lacks_and_no_test_tool():
    daemon = package_list("runtime") | package_list("compiler")
    assert daemon == {"python3-bpfcc", "python3-venv", "gcc", "libc6-dev"}
    assert not daemon & (package_list("testing") | package_list("machines"))


def test_the_test_sets_keep_every_tool_the_tests_use():
    assert package_list("testing") == {"python3-pip", "iproute2", "prometheus", "curl", "nftables", "python3-seccomp",
                                       "bpftool", "bpfcc-tools", "shellcheck", "chromium", "tcpdump", "tshark"}
    assert "packages+=(kubernetes-client)" in SETUP.read_text()
    # QEMU's tools stay out of make test: busybox-static has the initramfs rebuilt, minutes under emulation
    assert package_list("machines") == {"qemu-system-x86", "busybox-static", "kmod", "xz-utils", "zstd", "mmdebstrap",
                                        "qemu-utils", "e2fsprogs"}


def test_setup_host_refuses_an_unknown_argument_in_one_line():
    done = subprocess.run(["bash", str(SETUP), "--tests"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "setup-host: unknown argument '--tests' (usage: setup-host.sh [--test] [--vm])\n"


def test_count_refuses_bad_arguments_in_one_line():
    done = subprocess.run([sys.executable, str(FRESH / "count.py"), "http://127.0.0.1:1", "many"],
                          capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, "usage: count.py URL N\n")
