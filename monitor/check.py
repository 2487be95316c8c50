"""check.py: preflight items for `tcpstate check`, each OK/WARN/FAIL with the fix."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from monitor.kernel import btf, probes, tracefs
from monitor.settings import Filters
from monitor.sockets import tally
from monitor.system import privileges


@dataclass(frozen=True)
class Item:
    status: str  # OK | WARN | FAIL
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}"


def run_checks() -> list[Item]:
    items: list[Item] = []
    ok, why = privileges.can_load_programs()
    items.append(Item("OK" if ok else "FAIL", "privileges", why))

    try:
        root = tracefs.ensure_tracefs()
        items.append(Item("OK", "tracefs", f"mounted at {root}"))
    except tracefs.TracefsError as exc:
        items.append(Item("FAIL", "tracefs", str(exc)))
        root = None

    layout = tracefs.detect_layout(root) if root else None
    if layout is None:
        items.append(Item("FAIL", "tracepoints", "unknown: tracefs unavailable"))
    else:
        for tp, usable in layout.probe_states().items():
            name = tp.split(":", 1)[1]
            items.append(Item("OK" if usable else "WARN", f"tracepoint {tp}", layout.describe(name)))
        items.append(Item("OK" if not layout.btf_problem else "WARN", "kernel BTF",
                          layout.btf_problem or f"{len(layout.offsets)} struct offsets read from {btf.VMLINUX}"))
        for sig in layout.signals():
            if sig.source:
                items.append(Item("OK", f"count {sig.name}", f"from {sig.source}"))
            else:
                items.append(Item("FAIL" if sig.name == "transitions" else "WARN", f"count {sig.name}", sig.missing))

    try:
        probes.import_bcc()
        items.append(Item("OK", "bcc", f"python module importable (bcc {probes.bcc_version()})"))
        bcc_ok = True
    except probes.ProbeError as exc:
        items.append(Item("FAIL", "bcc", str(exc)))
        bcc_ok = False

    try:
        items.append(Item("OK", "kernel headers", probes.check_headers()))
        headers_ok = True
    except probes.ProbeError as exc:
        items.append(Item("FAIL", "kernel headers", str(exc)))
        headers_ok = False

    if tally.LIB is not None:
        items.append(Item("OK", "socket-table counter", f"C helper loaded from {tally.LIBRARY}"))
    else:
        items.append(Item("FAIL", "socket-table counter", tally.UNAVAILABLE))

    ready = ok and bcc_ok and headers_ok and tally.LIB is not None and layout is not None and layout.usable("inet_sock_set_state")
    for label, variant in COMPILE_VARIANTS:
        if not ready:
            items.append(Item("FAIL", f"test compile, {label}", "skipped: fix the failures above first"))
            continue
        p = probes.Probes(layout, **variant)
        try:
            p.attach()
            items.append(Item("OK", f"test compile, {label}", "bpf/tcpstate.c compiled, loaded and attached"))
        except probes.ProbeError as exc:
            items.append(Item("FAIL", f"test compile, {label}", str(exc)))
        finally:
            p.close()
    return items


# What `check` compiles: what `run` does with its defaults, and every optional part at once (the
# filters and the watch stream); the table sizes only change array bounds. The unit tests compile
# every combination against every kernel's formats (tests/unit/test_bpf_variants.py).
_EVERY_FILTER = Filters(include_cidrs=(ipaddress.ip_network("198.18.0.0/15"),),
                        exclude_cidrs=(ipaddress.ip_network("2001:db8::/32"),), include_ports=(443,))
COMPILE_VARIANTS = (
    ("run's defaults", {}),
    ("filters and the watch stream", {"filters": _EVERY_FILTER, "emit_events": True}),
)
