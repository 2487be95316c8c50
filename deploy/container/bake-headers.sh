#!/usr/bin/env bash
# bake-headers.sh: merge Debian's split generic kernel headers into one tree that bcc can take through BCC_KERNEL_SOURCE.
#
# usage: bake-headers.sh SRC DEST [DPKG_ARCH]
#   SRC   a directory holding linux-headers-VER-ARCH and linux-headers-VER-common (as /usr/src does)
#   DEST  the tree to create (must not exist yet)
#
# Why a merge: bcc 0.26 understands Debian's split only as /lib/modules/$kver/build plus
# /lib/modules/$kver/source. Given BCC_KERNEL_SOURCE it compiles inside that one directory with
# -Iinclude, -Iarch/$arch/include/generated and -include ./include/linux/kconfig.h, so the
# generated headers (from -ARCH) and the rest (from -common) must sit in a single tree. The
# container cannot link them under /lib/modules: that is the host's, mounted read-only.
set -euo pipefail

say() { echo "bake-headers: $*" >&2; }

if (($# < 2 || $# > 3)); then
    say "usage: bake-headers.sh SRC DEST [DPKG_ARCH]"
    exit 2
fi
src=$1 dest=$2
arch=${3:-$(dpkg --print-architecture)}

shopt -s nullglob
candidates=("$src"/linux-headers-*-"$arch")
shopt -u nullglob
if ((${#candidates[@]} == 0)); then
    say "no $src/linux-headers-*-$arch (install linux-headers-$arch first)"
    exit 1
fi
hdr=$(printf '%s\n' "${candidates[@]}" | sort -V | tail -n 1)
common=${hdr%-"$arch"}-common
if [[ ! -d $common/include ]]; then
    say "$hdr has no companion $common"
    exit 1
fi
if [[ -e $dest ]]; then
    say "$dest exists already"
    exit 1
fi

mkdir -p "$dest"
cp -a "$common/." "$dest/"
# Only the Makefile (a one-line include of the -common one) and the kbuild links are in both;
# bcc reads neither, so the -common files stay and everything else of -ARCH is added.
shopt -s nullglob dotglob
for entry in "$hdr"/*; do
    case ${entry##*/} in
    Makefile | scripts | tools) ;;
    *) cp -a "$entry" "$dest/" ;;
    esac
done
shopt -u nullglob dotglob
# scripts/ and tools/ link to ../../lib/linux-kbuild-*, outside the tree: dangling once moved.
rm -f "$dest/scripts" "$dest/tools"
# bcc includes arch/$karch/include only; -ARCH ships exactly the one kernel arch it was built for.
for dir in "$dest"/arch/*/; do
    karch=$(basename "$dir")
    [[ -d $hdr/arch/$karch ]] || rm -rf "$dir"
done

for need in include/linux/kconfig.h include/generated/autoconf.h; do
    if [[ ! -f $dest/$need ]]; then
        say "merged tree $dest lacks $need"
        exit 1
    fi
done
# The entrypoint names the headers it falls back to.
basename "$hdr" >"$dest/.origin"
say "merged $(basename "$hdr") and $(basename "$common") into $dest"
