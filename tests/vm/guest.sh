#!/bin/bash
# guest.sh: runs inside a kernels.py guest: the kernel tests against this checkout, results to OUT.
# Usage: guest.sh OUT KERNEL_TREE [PYTEST_ARGS...]. OUT is shared read-write with the host; the rest
# of the host's filesystem is read-only here, hence no bytecode and no pytest cache.
out=$1
tree=$2
shift 2
echo "booted $EPOCHREALTIME" >"$out/times"
repo=$(cd "$(dirname "$0")/../.." && pwd)

# virtme-ng's root share is 9p without caching: under emulation every stat is a round trip to the
# host, and importing the daemon took 25 s, a compile 80 s. kernels.py exports / a second time as
# "fastroot"; mounted with cache=loose over what the tests read (all read-only, none of it changes
# during a run), an import takes 5 s and a compile 35 s.
# Not /usr as a whole: virtme-ng's /usr/lib/modules (a tmpfs linking the kernel's modules) is in it.
if mkdir -p /run/fastroot && mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,msize=512000,ro,access=any \
    fastroot /run/fastroot; then
    for d in /usr/bin /usr/sbin /usr/share /usr/lib/x86_64-linux-gnu /usr/lib/python3 /usr/lib/python3.* \
        /usr/lib/llvm-* "$repo" "$tree"; do
        [[ -d /run/fastroot$d ]] || continue
        mount --bind "/run/fastroot$d" "$d" || echo "guest.sh: could not bind $d from fastroot" >&2
    done
fi
cd "$repo" || exit 1
# TCG runs 10-20 times slower than the host: the tests' time bounds and hang guards scale by it
# (tests/kernel/pace.py); their counts do not.
export CI=true PYTHONDONTWRITEBYTECODE=1 TMPDIR=/tmp TCPSTATE_TEST_SLOWDOWN=10
py=.venv/bin/python
# The formats of every tracepoint tcpstate reads or might (fixtures: kernels.py --save-formats).
mkdir -p "$out/formats"
for f in /sys/kernel/tracing/events/{sock,tcp}/*/format /sys/kernel/tracing/events/skb/kfree_skb/format; do
    [[ -r $f ]] && cp "$f" "$out/formats/$(basename "$(dirname "$f")").format"
done
{
    echo "kernel $(uname -r)"
    # check compiles run's default program and the one with every option: the compile time, and
    # (test_daemon's check test being host-only) its verdict on this kernel.
    echo "check_start $EPOCHREALTIME" >>"$out/times"
    .venv/bin/tcpstate check
    check=$?
    echo "check exited $check"
    echo "check_end $EPOCHREALTIME" >>"$out/times"
    # Arguments name tests (paths, -k) or add options; with no path, the whole kernel suite.
    paths=(tests/kernel)
    for a in "$@"; do [[ $a == tests/* ]] && paths=(); done
    "$py" -m pytest -p no:cacheprovider -ra -m "not host_only" --junitxml="$out/junit.xml" --durations=15 \
        "${paths[@]}" "$@"
    status=$?
    ((status == 0 && check != 0)) && status=$check
    echo "$status" >"$out/status"
} >"$out/pytest.log" 2>&1
sync
