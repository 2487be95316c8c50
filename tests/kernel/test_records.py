"""The counts of test_counts.py again with the tracepoints' records instead of raw tracepoints: what a
kernel without BTF (or --no-raw-tracepoints) runs. The ones whose steps the two entry points share
(opens, closes, a refused connect's cause, an abort, a close that waits for the socket's end); the
filters read the same flow either way."""

import dataclasses

import pytest

from monitor.kernel.tracefs import detect_layout, ensure_tracefs

from .test_counts import (  # noqa: F401 (collected here, with this module's layout)
    test_abort_in_fin_wait2_is_not_time_wait,
    test_aborts_with_so_linger_zero,
    test_client_closes_first,
    test_connects_to_a_closed_port,
)


@pytest.fixture(scope="module")
def layout():
    detected = detect_layout(ensure_tracefs())
    assert detected.raw_tracepoints, f"raw tracepoints are not used here: {detected.raw_problem}"
    return dataclasses.replace(detected, raw_off="turned off (test_records.py)")


def test_the_records_are_what_runs(probes):
    assert "-DTCPSTATE_RAW_TRACEPOINTS" not in probes.cflags()
    names = {name for name in dict(probes.bpf.funcs)}
    assert b"tracepoint__sock__inet_sock_set_state" in names and b"raw_tracepoint__inet_sock_set_state" not in names
