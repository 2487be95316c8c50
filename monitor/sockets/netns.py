"""netns.py: enter another network namespace from one thread (setns), and name namespaces for labels."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), Linux >= 4.11
NAMED_DIRS = ("/var/run/netns/", "/run/netns/")  # where `ip netns` keeps its names

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(OSError):
    """A namespace could not be opened or entered."""


def label_for(path: str) -> str:
    """The netns label of a --netns path: the name for `ip netns` paths, else the path."""
    for prefix in NAMED_DIRS:
        name = path[len(prefix):]
        if path.startswith(prefix) and name and "/" not in name:  # "" is the own namespace's label
            return name
    return path


def check_netns(fd: int) -> int:
    """The namespace's inode number if fd refers to a network namespace; raises NetnsError otherwise."""
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        raise NetnsError(exc.errno, "not a namespace") from None
    if kind != CLONE_NEWNET:
        raise NetnsError(errno.EINVAL, "a namespace, but not a network namespace")
    return os.fstat(fd).st_ino


@contextlib.contextmanager
def entered(path: str):
    """Run the body in the namespace at path, in this thread only (network namespaces are per
    thread); sockets made meanwhile stay in it. The thread returns to its own namespace on
    exit; if it cannot, the process is in an unknown state and exits."""
    try:
        # Namespace files are regular files; opening anything else (a FIFO blocks, a device
        # may act) is never what was meant.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise NetnsError(errno.EINVAL, "not a namespace file")
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except NetnsError:
        raise
    except OSError as exc:
        raise NetnsError(exc.errno, exc.strerror) from None
    own = None
    try:
        check_netns(target)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(err, f"setns: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # never happens with a valid own descriptor
                os.write(2, b"tcpstate: fatal: could not return to the daemon's network namespace\n")
                os._exit(70)
    finally:
        os.close(target)
        if own is not None:
            os.close(own)
