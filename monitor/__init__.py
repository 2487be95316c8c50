"""tcpstate: live TCP connection-state monitor (eBPF tracepoints -> in-kernel counters -> Prometheus)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tcpstate")  # pyproject.toml's, the one place it is written
except PackageNotFoundError:  # a checkout run without installing it
    __version__ = "0+unknown"
