"""sdnotify.py: tell systemd (Type=notify) when the daemon is ready and when it stops, over $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """The sd_notify protocol: one datagram of KEY=VALUE lines to the socket systemd names.
    Without $NOTIFY_SOCKET (not under systemd) every call is a no-op. The socket is connected
    at start, while the daemon may still open it, and the variable is removed so that no child
    process talks to systemd in the daemon's name."""

    def __init__(self, environ=os.environ):
        self._sock = None
        address = environ.pop("NOTIFY_SOCKET", None)
        if not address:
            return
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        elif not address.startswith("/"):
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract name; not notifying systemd", address)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(address)
        except OSError as exc:
            log.warning("cannot reach systemd's notify socket %s: %s", address.lstrip("\0"), exc.strerror)
            sock.close()
            return
        self._sock = sock

    @property
    def active(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str) -> bool:
        if self._sock is None:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            self._sock.send(message.encode())
        except OSError as exc:  # systemd gone or restarting; the daemon goes on
            log.warning("sd_notify %s failed: %s", message.replace("\n", " "), exc.strerror)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready="1", status=status)

    def stopping(self) -> bool:
        return self.send(stopping="1", status="stopping")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
