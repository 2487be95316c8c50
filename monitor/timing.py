"""timing.py: time as tcpstate shows it (RFC 3339, kernel monotonic stamps as wall time) and the loop its background threads run."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Callable

log = logging.getLogger(__name__)


def rfc3339(t: float) -> str:
    """Unix seconds as UTC with milliseconds, e.g. 2026-12-07T03:00:00.123Z."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class WallClock:
    """Turns the kernel's bpf_ktime_get_ns() stamps (CLOCK_MONOTONIC) into wall-clock seconds,
    with the two clocks read together once."""

    def __init__(self, wall_ns: int | None = None, mono_ns: int | None = None):
        wall_ns = time.time_ns() if wall_ns is None else wall_ns
        mono_ns = time.monotonic_ns() if mono_ns is None else mono_ns
        self.offset_ns = wall_ns - mono_ns

    def wall(self, mono_ns: int) -> float:
        return (mono_ns + self.offset_ns) / 1e9


class Periodic:
    """Calls work() every interval seconds (from one call's start to the next) in a daemon thread
    until stop(); an exception is logged and the loop goes on. interval is read each round, so a
    reload can change it."""

    def __init__(self, name: str, work: Callable[[], object], interval: float):
        self.name = name
        self.interval = interval
        self._work = work
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._work()
            except Exception:  # a bug must not silently end the loop
                log.exception("%s failed", self.name)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
