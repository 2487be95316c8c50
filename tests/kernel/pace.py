"""pace.py: how much slower than real hardware these tests may run: 1 on a host, more in the emulated guests of make test-kernels."""

import os

# tests/vm/guest.sh sets it: under QEMU's TCG everything runs 10-20 times slower (a bcc compile
# takes 2 s here and 25-35 s there). Hang guards and bounds on time scale by it; counts never do.
SLOWDOWN = float(os.environ.get("TCPSTATE_TEST_SLOWDOWN", "1"))


def seconds(s: float) -> float:
    """A time bound, on this machine."""
    return s * SLOWDOWN
