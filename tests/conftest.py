"""Test-wide rules: under CI=true a skipped test is a failure."""

import os

_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") == "true" and _skipped:
        print(f"\nCI=true: {len(_skipped)} skipped tests count as failures: {', '.join(_skipped)}")
        session.exitstatus = 1
