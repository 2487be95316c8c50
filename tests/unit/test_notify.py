"""Event outputs: JSON lines to a stream or file, and the webhook (a real HTTP server on loopback): delivery, retries, a bounded queue."""

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from monitor.detect.event import Event
from monitor.detect.sinks import JsonLines, Webhook

EVENT = Event(1_800_000_000.0, "rst_storm", "firing", "critical", "Resets at 500.0/s", 500.0, 100.0, 10.0,
              {"top_causes": [{"direction": "sent", "state": "NONE", "reason": "NO_SOCKET", "resets": 5000}]})


def test_json_lines_to_a_stream():
    out = io.StringIO()
    JsonLines(out)(EVENT)
    JsonLines(out)(EVENT)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["kind"] == "rst_storm"


def test_json_lines_appends_to_a_file(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"earlier": true}\n')
    sink = JsonLines.open(str(path))
    sink(EVENT)
    assert path.read_text().splitlines()[1] == EVENT.to_json()  # flushed at once, before close
    sink.close()


class Receiver:
    """An HTTP server on 127.0.0.1 answering POSTs with the next status of `statuses` (then 200)."""

    def __init__(self, statuses=(), delay=0.0):
        self.bodies, self.statuses, self.delay = [], list(statuses), delay
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(outer.delay)
                status = outer.statuses.pop(0) if outer.statuses else 200
                if status == 200:
                    outer.bodies.append((self.headers["Content-Type"], body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def receiver(request):
    r = Receiver(*getattr(request, "param", ()))
    yield r
    r.close()


def test_webhook_posts_the_event_json(receiver):
    hook = Webhook(receiver.url)
    hook(EVENT)
    assert wait_for(lambda: hook.sent == 1)
    hook.close()
    assert receiver.bodies == [("application/json", EVENT.to_json().encode())]
    assert (hook.failed, hook.dropped) == (0, 0)


@pytest.mark.parametrize("receiver", [([500, 503],)], indirect=True)
def test_webhook_retries_until_it_goes_through(receiver):
    hook = Webhook(receiver.url, retries=3, backoff=0.05)
    hook(EVENT)
    assert wait_for(lambda: hook.sent == 1)
    hook.close()
    assert len(receiver.bodies) == 1 and hook.failed == 0


@pytest.mark.parametrize("receiver", [([500, 500, 500],)], indirect=True)
def test_webhook_gives_up_after_retries(receiver, caplog):
    hook = Webhook(receiver.url, retries=2, backoff=0.05)
    hook(EVENT)
    assert wait_for(lambda: hook.failed == 1)
    hook.close()
    assert receiver.bodies == [] and hook.sent == 0
    assert "giving up on an event after 3 attempts: HTTP 500" in caplog.text


def test_webhook_unreachable_counts_failed():
    hook = Webhook("http://127.0.0.1:9/hook", retries=1, backoff=0.05, timeout=1.0)  # discard port: refused
    hook(EVENT)
    assert wait_for(lambda: hook.failed == 1)
    hook.close()


@pytest.mark.parametrize("receiver", [((), 0.5)], indirect=True)
def test_webhook_queue_is_bounded_and_never_blocks(receiver):
    hook = Webhook(receiver.url, queue_size=2)
    t0 = time.monotonic()
    for _ in range(10):
        hook(EVENT)
    assert time.monotonic() - t0 < 0.1  # the caller (detection) never waits for the receiver
    assert hook.dropped >= 7  # one in flight at most, two queued
    hook.close(drain_seconds=3)
    assert hook.sent + hook.dropped == 10
