"""make test-kernels' report, without a machine: a guest's junit.xml read into the verdict CI's log shows."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "vm"))
import kernels  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4">
<testcase classname="tests.kernel.test_counts" name="test_client_closes_first" time="1.0"/>
<testcase classname="tests.kernel.test_counts" name="test_connect_timeouts" time="3.0">
<failure message="AssertionError: assert {'other': 5} == {'timeout': 5}">{body}</failure></testcase>
<testcase classname="tests.kernel.test_reuse" name="test_setup_fails" time="0.1">
<error message="fixture failed">netns: RTNETLINK answers: File exists</error></testcase>
<testcase classname="tests.kernel.test_btf" name="test_offsets" time="0.1">
<skipped message="no BTF"/></testcase>
</testsuite></testsuites>
"""


def test_a_failure_keeps_the_end_of_its_traceback_in_the_report(tmp_path):
    body = "\n".join(f"line {i}" for i in range(100)) + "\nE   AssertionError: assert {'other': 5} == {'timeout': 5}"
    (tmp_path / "junit.xml").write_text(JUNIT.replace("{body}", body))
    result = kernels.Result(kernels.MATRIX[1], release="6.1.0-57-amd64", status=1)
    kernels.read_junit(tmp_path / "junit.xml", result)
    assert (result.passed, result.failed, result.errors, result.skipped) == (1, 1, 1, 1)

    text = kernels.report([result], Path("/tmp/out")).splitlines()
    at = text.index("6.1: tests.kernel.test_counts::test_connect_timeouts")
    tail = text[at + 1:at + 1 + kernels.TRACEBACK_LINES]
    assert tail[-1] == "    E   AssertionError: assert {'other': 5} == {'timeout': 5}"
    assert tail[0] == f"    line {100 - kernels.TRACEBACK_LINES + 1}"  # only the end
    assert "6.1: tests.kernel.test_reuse::test_setup_fails" in text
    assert "    netns: RTNETLINK answers: File exists" in text
    assert "6.1: tests.kernel.test_btf::test_offsets (skipped)" in text
    assert text[-1] == "6.1: guest output in /tmp/out/6.1/ (pytest.log, console.log)"
    assert "| 6.1 | 6.1.0-57-amd64 | 1 | 2 | 1 |" in text[2]
