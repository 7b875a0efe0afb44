#!/bin/sh
# /test.sh for the VFIO end-to-end run (busybox sh, inside the QEMU TCG guest with an emulated
# IOMMU and edu devices bound to vfio-pci; see README.md). Real VFIO, real KVM (nested), real
# execve:
#   1. vmmd boots cpr-testguest with every edu passed through (--device vfio=..., each in its own
#      container), armed with --fault-inject vfio-invalidate-twice (one-shot);
#   2. the guest DMAs through edu (`d`: DMA RAM->edu->RAM, factorial, interrupts);
#   3. `cprctl update` #1: the last container's VADDR invalidation is issued twice, the real kernel
#      refuses the second (EINVAL); vmmd re-maps every container and the guest runs on;
#   4. `d` again, then `cprctl update` #2 succeeds (new process image, same pid, no device reset);
#   5. `d` after the update: DMA lands in the same guest RAM, interrupts still arrive, the run and
#      interrupt counts continue; `v`: guest memory intact (same hash).
# Steps 2-5 take the device's interrupts by MSI (the guest programs the capability vmmd shows);
# then a second vmmd with msi=off does `d`, an update and `d` again by INTx.
# Prints lines starting with "VFIO-E2E"; exits 0 only if every check passed.
set -u
D=/run/vm
VMMD=/bin/vmmd
CPRCTL=/bin/cprctl
GUEST=/bin/cpr-testguest

PREFIX=VFIO-E2E
# shellcheck source=lib.sh
. /lib.sh
say() { echo "VFIO-E2E $*"; }
# ask CMD PREFIX N: send the command byte, wait for the N-th whole line starting with PREFIX (the
# guest frames each line as "\n<LINE>\n"; heartbeat dots never share it), print it.
lines() { tr -d '\r' <"$D/console.out" | sed '$d' | grep -a "^$1"; }
ask() {
    printf %s "$1" >&3
    t=$(up)
    while [ "$(lines "$2" | wc -l)" -lt "$3" ]; do
        [ "$(since "$t" | cut -d. -f1)" -lt 120 ] || fail "no '$2' answer to '$1'"
        kill -0 "$VPID" 2>/dev/null || fail "vmmd exited"
        sleep 0.05
    done
    lines "$2" | sed -n "${3}p"
}
field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

[ -c /dev/kvm ] || fail "/dev/kvm missing"
[ -n "${EDU_BDFS:-}" ] || fail "no edu device bound to vfio-pci"
# start DEVICE_OPTS VMMD_ARGS...: vmmd with every edu passed through (each in its own container,
# DEVICE_OPTS appended to each --device), the console attached through fd 3; waits for READY.
start() {
    opts=$1
    shift
    rm -rf "$D"
    mkdir -p "$D"
    mkfifo "$D/in"
    DEVICES=""
    i=0
    for bdf in $EDU_BDFS; do
        DEVICES="$DEVICES --device vfio=/sys/bus/pci/devices/$bdf,container=c$i$opts"
        i=$((i + 1))
    done
    say "devices:$DEVICES"
    t0=$(up)
    # shellcheck disable=SC2086
    NO_COLOR=1 "$VMMD" --api-socket "$D/api.sock" --kernel "$GUEST" --vcpus 1 --memory size=16M \
        --serial "socket=$D/console.sock" $DEVICES "$@" >"$D/vmmd.log" 2>&1 &
    VPID=$!
    while [ ! -S "$D/console.sock" ]; do
        kill -0 "$VPID" 2>/dev/null || fail "vmmd exited at start"
        sleep 0.02
    done
    "$CPRCTL" console --linger-ms 100 "$D/console.sock" <"$D/in" >"$D/console.out" 2>"$D/console.err" &
    exec 3>"$D/in"
    wait_for READY "$D/console.out" 300 || fail "no READY"
    say "READY after $(since "$t0")s"
}
stop() {
    exec 3>&-
    "$CPRCTL" --socket "$D/api.sock" quit >/dev/null 2>&1 || true
    wait "$VPID" 2>/dev/null
}
# expect_dma LINE IRQ WHAT: LINE is a DMA OK answer that took its interrupts by IRQ (msi|intx).
expect_dma() {
    case "$1" in "DMA OK "*) ;; *) fail "DMA $3: $1" ;; esac
    [ "$(field "$1" irq)" = "$2" ] || fail "DMA $3 used irq=$(field "$1" irq), expected $2"
}

# Part 1: MSI (the guest enables edu's MSI capability as vmmd shows it), a refused update, a good one.
start "" --fault-inject vfio-invalidate-twice
grep -a "VFIO" "$D/vmmd.log" | tr -d '\033' | sed 's/^/VFIO-E2E vmmd: /' | head -n 8
v1=$(ask v "VERIFY" 1)
case "$v1" in "VERIFY OK "*) ;; *) fail "verify at boot: $v1" ;; esac
say "boot: $v1"

d1=$(ask d "DMA" 1)
say "dma before the updates: $d1"
expect_dma "$d1" msi "before the update"

# Update #1: the injected repeat of the last invalidation, refused by the kernel, rolled back.
"$CPRCTL" --socket "$D/api.sock" update --binary "$VMMD" >"$D/update1.out" 2>"$D/update1.err"
rc=$?
sed 's/^/VFIO-E2E update#1: /' "$D/update1.out" "$D/update1.err" | grep -v '^VFIO-E2E update#1: *$' | head -n 40
[ "$rc" = 1 ] || fail "update #1 should have failed (rc $rc)"
grep -q "EINVAL" "$D/update1.err" "$D/update1.out" || fail "update #1 does not name EINVAL"
grep -q "vfio-dma" "$D/update1.err" "$D/update1.out" || fail "update #1 does not show the vfio-dma compensation"
d2=$(ask d "DMA" 2)
say "dma after the refused update: $d2"
expect_dma "$d2" msi "after the rolled-back update"

# Update #2: succeeds.
pid_before=$VPID
t=$(up)
"$CPRCTL" --socket "$D/api.sock" update --binary "$VMMD" >"$D/update2.out" 2>"$D/update2.err" ||
    { cat "$D/update2.out" "$D/update2.err"; fail "update #2"; }
sed 's/^/VFIO-E2E update#2: /' "$D/update2.out" | head -n 30
say "update #2 took $(since "$t")s (wall, inside TCG)"
kill -0 "$pid_before" || fail "vmmd pid changed"
d3=$(ask d "DMA" 3)
say "dma after the update: $d3"
expect_dma "$d3" msi "after the update"
r1=$(field "$d1" runs); r3=$(field "$d3" runs)
i1=$(field "$d1" irqs); i3=$(field "$d3" irqs)
[ "$r3" -gt "$r1" ] || fail "DMA run count did not continue ($r1 -> $r3)"
[ "$i3" -gt "$i1" ] || fail "no interrupts after the update ($i1 -> $i3)"
v2=$(ask v "VERIFY" 2)
[ "$v2" = "$v1" ] || fail "guest memory changed: $v1 -> $v2"
say "after the update: $v2 (same hash); runs $r1 -> $r3, irqs $i1 -> $i3"
grep -a "update-vaddr\|vfio-remap\|VFIO" "$D/vmmd.log" | tr -d '\033' | tail -n 6 | sed 's/^/VFIO-E2E vmmd: /'
stop

# Part 2: INTx (msi=off: the capability is hidden), through one update.
start ",msi=off"
d1=$(ask d "DMA" 1)
say "intx: dma before the update: $d1"
expect_dma "$d1" intx "before the update (INTx)"
"$CPRCTL" --socket "$D/api.sock" update --binary "$VMMD" >"$D/update.out" 2>"$D/update.err" ||
    { cat "$D/update.out" "$D/update.err"; fail "update (INTx)"; }
grep 'guest paused' "$D/update.out" | sed 's/^/VFIO-E2E intx: update: /'
d2=$(ask d "DMA" 2)
say "intx: dma after the update: $d2"
expect_dma "$d2" intx "after the update (INTx)"
[ "$(field "$d2" irqs)" -gt "$(field "$d1" irqs)" ] || fail "no INTx interrupts after the update"
stop
say PASS
exit 0
