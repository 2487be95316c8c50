"""sd_notify over a real datagram socket, as systemd's Type=notify reads it; and the --user lookup."""

import logging
import os
import socket

import pytest

from monitor.system import privileges
from monitor.system.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path):
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(5)
    yield str(path), s
    s.close()


def test_ready_and_stopping_arrive_as_systemd_reads_them(listener):
    path, sock = listener
    env = {"NOTIFY_SOCKET": path, "OTHER": "x"}
    n = Notifier(env)
    assert n.active and env == {"OTHER": "x"}  # children must not notify in the daemon's name
    assert n.ready("serving http://:9966/metrics")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving http://:9966/metrics"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    n.close()
    assert not n.ready("again")


def test_abstract_socket_names():
    name = f"tcpstate-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready("ok")
        assert s.recv(100) == b"READY=1\nSTATUS=ok"
    finally:
        s.close()


def test_without_systemd_nothing_is_sent():
    n = Notifier({})
    assert not n.active and not n.ready("x") and not n.stopping()


def test_an_unreachable_socket_is_a_warning_not_a_failure(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent")})
    assert not n.active
    assert "cannot reach systemd's notify socket" in caplog.text
    with caplog.at_level(logging.WARNING):
        assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).active
    assert "neither a path nor an abstract name" in caplog.text


def test_user_lookup():
    nobody = privileges.Account.lookup("nobody")
    assert (nobody.name, nobody.uid) == ("nobody", 65534)
    assert privileges.Account.lookup("65534") == nobody  # a uid with a passwd entry takes its name and group
    assert privileges.Account.lookup("4242424") == privileges.Account("4242424", 4242424, 4242424)
    with pytest.raises(ValueError, match="no user 'no-such-user-here' on this host"):
        privileges.Account.lookup("no-such-user-here")
    # (uid_t)-1 tells setresuid "leave it": the daemon would stay root while saying otherwise.
    with pytest.raises(ValueError, match=r"uid 4294967295 is out of range \(0 to 4294967294\)"):
        privileges.Account.lookup("4294967295")
    with pytest.raises(ValueError, match="no user"):
        privileges.Account.lookup("\u0663")  # ARABIC-INDIC DIGIT THREE: isdigit(), but not a uid


def test_netns_needs():
    assert privileges.netns_needs([]) == {}
    assert set(privileges.netns_needs(["/var/run/netns/blue"])) == {privileges.CAP_SYS_ADMIN}
    assert set(privileges.netns_needs(["/proc/1/ns/net"])) == {privileges.CAP_SYS_ADMIN, privileges.CAP_SYS_PTRACE}
