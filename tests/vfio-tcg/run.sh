#!/usr/bin/env bash
# Boots the vfio-tcg kernel + initramfs (from build-initramfs.sh) in QEMU under TCG with an emulated
# Intel IOMMU and QEMU `edu` device(s); streams the console; exits with /test.sh's rc.
#
# Usage: run.sh [--kernel F] [--initrd F] [--edu N] [--smp N] [--mem MIB] [--timeout S]
#               [--log F] [--shell] [-- EXTRA QEMU ARGS...]
# Env (same meaning): KERNEL INITRD EDU_DEVICES (1) SMP (1) MEM_MIB (1024) TIMEOUT_S (600) LOG
#                     APPEND (extra kernel command line) QEMU (qemu-system-x86_64)
# Exit: /test.sh's rc (from the TCG-TEST-EXIT line); 124 on timeout; 125 if that line is missing.
set -euo pipefail

CACHE=${CACHE:-/var/cache/cpr-tests/vfio-tcg}
KERNEL=${KERNEL:-$CACHE/out/vmlinuz}
INITRD=${INITRD:-$CACHE/out/initramfs.cpio.gz}
EDU_DEVICES=${EDU_DEVICES:-1}
SMP=${SMP:-1}
MEM_MIB=${MEM_MIB:-1024}
TIMEOUT_S=${TIMEOUT_S:-600}
LOG=${LOG:-}
APPEND=${APPEND:-}
QEMU=${QEMU:-qemu-system-x86_64}
SHELL_MODE=0
EXTRA=()

die() { echo "run.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --kernel) KERNEL=$2; shift 2 ;;
        --initrd) INITRD=$2; shift 2 ;;
        --edu) EDU_DEVICES=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        --mem) MEM_MIB=$2; shift 2 ;;
        --timeout) TIMEOUT_S=$2; shift 2 ;;
        --log) LOG=$2; shift 2 ;;
        --shell) SHELL_MODE=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

command -v "$QEMU" >/dev/null || die "$QEMU not found: install Debian package qemu-system-x86 (bookworm-backports, QEMU >= 10)"
command -v timeout >/dev/null || die "timeout not found: install Debian package coreutils"
[ -f "$KERNEL" ] || die "no kernel at $KERNEL: run tests/vfio-tcg/build-initramfs.sh first"
[ -f "$INITRD" ] || die "no initramfs at $INITRD: run tests/vfio-tcg/build-initramfs.sh first"
case "$EDU_DEVICES" in ''|*[!0-9]*) die "--edu/EDU_DEVICES must be a number" ;; esac

OWN_LOG=0
if [ -z "$LOG" ]; then LOG=$(mktemp /tmp/vfio-tcg-console.XXXXXX); OWN_LOG=1; fi

args=(
    -accel tcg -machine q35,kernel-irqchip=split -cpu max -smp "$SMP" -m "$MEM_MIB"
    -device intel-iommu,intremap=on,caching-mode=on
)
for _ in $(seq 1 "$EDU_DEVICES"); do args+=(-device edu); done
[ $SHELL_MODE = 1 ] && APPEND="$APPEND tcg.shell=1"
args+=(
    -kernel "$KERNEL" -initrd "$INITRD"
    -append "console=ttyS0 intel_iommu=on iommu=pt panic=-1 $APPEND"
    -nographic -no-reboot
    ${EXTRA[@]+"${EXTRA[@]}"}
)

echo "run.sh: $QEMU ${args[*]}" >&2
start=$(date +%s.%N)
now() { awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN {printf "%.2f", n - s}'; }
set +o pipefail
if [ $SHELL_MODE = 1 ]; then
    timeout --foreground "$TIMEOUT_S" "$QEMU" "${args[@]}" 2>&1 | tee "$LOG"
    rc=${PIPESTATUS[0]}
else
    # TCG- lines get the host's seconds since QEMU started appended.
    timeout "$TIMEOUT_S" "$QEMU" "${args[@]}" </dev/null 2>&1 | while IFS= read -r line; do
        line=${line%$'\r'}
        case "$line" in
            TCG-*) printf '%s [host +%ss]\n' "$line" "$(now)" ;;
            *) printf '%s\n' "$line" ;;
        esac
    done | tee "$LOG"
    rc=${PIPESTATUS[0]}
fi
set -o pipefail
elapsed=$(now)

exit_line=$(grep -a '^TCG-TEST-EXIT ' "$LOG" | tail -n1 || true)
[ $OWN_LOG = 1 ] && rm -f "$LOG"
if [ "$rc" = 124 ]; then
    echo "run.sh: QEMU timed out after ${TIMEOUT_S}s (total ${elapsed}s)" >&2
    exit 124
fi
if [ -z "$exit_line" ]; then
    echo "run.sh: no TCG-TEST-EXIT line (QEMU exited with $rc after ${elapsed}s)" >&2
    exit 125
fi
test_rc=${exit_line#TCG-TEST-EXIT }
test_rc=${test_rc%% *}
echo "run.sh: /test.sh exited with $test_rc; QEMU ran ${elapsed}s" >&2
exit "$test_rc"
