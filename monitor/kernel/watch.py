"""watch.py: the live event stream of `tcpstate watch`: the ring buffer read, each record printed as a table row or a JSON line, losses told."""

from __future__ import annotations

import json
import threading
import time
from typing import Callable, TextIO

from monitor.kernel.abi import DecodedEvent, DecodeError, decode_event
from monitor.tcp import endpoint_text
from monitor.timing import WallClock

COLUMNS = (
    ("TIME", 12), ("KIND", 14), ("SOURCE", 45), ("DESTINATION", 45), ("OLD", 11), ("NEW", 11),
    ("REASON", 24), ("PREV_MS", 10), ("PID", 7), ("COMM", 16),
)


def table_header() -> str:
    return " ".join(name.ljust(width) for name, width in COLUMNS).rstrip()


def table_row(ev: DecodedEvent, clock: WallClock) -> str:
    wall = clock.wall(ev.ts_ns)
    stamp = time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall * 1000) % 1000:03d}"
    values = (
        stamp, ev.kind, endpoint_text(ev.saddr, ev.sport), endpoint_text(ev.daddr, ev.dport), ev.oldstate,
        ev.newstate if ev.kind == "transition" else "-", ev.reason or "-",
        f"{ev.delta_us / 1000:.3f}" if ev.delta_us else "-", str(ev.pid or "-"), ev.comm or "-",
    )
    return " ".join(v.ljust(width) for v, (_, width) in zip(values, COLUMNS)).rstrip()


def json_line(ev: DecodedEvent, clock: WallClock) -> str:
    wall = clock.wall(ev.ts_ns)
    obj = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall * 1e6) % 1000000:06d}Z",
        "kind": ev.kind,
        "family": ev.family,
        "saddr": ev.saddr,
        "sport": ev.sport,
        "daddr": ev.daddr,
        "dport": ev.dport,
    }
    if ev.kind == "transition":
        obj.update(oldstate=ev.oldstate, newstate=ev.newstate)
    else:
        obj.update(state=ev.oldstate, reason=ev.reason)
    obj["prev_state_us"] = ev.delta_us if ev.delta_us else None
    obj["pid"] = ev.pid or None
    obj["comm"] = ev.comm or None
    return json.dumps(obj, separators=(",", ":"))


def stream(probes, out: TextIO, as_json: bool, stop: threading.Event, say: Callable[[str], None]) -> int:
    """Print every record of probes' ring buffer (opened with emit_events) until stop is set, then
    detach, print what is left, and tell the losses: every record is printed or counted lost, in
    the ring buffer or as a run the kernel skipped. say: a line for the user (stderr). Returns the
    records of an unexpected size, skipped."""
    clock = WallClock()
    reasons = probes.layout.reason_names
    skipped = 0
    lost_seen = 0
    misses_seen = 0

    def on_event(data, size):
        nonlocal skipped
        try:
            ev = decode_event(data, size, reasons)
        except DecodeError:
            skipped += 1
            return
        out.write((json_line(ev, clock) if as_json else table_row(ev, clock)) + "\n")

    def report_lost():
        nonlocal lost_seen, misses_seen
        lost = probes.read_stats()["events_lost"]
        if lost > lost_seen:
            say(f"tcpstate: lost {lost - lost_seen} events (ring buffer full; {lost} in all)")
            lost_seen = lost
        # A run the kernel skipped wrote no record (README, "Limits": kernel-skipped runs).
        misses = sum(s.recursion_misses for s in probes.program_stats().values())
        if misses > misses_seen:
            say(f"tcpstate: the kernel skipped {misses - misses_seen} program runs ({misses} in all)")
            misses_seen = misses

    if not as_json:
        out.write(table_header() + "\n")
    probes.open_events(on_event)
    next_report = time.monotonic() + 1
    while not stop.is_set():
        probes.poll_events(200)
        out.flush()
        if time.monotonic() >= next_report:
            report_lost()
            next_report = time.monotonic() + 1
    probes.drain_events()  # what is already in the buffer was not lost: print it before the tally
    out.flush()
    report_lost()
    return skipped
