"""`tcpstate run` as a test's subprocess: counting only the test network, its log in a file, scraped over HTTP."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from .pace import seconds
from .test_daemon import NOT_READY, TCPSTATE, free_port, get, samples

TEST_CIDR = "198.18.0.0/15"


class Daemon:
    """stderr goes to a file so that nothing the daemon logs under load can fill a pipe and stall
    it. As a context manager: ready on entry, stopped on exit."""

    def __init__(self, tmp: Path, *extra: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.err_path = tmp / f"daemon-{self.port}.stderr"
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([TCPSTATE, "run", "--listen-address", f"127.0.0.1:{self.port}",
                                          "--include-cidr", TEST_CIDR, *extra],
                                         stdout=subprocess.DEVNULL, stderr=err)
        self.pid = self.proc.pid

    def __enter__(self):
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def log(self) -> str:
        return self.err_path.read_text()

    def wait_ready(self, timeout: float = 60) -> float:
        """Seconds until /-/ready answered 200."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds(timeout):
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}: {self.log()}"
            try:
                if get(self.base + "/-/ready")[0] == 200:
                    return time.monotonic() - t0
            except NOT_READY:
                pass
            time.sleep(0.1)
        raise AssertionError(f"tcpstate run never became ready: {self.log()}")

    def metrics(self) -> dict:
        status, body = get(self.base + "/metrics")
        assert status == 200, body
        return samples(body)

    def stop(self) -> int:
        """SIGTERM; a daemon that ignores it for 10 s is killed, and that is a failure."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=seconds(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"daemon ignored SIGTERM for {seconds(10):.0f} s") from None
        return self.proc.returncode
