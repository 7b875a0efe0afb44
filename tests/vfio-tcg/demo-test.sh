#!/bin/sh
# Demo /test.sh (busybox sh, inside the TCG guest): checks /dev/vfio/<group> and /dev/kvm, boots
# cpr-testguest under vmmd on the nested KVM, times start -> READY and the heartbeat rate, verifies
# the guest, live-updates vmmd (cpr-exec) to the same binary, verifies again, then runs `cprctl demo`.
# Knobs on the kernel command line (run.sh APPEND=...): demo.mem=16M demo.vcpus=1 demo.updates=2
# demo.update=0 (skip the live-update steps) demo.cprdemo=0 (skip `cprctl demo`) demo.hbsecs=5.
# Exits 0 only if every step passed.
set -u
D=/run/vm
VMMD=/bin/vmmd
CPRCTL=/bin/cprctl
GUEST=/bin/cpr-testguest

PREFIX=DEMO
# shellcheck source=lib.sh
. /lib.sh
arg() { v=$(tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n1); echo "${v:-$2}"; }

MEM=$(arg demo.mem 16M)
VCPUS=$(arg demo.vcpus 1)
UPDATES=$(arg demo.updates 2)
UPDATE=$(arg demo.update 1)
CPRDEMO=$(arg demo.cprdemo 1)
[ "$UPDATE" = 1 ] || CPRDEMO=0
RC=0
HBSECS=$(arg demo.hbsecs 5)

# (a) the environment
[ -c /dev/kvm ] || fail "/dev/kvm missing"
[ -c /dev/vfio/vfio ] || fail "/dev/vfio/vfio missing"
[ -n "${EDU_GROUPS:-}" ] || fail "no edu device bound to vfio-pci"
for g in $EDU_GROUPS; do
    [ -c "/dev/vfio/$g" ] || fail "/dev/vfio/$g missing"
    echo "DEMO ok /dev/vfio/$g"
done
echo "DEMO ok /dev/kvm"

# (b) vmmd + cpr-testguest under the nested KVM
mkdir -p "$D"
mkfifo "$D/in"
t0=$(up)
NO_COLOR=1 "$VMMD" --api-socket "$D/api.sock" --kernel "$GUEST" --vcpus "$VCPUS" --memory "size=$MEM" \
    --serial "socket=$D/console.sock" >"$D/vmmd.log" 2>&1 &
VPID=$!
while [ ! -S "$D/console.sock" ]; do
    kill -0 "$VPID" 2>/dev/null || fail "vmmd exited at start"
    sleep 0.01
done
# The console stays attached while fd 3 (the fifo's write end) is open.
"$CPRCTL" console --linger-ms 100 "$D/console.sock" <"$D/in" >"$D/console.out" 2>"$D/console.err" &
CPID=$!
exec 3>"$D/in"
echo "DEMO vmmd started pid=$VPID mem=$MEM vcpus=$VCPUS; console socket after $(since "$t0")s"
wait_for "READY" "$D/console.out" 300 || fail "no READY within 300s"
echo "DEMO READY after $(since "$t0")s (vmmd start -> READY): $(grep -ao 'READY[^.]*' "$D/console.out" | head -n1)"
grep -ao 'BOOT [^.]*' "$D/console.out" | head -n1 | sed 's/^/DEMO guest: /'
API=$("$CPRCTL" --socket "$D/api.sock" status 2>&1 | head -n3 | tr '\n' ' ')
echo "DEMO status: $API"

hb() { tr -cd . <"$D/console.out" | wc -c; }
h1=$(hb); s1=$(up)
sleep "$HBSECS"
h2=$(hb); s2=$(up)
echo "DEMO heartbeat $(awk -v h="$((h2 - h1))" -v a="$s1" -v b="$s2" 'BEGIN {printf "%d beats in %.2fs = %.0f/s", h, b - a, h / (b - a)}')"

verify() { # N: send `v`, wait for the N-th VERIFY line
    printf v >&3
    t=$(up)
    while [ "$(grep -ac 'VERIFY' "$D/console.out")" -lt "$1" ]; do
        [ "$(since "$t" | cut -d. -f1)" -lt 120 ] || fail "no VERIFY answer"
        sleep 0.02
    done
    line=$(grep -ao 'VERIFY [A-Z]* [0-9a-f]*' "$D/console.out" | sed -n "${1}p")
    echo "DEMO verify $1 after $(since "$t")s: $line"
    case "$line" in "VERIFY OK "*) ;; *) fail "verify: $line" ;; esac
}
verify 1
hash1=$(grep -ao 'VERIFY OK [0-9a-f]*' "$D/console.out" | sed -n 1p)

# Live update (cpr-exec) to the same binary.
if [ "$UPDATE" = 1 ]; then
t=$(up)
if "$CPRCTL" --socket "$D/api.sock" update --binary "$VMMD" >"$D/update.out" 2>"$D/update.err"; then
    echo "DEMO cprctl update ok in $(since "$t")s (wall, inside TCG)"
    grep -E 'guest paused|update total|^ +(pause|save-state|exec|startup|load-state|restore|resume) ' \
        "$D/update.out" | sed 's/^ */DEMO   /'
else
    rc=$?
    echo "DEMO cprctl update FAILED rc=$rc after $(since "$t")s"
    cat "$D/update.out" "$D/update.err"
    fail "cprctl update"
fi
kill -0 "$CPID" 2>/dev/null || echo "DEMO note: the console connection closed across the update"
if kill -0 "$CPID" 2>/dev/null; then
    verify 2
    hash2=$(grep -ao 'VERIFY OK [0-9a-f]*' "$D/console.out" | sed -n 2p)
    [ "$hash1" = "$hash2" ] || fail "hash changed across the update: $hash1 -> $hash2"
    echo "DEMO guest intact across the update (same hash)"
fi
fi
exec 3>&-
"$CPRCTL" --socket "$D/api.sock" quit >/dev/null 2>&1 || true
wait "$VPID" 2>/dev/null
wait "$CPID" 2>/dev/null

if [ "$CPRDEMO" = 1 ]; then
    echo "DEMO running: cprctl demo --vcpus $VCPUS --memory $MEM --updates $UPDATES"
    t=$(up)
    "$CPRCTL" demo --no-build --vmmd "$VMMD" --kernel "$GUEST" --vcpus "$VCPUS" --memory "$MEM" \
        --updates "$UPDATES" --dir /run/cprdemo --keep >"$D/cprdemo.out" 2>&1
    rc=$?
    grep -v 'cprctl demo: update [0-9]*: \[' "$D/cprdemo.out" | sed 's/^/DEMO cprctl-demo: /'
    echo "DEMO cprctl demo rc=$rc, took $(since "$t")s"
    [ "$rc" = 0 ] || RC=1
fi
if [ "$RC" = 0 ]; then echo "DEMO PASS"; else echo "DEMO FAIL (see above)"; fi
exit "$RC"
