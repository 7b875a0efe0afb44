#!/bin/sh
# Probe /test.sh (busybox sh, inside the TCG guest): which vmmd step breaks cpr-testguest under the
# nested KVM (TCG-emulated SVM)? pause/resume, save + resume the source, restore into a new vmmd.
# Each step ends with `v` (VERIFY) and a check for PANIC lines. Knob: demo.mem=16M.
set -u
D=/run/vm; VMMD=/bin/vmmd; CPRCTL=/bin/cprctl; GUEST=/bin/cpr-testguest
up() { cut -d' ' -f1 /proc/uptime; }
arg() { v=$(tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n1); echo "${v:-$2}"; }
MEM=$(arg demo.mem 16M)
RESULT=0
mkdir -p "$D"
start() { # N EXTRA-ARGS...: start vmmd N with a console reader on console-N.out
    n=$1; shift
    rm -f "$D/api.sock" "$D/console.sock" "$D/in$n"
    mkfifo "$D/in$n"
    NO_COLOR=1 "$VMMD" --api-socket "$D/api.sock" --kernel "$GUEST" --vcpus 1 --memory "size=$MEM" \
        --serial "socket=$D/console.sock" "$@" >"$D/vmmd-$n.log" 2>&1 &
    VPID=$!
    while [ ! -S "$D/console.sock" ]; do sleep 0.01; done
    "$CPRCTL" console "$D/console.sock" <"$D/in$n" >"$D/console-$n.out" 2>/dev/null &
    exec 3>"$D/in$n"
    OUT=$D/console-$n.out
}
check() { # STEP: send v, wait for an answer or PANIC
    before=$(grep -ac 'VERIFY' "$OUT")
    printf v >&3
    t=$(up)
    while [ "$(grep -ac 'VERIFY' "$OUT")" -le "$before" ] && ! grep -aq PANIC "$OUT"; do
        [ "$(awk -v a="$t" -v b="$(up)" 'BEGIN {print (b - a > 20)}')" = 1 ] && break
        sleep 0.05
    done
    if grep -aq PANIC "$OUT"; then
        echo "PROBE $1: $(grep -ao 'PANIC[^.]*' "$OUT" | head -n1)"; RESULT=1
    elif [ "$(grep -ac 'VERIFY' "$OUT")" -le "$before" ]; then
        echo "PROBE $1: no answer in 20s; console bytes=$(wc -c <"$OUT") dots=$(tr -cd . <"$OUT" | wc -c)"
        tail -n 5 "$D/vmmd-$n.log"; RESULT=1
    else
        echo "PROBE $1: $(grep -ao 'VERIFY [A-Z]* [0-9a-f]*' "$OUT" | tail -n1)"
    fi
}
start 1
while ! grep -aq READY "$OUT"; do sleep 0.05; done
check boot
"$CPRCTL" --socket "$D/api.sock" pause >/dev/null; sleep 0.2
"$CPRCTL" --socket "$D/api.sock" resume >/dev/null
check pause-resume
"$CPRCTL" --socket "$D/api.sock" migrate "file:$D/s1" >/dev/null || echo "PROBE migrate failed"
"$CPRCTL" --socket "$D/api.sock" resume >/dev/null
check save-then-resume-source
"$CPRCTL" --socket "$D/api.sock" pause >/dev/null
"$CPRCTL" --socket "$D/api.sock" migrate "file:$D/s2" >/dev/null || echo "PROBE migrate failed"
"$CPRCTL" --socket "$D/api.sock" quit >/dev/null 2>&1; exec 3>&-; wait "$VPID"
start 2 --incoming "file:$D/s2"
while ! "$CPRCTL" --socket "$D/api.sock" status 2>/dev/null | grep -q paused; do sleep 0.05; done
"$CPRCTL" --socket "$D/api.sock" resume >/dev/null
check restore-into-new-vmmd
"$CPRCTL" --socket "$D/api.sock" quit >/dev/null 2>&1; exec 3>&-; wait "$VPID"
exit $RESULT
