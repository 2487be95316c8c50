"""tcpstate: live TCP connection-state monitor (eBPF tracepoints -> in-kernel counters -> Prometheus)."""

__version__ = "0.1.0"
