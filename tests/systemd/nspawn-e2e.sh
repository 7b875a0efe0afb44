#!/bin/bash
# Runs the deploy/ units under a real systemd (PID 1 in a systemd-nspawn container with /dev/kvm):
# verify, start vmmd@vm1, status, reload (live update: same MainPID), reboot-prep through
# vmmd-cpr-reboot.service, start again with --incoming defer, resume through
# vmmd-cpr-resume.service, guest memory verified, stop.
#
# usage: nspawn-e2e.sh BIN_DIR REPO_ROOT   (BIN_DIR holds vmmd, cprctl, cpr-testguest)
# Exit 0: passed. Exit 77: skipped (not root, no debootstrap/nspawn and no apt, no network for
# debootstrap, no /dev/kvm); the reason is the last line on stderr. Anything else: failed.
# The Debian root is cached in $CPR_ROOTFS_CACHE (default /var/cache/cpr-tests/bookworm-systemd).
set -euo pipefail

BIN_DIR=${1:?usage: nspawn-e2e.sh BIN_DIR REPO_ROOT}
REPO=${2:?usage: nspawn-e2e.sh BIN_DIR REPO_ROOT}
CACHE=${CPR_ROOTFS_CACHE:-/var/cache/cpr-tests/bookworm-systemd}
skip() { echo "SKIP: $*" >&2; exit 77; }
log() { echo "=== $*" >&2; }

[ "$(id -u)" = 0 ] || skip "needs root (debootstrap, systemd-nspawn)"
[ -c /dev/kvm ] || skip "no /dev/kvm"
if ! command -v debootstrap >/dev/null || ! command -v systemd-nspawn >/dev/null; then
    log "installing debootstrap and systemd-container"
    apt-get install -y debootstrap systemd-container >/dev/null 2>&1 \
        || skip "debootstrap/systemd-nspawn are not installed and apt-get cannot install them"
fi
command -v nsenter >/dev/null || skip "nsenter (util-linux) is missing"

if [ ! -x "$CACHE/lib/systemd/systemd" ]; then
    log "debootstrap bookworm into $CACHE (cached for later runs)"
    mkdir -p "$(dirname "$CACHE")"
    rm -rf "$CACHE.tmp"
    if ! debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm "$CACHE.tmp" \
            >/tmp/cpr-debootstrap.log 2>&1; then
        tail -5 /tmp/cpr-debootstrap.log >&2
        rm -rf "$CACHE.tmp"
        skip "debootstrap failed (no network?); see /tmp/cpr-debootstrap.log"
    fi
    mv "$CACHE.tmp" "$CACHE"
fi

WORK=$(mktemp -d /tmp/cpr-nspawn.XXXXXX)
ROOT=$WORK/root
NSPAWN_PID=
cleanup() {
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        kill -TERM "$NSPAWN_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$NSPAWN_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
log "copying the cached root to $ROOT"
cp -a "$CACHE" "$ROOT"

# Install what an operator installs.
install -m 0755 "$BIN_DIR/vmmd" "$BIN_DIR/cprctl" "$ROOT/usr/local/bin/"
install -D -m 0644 "$BIN_DIR/cpr-testguest" "$ROOT/var/lib/vmmd/images/cpr-testguest"
install -m 0644 "$REPO"/deploy/vmmd@.service "$REPO"/deploy/vmmd.target \
    "$REPO"/deploy/vmmd-cpr-reboot.service "$REPO"/deploy/vmmd-cpr-resume.service \
    "$ROOT/etc/systemd/system/"
install -D -m 0644 "$REPO/deploy/vmmd.tmpfiles.conf" "$ROOT/etc/tmpfiles.d/vmmd.conf"
mkdir -p "$ROOT/etc/vmmd"
sed -e 's/^size = .*/size = "64M"/' -e 's/^vcpus = .*/vcpus = 1/' \
    "$REPO/deploy/vm1.toml.example" >"$ROOT/etc/vmmd/vm1.toml"
echo cprtest >"$ROOT/etc/hostname"

log "booting systemd in the container"
systemd-nspawn --register=no --keep-unit -D "$ROOT" --boot --console=pipe --bind=/dev/kvm \
    -M "cprtest$$" >"$WORK/console.log" 2>&1 </dev/null &
NSPAWN_PID=$!
P1=
for _ in $(seq 300); do
    for c in $(pgrep -P "$NSPAWN_PID" || true) ; do
        if [ "$(cat /proc/"$c"/comm 2>/dev/null)" = systemd ]; then P1=$c; fi
    done
    [ -n "$P1" ] && break
    kill -0 "$NSPAWN_PID" 2>/dev/null || { cat "$WORK/console.log" >&2; echo "nspawn exited" >&2; exit 1; }
    sleep 0.1
done
[ -n "$P1" ] || { cat "$WORK/console.log" >&2; echo "no systemd in the container" >&2; exit 1; }
in_ct() { nsenter -t "$P1" -m -u -i -n -p -- "$@"; }
for _ in $(seq 300); do
    state=$(in_ct systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 0.2
done
log "container systemd is $state (PID 1 is host pid $P1)"

log "systemd-analyze verify"
in_ct systemd-analyze verify --man=no /etc/systemd/system/vmmd@vm1.service \
    /etc/systemd/system/vmmd.target /etc/systemd/system/vmmd-cpr-reboot.service \
    /etc/systemd/system/vmmd-cpr-resume.service
in_ct systemctl enable vmmd@vm1.service vmmd.target vmmd-cpr-reboot.service vmmd-cpr-resume.service

cprctl() { in_ct /usr/local/bin/cprctl "$@"; }
guest_verify() {
    printf v | in_ct /usr/local/bin/cprctl console /run/vmmd/vm1.console --linger-ms 1500 \
        | tr -d '.' | grep -a -o 'VERIFY [A-Z]* [0-9a-f]*' | tail -1
}
wait_running() {
    for _ in $(seq 600); do
        s=$(cprctl --socket /run/vmmd/vm1.sock --json status 2>/dev/null \
            | grep -o '"run_state":"[a-z]*"' || true)
        [ "$s" = "$1" ] && return 0
        sleep 0.1
    done
    echo "vmmd@vm1 never reached $1 (last: $s)" >&2; return 1
}
main_pid() { in_ct systemctl show -p MainPID --value vmmd@vm1.service; }

log "systemctl start vmmd@vm1"
in_ct systemctl start vmmd@vm1.service
in_ct systemctl status --no-pager vmmd@vm1.service || true
wait_running '"run_state":"running"'
# The guest fills its RAM before READY: wait for its answer.
sleep 1
V1=$(guest_verify); echo "guest: $V1" >&2
case "$V1" in "VERIFY OK "*) ;; *) echo "no VERIFY OK from the guest: $V1" >&2; exit 1 ;; esac
PID1=$(main_pid)

log "systemctl reload vmmd@vm1 (live update)"
in_ct systemctl reload vmmd@vm1.service
in_ct systemctl status --no-pager vmmd@vm1.service || true
PID2=$(main_pid)
[ "$PID1" = "$PID2" ] || { echo "MainPID changed across reload: $PID1 -> $PID2" >&2; exit 1; }
[ "$(in_ct systemctl is-active vmmd@vm1.service)" = active ] || { echo "not active after reload" >&2; exit 1; }
cprctl --socket /run/vmmd/vm1.sock --json status | grep -q '"update_generation":1' \
    || { echo "update generation is not 1 after reload" >&2; exit 1; }
echo "reload kept MainPID $PID1 and the unit active" >&2

log "a new binary that exits at start (an unknown flag: clap exits 2) is rolled back"
rc=0
cprctl --socket /run/vmmd/vm1.sock update --binary /usr/local/bin/vmmd --new-arg=--bogus-flag || rc=$?
[ "$rc" = 1 ] || { echo "cprctl update with a failing new binary exited $rc, not 1" >&2; exit 1; }
in_ct systemctl status --no-pager vmmd@vm1.service || true
[ "$(in_ct systemctl is-active vmmd@vm1.service)" = active ] \
    || { echo "vmmd@vm1 is not active after the failed update" >&2; exit 1; }
PID3=$(main_pid)
APIPID=$(cprctl --socket /run/vmmd/vm1.sock --json status | grep -o '"pid":[0-9]*' | head -1 | cut -d: -f2)
[ "$PID3" = "$APIPID" ] || { echo "MainPID $PID3 is not the vmmd that answers ($APIPID)" >&2; exit 1; }
cprctl --socket /run/vmmd/vm1.sock --json status | grep -q '"update_generation":1' \
    || { echo "update generation is not 1 after the rolled-back update" >&2; exit 1; }
V3=$(guest_verify); echo "guest: $V3" >&2
[ "$V3" = "$V1" ] || { echo "guest memory changed across the rollback: $V1 -> $V3" >&2; exit 1; }
echo "the failed update left vmmd@vm1 active, MainPID $PID3 running the guest" >&2

log "vmmd-cpr-reboot.service stops: reboot-prep --all"
in_ct systemctl start vmmd-cpr-reboot.service
in_ct systemctl stop vmmd-cpr-reboot.service
in_ct journalctl --no-pager -u vmmd-cpr-reboot.service | tail -25 >&2 || true
in_ct test -f /var/lib/vmmd/cpr/vm1.state.marker.json || { echo "no marker after reboot-prep" >&2; exit 1; }
for _ in $(seq 100); do
    [ "$(in_ct systemctl is-active vmmd@vm1.service || true)" = inactive ] && break; sleep 0.1
done
in_ct systemctl status --no-pager vmmd@vm1.service || true
[ "$(in_ct systemctl is-active vmmd@vm1.service || true)" = inactive ] \
    || { echo "vmmd@vm1 still active after reboot-prep" >&2; exit 1; }

log "after the 'reboot': vmmd@vm1 starts with --incoming defer, vmmd-cpr-resume.service resumes"
in_ct systemctl start vmmd@vm1.service
in_ct systemctl status --no-pager vmmd@vm1.service || true
wait_running '"run_state":"inmigrate"'
in_ct systemctl start vmmd-cpr-resume.service
in_ct journalctl --no-pager -u vmmd-cpr-resume.service | tail -25 >&2 || true
wait_running '"run_state":"running"'
in_ct systemctl status --no-pager vmmd@vm1.service || true
V2=$(guest_verify); echo "guest after resume: $V2" >&2
[ "$V1" = "$V2" ] || { echo "guest memory differs: $V1 before, $V2 after" >&2; exit 1; }
in_ct test ! -e /var/lib/vmmd/cpr/vm1.state.env || { echo "env file not removed" >&2; exit 1; }

log "systemctl stop vmmd@vm1"
in_ct systemctl stop vmmd@vm1.service
in_ct systemctl status --no-pager vmmd@vm1.service || true
echo "PASS: vmmd@vm1 started, reloaded (same MainPID $PID1), prepped, resumed ($V2) and stopped under systemd" >&2
