"""watch.py: format the live event stream as an aligned table or JSON lines."""

from __future__ import annotations

import json
import time

from monitor.kernel.abi import DecodedEvent
from monitor.timing import WallClock

COLUMNS = (
    ("TIME", 12), ("KIND", 14), ("SOURCE", 45), ("DESTINATION", 45), ("OLD", 11), ("NEW", 11),
    ("REASON", 24), ("PREV_MS", 10), ("PID", 7), ("COMM", 16),
)


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def table_header() -> str:
    return " ".join(name.ljust(width) for name, width in COLUMNS).rstrip()


def table_row(ev: DecodedEvent, clock: WallClock) -> str:
    wall = clock.wall(ev.ts_ns)
    stamp = time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall * 1000) % 1000:03d}"
    values = (
        stamp, ev.kind, _endpoint(ev.saddr, ev.sport), _endpoint(ev.daddr, ev.dport), ev.oldstate,
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
