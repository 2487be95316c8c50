"""notify.py: where anomaly events go: JSON lines to a stream or file, and an optional webhook that never blocks detection."""

from __future__ import annotations

import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import IO

log = logging.getLogger(__name__)


class JsonLines:
    """One JSON object per line, flushed per event so `tail -f` and log shippers see it at once."""

    def __init__(self, stream: IO[str], owned: bool = False):
        self.stream = stream
        self._owned = owned  # opened here, so closed here; stdout is not
        self._lock = threading.Lock()

    def __call__(self, event) -> None:
        line = event.to_json() + "\n"
        with self._lock:
            self.stream.write(line)
            self.stream.flush()

    @classmethod
    def open(cls, path: str) -> "JsonLines":
        """Append to path (made if missing); raises OSError when it cannot be opened."""
        return cls(open(path, "a", encoding="utf-8", buffering=1), owned=True)

    def close(self) -> None:
        if self._owned:
            self.stream.close()


class Webhook:
    """POSTs each event's JSON to url from a thread of its own. The queue is bounded: when the
    receiver is slow or down, new events are dropped and counted, detection never waits.
    A failed POST (network error or non-2xx) is retried `retries` times with doubling delays."""

    def __init__(self, url: str, queue_size: int = 1000, retries: int = 3, timeout: float = 5.0,
                 backoff: float = 1.0):
        self.url = url
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.sent = self.failed = self.dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    def __call__(self, event) -> None:
        try:
            self._queue.put_nowait(event.to_json().encode())
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("webhook %s: queue full, %d events dropped so far", self.url, self.dropped)

    def _post(self, body: bytes) -> None:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "tcpstate"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # non-2xx raises HTTPError
            resp.read()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                body = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            delay = self.backoff
            for attempt in range(self.retries + 1):
                try:
                    self._post(body)
                    self.sent += 1
                    break
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    why = f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) else str(getattr(exc, "reason", exc))
                    if attempt == self.retries:
                        self.failed += 1
                        log.warning("webhook %s: giving up on an event after %d attempts: %s",
                                    self.url, attempt + 1, why)
                    elif self._stop.wait(delay):
                        return
                    delay *= 2

    def close(self, drain_seconds: float = 2.0) -> None:
        """Give queued events a moment to go out, then stop."""
        deadline = time.monotonic() + drain_seconds
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=self.timeout + 1)
