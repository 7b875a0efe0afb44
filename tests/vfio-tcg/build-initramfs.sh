#!/usr/bin/env bash
# Builds the kernel + initramfs that run.sh boots under QEMU TCG (see README.md).
#
# Usage: build-initramfs.sh [--out DIR] [--bin PATH[:DEST]]... [--file SRC:DEST]... [--test SCRIPT]
#                           [--module NAME]...
#   --out DIR         where vmlinuz and initramfs.cpio.gz go (default $CACHE/out)
#   --bin PATH[:DEST] copy an executable (to DEST, default /bin/<name>) plus every library ldd lists
#   --file SRC:DEST   copy a file as is (mode kept)
#   --test SCRIPT     shorthand for --file SCRIPT:/test.sh (run by /init, its rc is reported)
#   --module NAME     load one more kernel module (its dependencies are added)
# Env: KERNEL_PKG (default: the image package linux-image-cloud-amd64 depends on in bookworm),
#      CACHE (default /var/cache/cpr-tests/vfio-tcg).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${CACHE:-/var/cache/cpr-tests/vfio-tcg}
OUT=$CACHE/out
BINS=()
FILES=()
EXTRA_MODULES=()
# What /init loads; dependencies (from each module's modinfo `depends=`) are added and ordered.
MODULES=(irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci kvm kvm-amd)

die() { echo "build-initramfs: error: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian package '$2'"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --bin) BINS+=("$2"); shift 2 ;;
        --file) FILES+=("$2"); shift 2 ;;
        --test) FILES+=("$2:/test.sh"); shift 2 ;;
        --module) EXTRA_MODULES+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
MODULES+=(${EXTRA_MODULES[@]+"${EXTRA_MODULES[@]}"})

need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need ldd libc-bin
need gzip gzip

mkdir -p "$CACHE" "$OUT"

# --- fetch the kernel and busybox (.deb files cached in $CACHE) ---
if [ -z "${KERNEL_PKG:-}" ]; then
    # The bookworm (not backports) candidate of the cloud meta-package, e.g. 6.1.x.
    meta_ver=$(apt-cache policy linux-image-cloud-amd64 | awk '/Candidate:/ {print $2}')
    [ -n "$meta_ver" ] && [ "$meta_ver" != "(none)" ] ||
        die "apt knows no linux-image-cloud-amd64: run 'apt-get update' (bookworm main must be in sources)"
    KERNEL_PKG=$(apt-cache show "linux-image-cloud-amd64=$meta_ver" |
        sed -n 's/^Depends: *\(linux-image-[^ ,]*\).*/\1/p' | head -n1)
    [ -n "$KERNEL_PKG" ] || die "cannot tell which image package linux-image-cloud-amd64=$meta_ver depends on"
fi

fetch() { # PKG -> path of the cached .deb
    local pkg=$1 ver deb
    ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
    [ -n "$ver" ] && [ "$ver" != "(none)" ] ||
        die "apt has no candidate for Debian package '$pkg': run 'apt-get update'"
    deb=$(ls "$CACHE/${pkg}_"*"_amd64.deb" 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        echo "build-initramfs: downloading $pkg=$ver" >&2
        # apt's _apt user may not write to $CACHE; download in a temp dir it can write to.
        local tmp
        tmp=$(mktemp -d)
        chmod 777 "$tmp"
        (cd "$tmp" && apt-get download -q "$pkg=$ver" >&2) ||
            die "apt-get download $pkg=$ver failed (Debian package '$pkg')"
        mv "$tmp"/*.deb "$CACHE/"
        rmdir "$tmp"
        deb=$(ls "$CACHE/${pkg}_"*"_amd64.deb" | head -n1)
    fi
    echo "$deb"
}

KDEB=$(fetch "$KERNEL_PKG")
BDEB=$(fetch busybox-static)

WORK=$(mktemp -d /tmp/vfio-tcg-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
dpkg-deb -x "$KDEB" "$WORK/kpkg"
dpkg-deb -x "$BDEB" "$WORK/bbpkg"
KVER=$(ls "$WORK/kpkg/lib/modules" | head -n1)
MODDIR=$WORK/kpkg/lib/modules/$KVER
[ -f "$WORK/kpkg/boot/vmlinuz-$KVER" ] || die "$KDEB has no boot/vmlinuz-$KVER"
BB=$WORK/bbpkg/bin/busybox
[ -x "$BB" ] || die "$BDEB has no bin/busybox"

# --- resolve modules and their order ---
norm() { echo "$1" | tr '-' '_'; }
declare -A MODPATH=()
while IFS= read -r f; do
    b=$(basename "$f"); b=${b%%.ko*}
    MODPATH[$(norm "$b")]=$f
done < <(cd "$MODDIR" && find kernel -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')

is_builtin() { tr '-' '_' < "$MODDIR/modules.builtin" | grep -q "/$(norm "$1")\.ko$"; }

ko_plain() { # module path -> uncompressed .ko on stdout
    case "$1" in
        *.ko) cat "$1" ;;
        *.ko.xz) need xz xz-utils; xz -dc "$1" ;;
        *.ko.zst) need zstd zstd; zstd -dc "$1" ;;
        *.ko.gz) gzip -dc "$1" ;;
    esac
}

declare -A STATE=()
ORDER=()
visit() { # depth-first: dependencies first
    local m deps d
    m=$(norm "$1")
    case "${STATE[$m]:-}" in done) return ;; active) die "module dependency cycle at $m" ;; esac
    if [ -z "${MODPATH[$m]:-}" ]; then
        if is_builtin "$m"; then STATE[$m]=done; echo "build-initramfs: $m is built in" >&2; return; fi
        die "kernel $KVER has no module $m (not in $KERNEL_PKG, not built in)"
    fi
    STATE[$m]=active
    deps=$(ko_plain "$MODDIR/${MODPATH[$m]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)
    for d in ${deps//,/ }; do visit "$d"; done
    STATE[$m]=done
    ORDER+=("$m")
}
for m in "${MODULES[@]}"; do visit "$m"; done

# --- assemble the root ---
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,lib/modules,usr/bin,usr/sbin}
cp "$BB" "$ROOT/bin/busybox"
for applet in $("$BB" --list); do
    [ -e "$ROOT/bin/$applet" ] || ln -s busybox "$ROOT/bin/$applet"
done
: > "$ROOT/etc/modules.list"
for m in "${ORDER[@]}"; do
    ko_plain "$MODDIR/${MODPATH[$m]}" > "$ROOT/lib/modules/$m.ko"
    echo "$m" >> "$ROOT/etc/modules.list"
done
echo "$KVER" > "$ROOT/etc/kernel-version"
cp "$HERE/init" "$ROOT/init"
chmod 755 "$ROOT/init"

copy_into_root() { # SRC DEST
    mkdir -p "$ROOT$(dirname "$2")"
    cp -L --preserve=mode "$1" "$ROOT$2"
}
for spec in ${BINS[@]+"${BINS[@]}"}; do
    src=${spec%%:*}
    if [ "$src" = "$spec" ]; then dest=/bin/$(basename "$src"); else dest=${spec#*:}; fi
    [ -x "$src" ] || die "--bin $src: not an executable file"
    copy_into_root "$src" "$dest"
    if ldd "$src" >/dev/null 2>&1; then
        # "libx.so => /path (0x..)" and "/lib64/ld-linux-x86-64.so.2 (0x..)"; skip linux-vdso.
        ldd "$src" | awk '/=> \// {print $3} /^[[:space:]]*\// {print $1}' | while read -r lib; do
            [ -e "$ROOT$lib" ] || copy_into_root "$lib" "$lib"
        done
    fi
done
for spec in ${FILES[@]+"${FILES[@]}"}; do
    src=${spec%%:*}; dest=${spec#*:}
    [ "$src" != "$spec" ] && [ -n "$dest" ] || die "--file wants SRC:DEST, got '$spec'"
    [ -f "$src" ] || die "--file $src: no such file"
    copy_into_root "$src" "$dest"
done

# --- pack ---
cp "$WORK/kpkg/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
(cd "$ROOT" && find . -mindepth 1 | "$BB" cpio -o -H newc 2>/dev/null) | gzip -1 > "$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
echo "build-initramfs: kernel $KVER ($KERNEL_PKG), modules in load order: ${ORDER[*]}" >&2
echo "build-initramfs: wrote $OUT/vmlinuz and $OUT/initramfs.cpio.gz ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1))" >&2
