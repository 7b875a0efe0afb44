# Shared by the /test.sh scripts (busybox sh, inside the TCG guest): sourced as /lib.sh.
# The caller sets D (its work directory), VPID (vmmd's pid) and PREFIX (its output lines' prefix).

up() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(up)" 'BEGIN {printf "%.2f", b - a}'; }
fail() {
    echo "$PREFIX FAIL: $*"
    [ -f "$D/vmmd.log" ] && { echo "--- vmmd.log (tail)"; tail -n 40 "$D/vmmd.log"; }
    [ -f "$D/console.out" ] && { echo "--- console (tail)"; tail -c 800 "$D/console.out"; echo; }
    exit 1
}
# wait_for PATTERN FILE TIMEOUT_S: wait until FILE contains PATTERN; 1 on timeout.
wait_for() {
    t=$(up)
    while ! grep -aq "$1" "$2" 2>/dev/null; do
        [ "$(awk -v a="$t" -v b="$(up)" -v l="$3" 'BEGIN {print (b - a > l)}')" = 1 ] && return 1
        kill -0 "$VPID" 2>/dev/null || fail "vmmd exited while waiting for '$1'"
        sleep 0.02
    done
}
