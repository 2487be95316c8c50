"""Missing prerequisites give one line that names the cause and the fix."""

import builtins

import pytest

from monitor.kernel import probes, tracefs


def test_bcc_missing(monkeypatch):
    real_import = builtins.__import__

    def no_bcc(name, *args, **kwargs):
        if name == "bcc" or name.startswith("bcc."):
            raise ImportError("No module named 'bcc'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bcc)
    with pytest.raises(probes.ProbeError) as exc:
        probes.import_bcc()
    msg = str(exc.value)
    assert "python3-bpfcc" in msg and "--system-site-packages" in msg and "\n" not in msg


def test_headers_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(probes, "headers_dir", lambda: tmp_path / "nope" / "build")
    with pytest.raises(probes.ProbeError) as exc:
        probes.check_headers()
    msg = str(exc.value)
    assert "kernel headers missing" in msg and "make setup" in msg and "\n" not in msg


def test_tracefs_unmountable(monkeypatch, tmp_path):
    monkeypatch.setattr(tracefs, "TRACEFS_MOUNTS", (str(tmp_path / "tracing"),))

    class FakeLibc:
        def mount(self, *args):
            import ctypes

            ctypes.set_errno(1)  # EPERM
            return -1

    monkeypatch.setattr(tracefs.ctypes, "CDLL", lambda *a, **k: FakeLibc())
    with pytest.raises(tracefs.TracefsError) as exc:
        tracefs.ensure_tracefs()
    msg = str(exc.value)
    assert "Operation not permitted" in msg and "mount -t tracefs" in msg and "root" in msg


def test_missing_set_state_is_a_clear_probe_error(tmp_path):
    layout = tracefs.detect_layout(str(tmp_path))  # an empty tracefs: no tracepoints at all
    with pytest.raises(probes.ProbeError, match="inet_sock_set_state is missing on this kernel"):
        probes.Probes(layout).attach()
