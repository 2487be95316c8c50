#!/usr/bin/env bash
# setup-host.sh: prepare a Debian/Ubuntu host for tcpstate: OS packages, kernel headers, tracefs. Idempotent.
#
# Usage: setup-host.sh [--test] [--vm]. Without arguments: what the daemon needs (make run, make
# install); --test adds the tools of make test, --vm those of the machines that make test-kernels
# and make test-fresh boot under QEMU.
#
# bcc compiles the BPF program at load time and insists on kernel headers under
# /lib/modules/$(uname -r)/build. Exact headers are used when the distribution has
# them; otherwise its generic headers are linked there. tcpstate reads tracepoint
# arguments only (their layout comes from the running kernel), so mismatched
# headers are safe for it.
set -euo pipefail

# What the daemon needs at run time (the container image installs the same).
runtime=(python3-bpfcc python3-venv)
# What building its socket-table counter (monitor/_tally.so) needs: gcc alone has no C library
# headers (a fresh Debian 12 stops at errno.h without libc6-dev).
compiler=(gcc libc6-dev)
# make test's tools:
# iproute2, curl: namespaces and scrapes; prometheus (with promtool): rules and scrapes;
# nftables: a kernel test plays an on-path device that rejects requests with resets;
# python3-seccomp: the systemd test applies the unit's system-call filters as systemd would;
# bpftool: the fault tests check that no program or map outlives a killed daemon;
# bpfcc-tools: `make bench` runs bcc's tcpstates beside tcpstate; shellcheck: the scripts' lint;
# chromium: the page test loads / in headless Chromium (tests/kernel/test_page.py);
# tcpdump, tshark: the Wireshark tests capture their traffic and count with tshark's TCP analysis as the oracle
testing=(python3-pip iproute2 prometheus curl nftables python3-seccomp bpftool bpfcc-tools shellcheck chromium
         tcpdump tshark)
# The machines booted under QEMU, kept out of make test (busybox-static alone has the
# initramfs rebuilt): qemu-system-x86, busybox-static, kmod, xz-utils, zstd: `make test-kernels`
# boots Debian's kernels (virtme-ng); mmdebstrap, qemu-utils, e2fsprogs: `make test-fresh` builds
# a fresh Debian 12 and boots it
machines=(qemu-system-x86 busybox-static kmod xz-utils zstd mmdebstrap qemu-utils e2fsprogs)

packages=("${runtime[@]}" "${compiler[@]}")
for arg in "$@"; do
    case $arg in
        --test)
            packages+=("${testing[@]}")
            # kubectl: a unit test builds deploy/kubernetes with `kubectl kustomize` (Debian: kubernetes-client)
            command -v kubectl >/dev/null || packages+=(kubernetes-client)
            ;;
        --vm) packages+=("${machines[@]}") ;;
        *)
            echo "setup-host: unknown argument '$arg' (usage: setup-host.sh [--test] [--vm])" >&2
            exit 2
            ;;
    esac
done

start=$SECONDS
say() { echo "setup-host: $*" >&2; }
took() { say "  ... $((SECONDS - $1)) s"; }

if [[ $(id -u) -ne 0 ]]; then
    say "must run as root (sudo make setup)"
    exit 1
fi

kver=$(uname -r)
arch=$(dpkg --print-architecture)

# Services that a package would start and enable (Debian's prometheus does both) stay off: a
# policy-rc.d refuses every start during the install, then the units that the newly installed
# packages ship and enabled are disabled (and stopped, should one have started). Units of
# packages that were already there are the owner's and are never touched.
policy=/usr/sbin/policy-rc.d
own_policy=
cleanup() { if [[ -n $own_policy ]]; then rm -f "$policy"; fi; }
trap cleanup EXIT

installed() { dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' | awk '$1 == "ii" {print $2}' | sort; }

apt_updated=
apt_get() {
    # Another apt (a fresh machine's apt-daily) may hold the lock for a while: wait for it.
    DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0 "$@"
}
apt_install() {
    if [[ -z $apt_updated ]]; then
        say "apt-get update"
        apt_get update
        apt_updated=1
    fi
    local before new unit
    before=$(installed)
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# setup-host.sh: no service starts during its install\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        own_policy=1
    fi
    apt_get install -y --no-install-recommends "$@"
    cleanup
    own_policy=
    mapfile -t new < <(comm -13 <(echo "$before") <(installed))
    ((${#new[@]})) || return 0
    say "  $((${#new[@]})) packages installed"
    for unit in $(dpkg -L "${new[@]}" | grep -E '/systemd/system/[^/@]+\.(service|socket|timer|path)$' | xargs -r -n1 basename | sort -u); do
        if [[ $(systemctl is-enabled "$unit" 2>/dev/null) == enabled ]]; then
            say "  disabling $unit (from a package just installed: setup leaves no service on)"
            systemctl disable --quiet "$unit"
        fi
        if [[ -d /run/systemd/system ]] && systemctl --quiet is-active "$unit"; then
            say "  stopping $unit"
            systemctl stop "$unit"
        fi
    done
}

t=$SECONDS
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    say "[1/3] OS packages: installing ${missing[*]} (and what they depend on)"
    apt_install "${missing[@]}"
    took "$t"
else
    say "[1/3] OS packages: all ${#packages[@]} present"
fi

t=$SECONDS
build=/lib/modules/$kver/build
if [[ -d $build/include ]]; then
    say "[2/3] kernel headers: $build"
else
    say "[2/3] kernel headers for $kver"
    if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
        apt_install "linux-headers-$kver"
    else
        say "  no package linux-headers-$kver"
    fi
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
    say "  using the generic $generic for kernel $kver"
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
    say "  linked $hdr as $build"
fi
((SECONDS - t > 1)) && took "$t"

if [[ ! -d /sys/kernel/tracing/events && ! -d /sys/kernel/debug/tracing/events ]]; then
    mount -t tracefs tracefs /sys/kernel/tracing
    say "[3/3] tracefs: mounted at /sys/kernel/tracing"
else
    say "[3/3] tracefs: mounted"
fi
say "host ready in $((SECONDS - start)) s"
