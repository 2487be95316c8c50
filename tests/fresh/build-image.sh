#!/usr/bin/env bash
# build-image.sh: a fresh Debian 12 machine for make test-fresh (mmdebstrap), cached by recipe; prints its directory.
#
# Usage: build-image.sh CACHE_DIR. The image is what a new user starts from: bookworm with only
# systemd-sysv sudo git make ca-certificates iproute2 curl linux-image-amd64 added, a user with
# sudo, DHCP on the first network card, and the host's certificate authorities (the host's
# network may inspect TLS; without them pip fails with CERTIFICATE_VERIFY_FAILED). Nothing of the
# project is installed. One oneshot unit (fresh-run.service) runs /mnt/io/run from the second
# disk at boot and powers off, so the machine needs nobody at the keyboard.
# The cache key is a hash of this file and of the host's CA bundle: change either and the next
# run builds a new image. Output: CACHE_DIR/KEY/{root.img,vmlinuz,initrd.img,build.log}.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: build-image.sh CACHE_DIR" >&2
    exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "build-image.sh: must run as root (mmdebstrap, chroot)" >&2
    exit 1
fi
cache=$1
ca_bundle=/etc/ssl/certs/ca-certificates.crt
key=$(cat "$0" "$ca_bundle" | sha256sum | cut -c1-16)
out=$cache/$key
if [[ -f $out/.complete ]]; then
    echo "$out"
    exit 0
fi

user=newuser
mirror=http://deb.debian.org/debian
security=http://deb.debian.org/debian-security
say() { echo "build-image: $*" >&2; }

rm -rf "$out"
mkdir -p "$out"
root=$out/rootfs
start=$SECONDS
say "mmdebstrap bookworm into $root (log: $out/build.log)"
# The suites a Debian 12 installer sets up, so the kernel is the current one and its headers exist.
mmdebstrap --variant=important \
    --include=systemd-sysv,sudo,git,make,ca-certificates,iproute2,curl,linux-image-amd64 \
    bookworm "$root" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" "deb $security bookworm-security main" \
    >"$out/build.log" 2>&1 || { tail -n 20 "$out/build.log" >&2; say "mmdebstrap failed"; exit 1; }
say "mmdebstrap took $((SECONDS - start)) s"

echo fresh >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tfresh\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
printf '/dev/vda\t/\text4\terrors=remount-ro\t0\t1\n' >"$root/etc/fstab"

# QEMU's user-mode network: DHCP from 10.0.2.2, its DNS relay at 10.0.2.3.
printf '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n' >"$root/etc/systemd/network/20-wired.network"
echo "nameserver 10.0.2.3" >"$root/etc/resolv.conf"
chroot "$root" systemctl enable systemd-networkd.service >>"$out/build.log" 2>&1

chroot "$root" useradd --create-home --shell /bin/bash --groups sudo "$user"
# The script at boot runs unattended, so sudo must not ask for a password.
echo "$user ALL=(ALL) NOPASSWD:ALL" >"$root/etc/sudoers.d/$user"
chmod 0440 "$root/etc/sudoers.d/$user"

mkdir -p "$root/usr/local/share/ca-certificates/host"
awk -v dir="$root/usr/local/share/ca-certificates/host" '
    /-----BEGIN CERTIFICATE-----/ { n++; file = sprintf("%s/host-%03d.crt", dir, n) }
    file { print > file }
    /-----END CERTIFICATE-----/ { close(file); file = "" }' "$ca_bundle"
chroot "$root" update-ca-certificates >>"$out/build.log" 2>&1

cat >"$root/usr/local/sbin/fresh-run" <<'EOF'
#!/bin/bash
# fresh-run: mount the second disk, run its script (as root), power off whatever it returns.
mkdir -p /mnt/io
if mount /dev/vdb /mnt/io && [[ -x /mnt/io/run ]]; then
    /mnt/io/run
    echo "fresh-run: /mnt/io/run exited $?"
else
    echo "fresh-run: no /mnt/io/run on /dev/vdb"
fi
sync
umount /mnt/io
systemctl poweroff --no-block
EOF
chmod 0755 "$root/usr/local/sbin/fresh-run"
cat >"$root/etc/systemd/system/fresh-run.service" <<'EOF'
[Unit]
Description=Run /mnt/io/run from the second disk, then power off
Wants=network-online.target
After=network-online.target multi-user.target
ConditionPathExists=/dev/vdb

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/fresh-run
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=default.target
EOF
chroot "$root" systemctl enable fresh-run.service >>"$out/build.log" 2>&1

kver=$(basename "$(ls -d "$root"/lib/modules/*)")
cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$out/initrd.img"
echo "$kver" >"$out/kernel-release"
# 12 GB sparse: make test's packages and the virtualenvs take about 3 GB.
mkfs.ext4 -q -L fresh-root -d "$root" "$out/root.img" 12G >>"$out/build.log"
du -sm "$root" | cut -f1 >"$out/rootfs-mb"
rm -rf "$root"
echo "$((SECONDS - start))" >"$out/build-seconds"
touch "$out/.complete"
# Images of older recipes are of no further use: about 1 GB each.
find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
say "image $out (kernel $kver) built in $((SECONDS - start)) s"
echo "$out"
