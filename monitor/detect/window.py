"""window.py: a sliding window of counter or gauge samples, with deltas and rates over it."""

from __future__ import annotations

from collections import deque


class Window:
    """Samples of values (dicts of name -> number) over the last `seconds`; delta() and rate()
    cover the span from the oldest kept sample to the newest. counters: the values only grow,
    so one that went back means the source restarted (a gauge may go either way)."""

    def __init__(self, seconds: float, counters: bool = True):
        self.seconds = seconds
        self.counters = counters
        self.samples: deque = deque()

    def add(self, now: float, values: dict) -> None:
        if self.counters and self.samples and any(values.get(k, 0) < v for k, v in self.samples[-1][1].items()):
            self.samples.clear()  # a counter went backwards (probes reloaded): start again
        self.samples.append((now, dict(values)))
        # Keep one sample at or before the window's start so the span is the whole window.
        while len(self.samples) >= 2 and self.samples[1][0] <= now - self.seconds:
            self.samples.popleft()

    def span(self) -> float:
        return self.samples[-1][0] - self.samples[0][0] if len(self.samples) >= 2 else 0.0

    def delta(self, key) -> float:
        if len(self.samples) < 2:
            return 0.0
        return self.samples[-1][1].get(key, 0) - self.samples[0][1].get(key, 0)

    def rate(self, key) -> float | None:
        span = self.span()
        return self.delta(key) / span if span > 0 else None

    def deltas(self) -> dict:
        """Every key's growth over the window, non-zero only."""
        if len(self.samples) < 2:
            return {}
        first, last = self.samples[0][1], self.samples[-1][1]
        return {k: v - first.get(k, 0) for k, v in last.items() if v - first.get(k, 0) > 0}
