#!/bin/bash
# guest.sh: runs inside a kernels.py guest: the kernel tests against this checkout, results to OUT.
# Usage: guest.sh OUT [PYTEST_ARGS...]. OUT is shared read-write with the host; the rest of the
# host's filesystem is read-only here, hence no bytecode and no pytest cache.
out=$1
shift
echo "booted $EPOCHREALTIME" >"$out/times"
cd "$(dirname "$0")/../.." || exit 1
export CI=true PYTHONDONTWRITEBYTECODE=1 TMPDIR=/tmp
py=.venv/bin/python
{
    echo "kernel $(uname -r)"
    echo "check_start $EPOCHREALTIME" >>"$out/times"
    .venv/bin/tcpstate check
    echo "check exited $?"
    echo "check_end $EPOCHREALTIME" >>"$out/times"
    "$py" -m pytest -p no:cacheprovider -ra -m "not host_only" --junitxml="$out/junit.xml" --durations=15 \
        tests/kernel "$@"
    echo "$?" >"$out/status"
} >"$out/pytest.log" 2>&1
sync
