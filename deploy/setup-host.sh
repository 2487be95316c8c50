#!/usr/bin/env bash
# setup-host.sh: prepare a Debian/Ubuntu host for tcpstate: OS packages, kernel headers, tracefs. Idempotent.
#
# bcc compiles the BPF program at load time and insists on kernel headers under
# /lib/modules/$(uname -r)/build. Exact headers are used when the distribution has
# them; otherwise its generic headers are linked there. tcpstate reads tracepoint
# arguments only (their layout comes from the running kernel), so mismatched
# headers are safe for it.
set -euo pipefail

kver=$(uname -r)
arch=$(dpkg --print-architecture)
# gcc: the unit tests compile bpf/tcpstate_logic.h, the load tests tests/load/churn.c;
# nftables: a kernel test plays an on-path device that rejects requests with resets;
# python3-seccomp: the systemd test applies the unit's system-call filters as systemd would;
# bpftool: the fault tests check that no program or map outlives a killed daemon;
# bpfcc-tools: `make bench` runs bcc's tcpstates beside tcpstate
# chromium: the page test loads / in headless Chromium (tests/kernel/test_page.py)
# qemu-system-x86, busybox-static, kmod, xz-utils, zstd: `make test-kernels` boots Debian's kernels (virtme-ng)
# tcpdump, tshark: the Wireshark tests capture their traffic and count with tshark's TCP analysis as the oracle
packages=(python3-bpfcc python3-venv python3-pip iproute2 prometheus curl gcc nftables python3-seccomp bpftool
          bpfcc-tools chromium qemu-system-x86 busybox-static kmod xz-utils zstd tcpdump tshark)
# kubectl: a unit test builds deploy/kubernetes with `kubectl kustomize` (Debian: kubernetes-client)
command -v kubectl >/dev/null || packages+=(kubernetes-client)
# MINIMAL: what the daemon needs to run (make install, the container), without the test tools;
# EXTRA: packages to add to either list (make install adds gcc, for the socket-table counter).
[[ ${TCPSTATE_SETUP_MINIMAL:-} == 1 ]] && packages=(python3-bpfcc python3-venv)
# shellcheck disable=SC2206  # a space-separated list of package names
packages+=(${TCPSTATE_SETUP_EXTRA:-})

say() { echo "setup-host: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    say "must run as root (sudo make setup)"
    exit 1
fi

apt_updated=
apt_install() {
    if [[ -z $apt_updated ]]; then
        apt-get update -q >/dev/null
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt_install "${missing[@]}"
fi

build=/lib/modules/$kver/build
if [[ ! -d $build/include ]]; then
    apt_install "linux-headers-$kver" 2>/dev/null || say "no package linux-headers-$kver"
fi
if [[ ! -d $build/include ]]; then
    generic=
    for candidate in "linux-headers-$arch" linux-headers-generic; do
        if apt-cache show "$candidate" >/dev/null 2>&1; then
            generic=$candidate
            break
        fi
    done
    if [[ -z $generic ]]; then
        say "no headers for kernel $kver and no generic headers package; install some and link them at $build"
        exit 1
    fi
    say "using the generic $generic for kernel $kver"
    apt_install "$generic"
    shopt -s nullglob
    candidates=(/usr/src/linux-headers-*-"$arch" /usr/src/linux-headers-*-generic)
    shopt -u nullglob
    hdr=
    ((${#candidates[@]})) && hdr=$(printf '%s\n' "${candidates[@]}" | sort -V | tail -n 1)
    if [[ -z $hdr ]]; then
        say "$generic installed but no /usr/src/linux-headers-* directory found"
        exit 1
    fi
    # Debian splits linux-headers-X-$arch from linux-headers-X-common; Ubuntu has X-generic and X.
    common=$hdr
    for c in "${hdr%-"$arch"}-common" "${hdr%-generic}"; do
        if [[ $c != "$hdr" && -d $c ]]; then
            common=$c
            break
        fi
    done
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$hdr" "$build"
    ln -sfn "$common" "/lib/modules/$kver/source"
    say "linked $hdr as $build"
fi

if [[ ! -d /sys/kernel/tracing/events && ! -d /sys/kernel/debug/tracing/events ]]; then
    mount -t tracefs tracefs /sys/kernel/tracing
    say "mounted tracefs at /sys/kernel/tracing"
fi
