"""The counts of test_counts.py again with the tracepoints' records instead of raw tracepoints: what
`run --no-raw-tracepoints` runs, and a kernel whose BTF lacks the socket's fields (the other offsets
still read). The tests whose steps the two entry points share: opens and closes from either end, a
refused connect's cause, aborts, a close that waits for the socket's end, a failed connect settled
at the socket's end. The filters read the same flow either way."""

import dataclasses

import pytest

from monitor.kernel.tracefs import detect_layout, ensure_tracefs

from .test_counts import (  # noqa: F401 (collected here, with this module's layout)
    test_abandoned_connects,
    test_abort_in_fin_wait2_is_not_time_wait,
    test_aborts_with_so_linger_zero,
    test_client_closes_first,
    test_connects_to_a_closed_port,
    test_server_closes_first,
)


@pytest.fixture(scope="module")
def layout():
    """This kernel's layout with the raw tracepoints turned off (where they are used at all)."""
    detected = detect_layout(ensure_tracefs())
    return dataclasses.replace(detected, raw_off="turned off (test_records.py)")


def test_the_records_are_what_runs(probes):
    assert "-DTCPSTATE_RAW_TRACEPOINTS" not in probes.cflags()
    names = {name for name in dict(probes.bpf.funcs)}
    assert b"tracepoint__sock__inet_sock_set_state" in names and b"raw_tracepoint__inet_sock_set_state" not in names
