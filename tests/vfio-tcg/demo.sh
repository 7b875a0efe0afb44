#!/usr/bin/env bash
# One command: build vmmd/cprctl/cpr-testguest (release), pack them with demo-test.sh into the
# initramfs and boot it under QEMU TCG (run.sh). Extra arguments go to run.sh (e.g. --edu 2, --smp 2).
# Env: TEST (the /test.sh to pack, default demo-test.sh), CPR_BIN_DIR (use these binaries, no cargo
# build), CARGO_TARGET_DIR, CACHE, plus run.sh's.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${CACHE:-/var/cache/cpr-tests/vfio-tcg}
TEST=${TEST:-$HERE/demo-test.sh}
OUT=$CACHE/$(basename "$TEST" .sh)
if [ -n "${CPR_BIN_DIR:-}" ]; then
    BIN=$CPR_BIN_DIR
else
    command -v cargo >/dev/null || { echo "demo.sh: error: cargo not found (or set CPR_BIN_DIR)" >&2; exit 2; }
    (cd "$REPO" && cargo build --release -p vmmd -p cprctl -p cpr-testguest)
    BIN=${CARGO_TARGET_DIR:-$REPO/target}/x86_64-unknown-linux-gnu/release
fi
for b in vmmd cprctl cpr-testguest; do
    [ -f "$BIN/$b" ] || { echo "demo.sh: error: $BIN/$b missing" >&2; exit 2; }
done
"$HERE/build-initramfs.sh" --out "$OUT" --bin "$BIN/vmmd" --bin "$BIN/cprctl" \
    --file "$BIN/cpr-testguest:/bin/cpr-testguest" --file "$HERE/lib.sh:/lib.sh" --test "$TEST"
exec "$HERE/run.sh" --kernel "$OUT/vmlinuz" --initrd "$OUT/initramfs.cpio.gz" "$@"
