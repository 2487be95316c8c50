#!/usr/bin/env bash
# entrypoint.sh: container start: choose kernel headers for bcc (the host's, else the image's generic ones), make sure tracefs is mounted, then exec tcpstate.
#
# Expects the host's /sys/kernel/tracing, /sys/kernel/btf, /lib/modules and /usr/src mounted
# (read-only is enough). Nothing here writes to them.
#
# Environment:
#   BCC_KERNEL_SOURCE          set by the operator: headers to use instead of looking (must hold
#                              include/linux/kconfig.h, in one tree)
#   TCPSTATE_FALLBACK_HEADERS  the merged generic headers baked into the image
#                              (default /opt/tcpstate/headers); overridden by the tests only
set -euo pipefail

say() { echo "tcpstate-entrypoint: $*" >&2; }

kver=$(uname -r)
modules=/lib/modules/$kver
fallback=${TCPSTATE_FALLBACK_HEADERS:-/opt/tcpstate/headers}
tracefs=/sys/kernel/tracing

# The tcpstate command, past the one global option that takes a value. Only the commands
# that compile or read tracepoints need headers and tracefs; config-check and --help do not.
command=
args=("$@")
for a in "$@"; do
    [[ $a == -h || $a == --help ]] && exec tcpstate "$@"
done
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
    --log-level) i=$((i + 1)) ;;
    -*) ;;
    *)
        command=${args[i]}
        break
        ;;
    esac
done
case $command in
run | watch) strict=1 ;;
# check reports missing headers or tracefs itself, as a FAIL line with the fix: let it run.
check) strict= ;;
*) exec tcpstate "$@" ;;
esac

fail() {
    say "$*"
    [[ -n $strict ]] && exit 1
    return 0
}

# bcc's own rule (0.26, src/cc/frontends/clang/loader.cc): with BCC_KERNEL_SOURCE it compiles in
# that one directory; otherwise in $modules/source when both build/ and source/ are directories
# (Debian's split -ARCH/-common pair), else in $modules/build. It needs include/linux/kconfig.h
# there. The host's links point into /usr/src, hence its mount.
if [[ -n ${BCC_KERNEL_SOURCE:-} ]]; then
    if [[ -f $BCC_KERNEL_SOURCE/include/linux/kconfig.h ]]; then
        say "using kernel headers from BCC_KERNEL_SOURCE=$BCC_KERNEL_SOURCE"
    else
        fail "BCC_KERNEL_SOURCE=$BCC_KERNEL_SOURCE has no include/linux/kconfig.h: point it at a kernel header tree, or unset it"
    fi
else
    kpath=$modules/build
    [[ -d $modules/build && -d $modules/source ]] && kpath=$modules/source
    if [[ -f $kpath/include/linux/kconfig.h ]]; then
        say "using the host's kernel headers for $kver ($(readlink -f "$kpath"))"
    elif [[ -f $fallback/include/linux/kconfig.h ]]; then
        # /lib/modules is the host's (read-only), so the fallback cannot be linked there as make
        # setup does: bcc is pointed at it instead. Mismatched headers are safe for tcpstate: it
        # reads only tracepoint arguments, whose layout comes from the running kernel.
        export BCC_KERNEL_SOURCE=$fallback
        origin=$(cat "$fallback/.origin" 2>/dev/null || echo generic)
        say "no kernel headers for $kver at $modules/build; using the image's $origin (exact ones: mount the host's /lib/modules and /usr/src)"
    else
        fail "no kernel headers for $kver: none at $modules/build and no fallback at $fallback; mount the host's /lib/modules and /usr/src read-only (with linux-headers-$kver installed on the host)"
    fi
fi

if [[ ! -d $tracefs/events && ! -d /sys/kernel/debug/tracing/events ]]; then
    if err=$(mount -t tracefs tracefs "$tracefs" 2>&1); then
        say "mounted tracefs at $tracefs"
    else
        fail "tracefs is not mounted at $tracefs and mounting it failed (${err//$'\n'/ }): mount the host's $tracefs into the container, or grant CAP_SYS_ADMIN"
    fi
fi

exec tcpstate "$@"
