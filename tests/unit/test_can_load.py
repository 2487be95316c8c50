"""privileges.can_load_programs: who may attach, read from a process's capabilities and the kernel's perf_event_paranoid."""

import pytest

from monitor.system import privileges

ALL = (1 << 41) - 1
UNIT = 1 << privileges.CAP_BPF | 1 << privileges.CAP_PERFMON | 1 << 6 | 1 << 7 | 1 << 8  # the unit's set, no SYS_ADMIN


def fake(tmp_path, cap_eff: int, paranoid: str | None):
    status = tmp_path / "status"
    status.write_text(f"Name:\tx\nUid:\t0\t0\t0\t0\nCapEff:\t{cap_eff:016x}\n")
    sysctl = tmp_path / "perf_event_paranoid"
    if paranoid is not None:
        sysctl.write_text(paranoid)
    return str(status), str(sysctl)


@pytest.mark.parametrize("cap_eff, paranoid, ok", [
    (ALL, "3", True),  # sudo: root with every capability
    (UNIT, "2", True),  # the unit on a kernel without the restriction
    (UNIT, "3", False),  # the unit on Debian's kernels: perf_event_open is EACCES
    (UNIT, None, True),  # no sysctl to read: the kernel's own default, 2
    (1 << privileges.CAP_SYS_ADMIN, "3", True),
    (1 << privileges.CAP_BPF, "2", False),
    (0, "1", False),
])
def test_who_may_attach(tmp_path, cap_eff, paranoid, ok):
    got, why = privileges.can_load_programs(*fake(tmp_path, cap_eff, paranoid))
    assert got is ok, why


def test_the_restriction_is_named_with_both_ways_out(tmp_path):
    ok, why = privileges.can_load_programs(*fake(tmp_path, UNIT, "3\n"))
    assert not ok and "\n" not in why
    assert why.startswith("kernel.perf_event_paranoid is 3:")
    assert "CAP_SYS_ADMIN" in why and "kernel.perf_event_paranoid=2" in why
