"""setup.py: what pyproject.toml cannot say yet: _tally.c, the socket-table counter, compiled at install."""

from setuptools import Extension, setup

# A plain C library (loaded with ctypes, no Python API): any install builds it, so the wheel,
# `make install` and the container always carry it. No fused multiply-add: the endpoint ranks
# it computes must round exactly as Python's do (tests/unit/test_sockdiag.py checks them).
setup(ext_modules=[Extension("monitor.sockets._tally", ["monitor/sockets/_tally.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-ffp-contract=off"])])
