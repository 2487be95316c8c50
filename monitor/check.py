"""check.py: preflight items for `tcpstate check`, each OK/WARN/FAIL with the fix."""

from __future__ import annotations

from dataclasses import dataclass

from . import native, probes, tracefs
from .tracefs import MISSING_EFFECT, TRACEPOINTS


@dataclass(frozen=True)
class Item:
    status: str  # OK | WARN | FAIL
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}"


def run_checks(compile_test: bool = True) -> list[Item]:
    items: list[Item] = []
    ok, why = probes.running_as_privileged()
    items.append(Item("OK" if ok else "FAIL", "privileges", why))

    try:
        root = tracefs.ensure_tracefs()
        items.append(Item("OK", "tracefs", f"mounted at {root}"))
    except tracefs.TracefsError as exc:
        items.append(Item("FAIL", "tracefs", str(exc)))
        root = None

    layout = tracefs.detect_layout(root) if root else None
    for group, name, required in TRACEPOINTS:
        label = f"tracepoint {group}:{name}"
        if layout is None:
            items.append(Item("FAIL", label, "unknown: tracefs unavailable"))
        elif layout.usable(name):
            items.append(Item("OK", label, layout.describe(name)))
        elif required:
            items.append(Item("FAIL", label, layout.describe(name) + ": tcpstate needs it (Linux >= 4.16)"))
        else:
            items.append(Item("WARN", label, f"{layout.describe(name)}: runs without it, {MISSING_EFFECT[name]}"))

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

    if native.LIB is not None:
        items.append(Item("OK", "socket-table counter", f"C helper loaded from {native.LIBRARY}"))
    else:
        items.append(Item("WARN", "socket-table counter",
                          f"{native.UNAVAILABLE}: polls fall back to Python, at more CPU (README, Performance)"))

    if not compile_test:
        return items
    if ok and bcc_ok and headers_ok and layout is not None and layout.usable("inet_sock_set_state"):
        p = probes.Probes(layout)
        try:
            p.attach()
            items.append(Item("OK", "test compile", "bpf/tcpstate.c compiled, loaded and attached"))
        except probes.ProbeError as exc:
            items.append(Item("FAIL", "test compile", str(exc)))
        finally:
            p.close()
    else:
        items.append(Item("FAIL", "test compile", "skipped: fix the failures above first"))
    return items
