"""Headless Chromium driven over the DevTools protocol on a pipe: load a page, read its DOM, console errors and CSP violations, save a PNG."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium reaches out to the internet at start, which
# the tests' hosts refuse; --remote-debugging-pipe needs no port and no websocket client.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--remote-debugging-pipe")
# Every CSP violation the page meets, whatever reports it: the event fires for each one.
CSP_RECORDER = ("window.__csp = [];document.addEventListener('securitypolicyviolation', "
                "e => window.__csp.push(e.violatedDirective + ' ' + (e.blockedURI || 'inline')));")


class BrowserError(RuntimeError):
    pass


class Browser:
    """One Chromium process and one page in it. errors: console errors, uncaught exceptions and
    error log entries (CSP violations are logged there too) since the page was opened."""

    def __init__(self, tmp: Path, width: int = 1366, height: int = 860):
        if CHROMIUM is None:
            raise BrowserError("chromium is not installed (make setup installs it)")
        self.width, self.height = width, height
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4. Moved above 10 first, so that
        # placing one pipe end on 3 cannot overwrite the other.
        high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)

        def onto_3_and_4():
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.log_path = tmp / "chromium.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}",
                 f"--window-size={width},{height}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=onto_3_and_4, pass_fds=(3, 4))
        for fd in (to_chrome_r, from_chrome_w, high_r, high_w):
            os.close(fd)
        self._next_id = 0
        self._replies: dict = {}
        self._cond = threading.Condition()
        self.events: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    self._note(msg)
                    self.events.put(msg)
        with self._cond:
            self._replies[None] = {"error": {"message": "chromium closed the pipe"}}
            self._cond.notify_all()

    def _note(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                     for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append("exception: " + details.get("exception", {}).get("description", details["text"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"log ({params['entry']['source']}): {params['entry']['text']}")

    def send(self, method: str, params: dict | None = None, timeout: float = 30, session: bool = True) -> dict:
        with self._cond:
            self._next_id += 1
            msg_id = self._next_id
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while msg_id not in self._replies and None not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrowserError(f"{method}: no answer in {timeout} s")
                self._cond.wait(left)
            reply = self._replies.pop(msg_id, None) or self._replies[None]
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']['message']}")
        return reply["result"]

    def open(self, url: str, timeout: float = 60) -> None:
        """A new page with the recorders on, at url once its load event fired."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")
        self.send("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_RECORDER})
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BrowserError(f"{url}: no load event in {timeout} s") from None
            # about:blank may report its own load late: only the url's counts.
            if ev.get("method") == "Page.loadEventFired" and self.eval("location.href") != "about:blank":
                return

    def eval(self, expression: str):
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:60]}...: {result['exceptionDetails']['text']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        """Until the expression is truthy in the page; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s")
            time.sleep(0.25)

    def csp_violations(self) -> list:
        return self.eval("window.__csp")

    def screenshot(self, path: Path) -> Path:
        """The whole page, not only the viewport, as PNG."""
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close", session=False, timeout=10)
            except BrowserError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        os.close(self._to_chrome)
        self._reader.join(timeout=5)
        os.close(self._from_chrome)
