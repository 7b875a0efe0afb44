#!/usr/bin/env python3
"""Boots cpr-testguest under QEMU/KVM and drives its COM1 protocol (a manual smoke test).

usage: qemu-smoke.py GUEST_ELF [--smp N] [--mem MIB] [--cmds vcvcq] [--wait SECONDS]

Starts QEMU with COM1 on a unix socket, waits for READY, sends each command character in turn
(waiting for its reply line), counts heartbeat dots, and checks that `q` powers QEMU off.
Exits non-zero on any FAIL/VERIFY FAIL/PANIC line or a missing reply.
"""
import argparse, os, re, socket, subprocess, sys, tempfile, time

REPLY = {"v": r"VERIFY (OK|FAIL)", "c": r"COUNTERS ", "s": r"WAKE", "q": r"POWEROFF"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("elf")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--mem", type=int, default=512)
    ap.add_argument("--cmds", default="cvcq")
    ap.add_argument("--wait", type=float, default=0.5, help="seconds of heartbeats between commands")
    ap.add_argument("--timeout", type=float, default=60)
    a = ap.parse_args()

    sock_path = os.path.join(tempfile.mkdtemp(), "com1.sock")
    qemu = subprocess.Popen([
        "qemu-system-x86_64", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-smp", str(a.smp), "-m", str(a.mem), "-display", "none", "-monitor", "none",
        "-no-reboot", "-serial", f"unix:{sock_path},server=on,wait=on", "-kernel", a.elf,
    ])
    for _ in range(100):
        if os.path.exists(sock_path):
            break
        time.sleep(0.05)
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    # Read promptly: a 1-byte write costs QEMU's unix socket a whole buffer slot, so a slow reader
    # fills the socket, QEMU's UART then holds "transmitter empty" clear and the guest's heartbeat
    # slows down to the reader's pace.
    s.settimeout(0.005)
    buf = b""
    ok = True

    def read_until(pattern, timeout):
        """Reads until `pattern` matches (None: for `timeout` seconds); returns the match."""
        nonlocal buf
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = pattern and re.search(pattern.encode(), buf)
            if m:
                return m
            try:
                data = s.recv(65536)
                if not data:
                    break
                buf += data
            except socket.timeout:
                pass
            if qemu.poll() is not None:
                break
        return pattern and re.search(pattern.encode(), buf)

    t0 = time.time()
    m = read_until(r"\nREADY [^\n]*\n", a.timeout)
    if not m:
        print("no READY; output:", buf.decode(errors="replace")[-2000:])
        qemu.kill()
        return 1
    t_ready = time.time()
    dots_at_ready = buf.count(b".")
    print(f"READY after {t_ready - t0:.2f}s")
    for c in a.cmds:
        read_until(None, a.wait)  # keep reading: see settimeout above
        s.send(c.encode() + b"\n")
        pat = REPLY.get(c)
        if pat is None:
            continue
        m = read_until(r"\n" + pat + r"[^\n]*\n", a.timeout)
        if not m:
            print(f"command {c!r}: no reply")
            ok = False
            break
        if c == "q":
            try:
                qemu.wait(timeout=5)
                print(f"q: QEMU exited with {qemu.returncode}")
            except subprocess.TimeoutExpired:
                print("q: QEMU still running")
                ok = False
    lines = [l for l in buf.decode(errors="replace").split("\n") if l and set(l) != {"."}]
    dots = buf.count(b".") - dots_at_ready
    print(f"heartbeats after READY: {dots} in {time.time() - t_ready:.2f}s "
          f"({dots / (time.time() - t_ready):.0f}/s, commands included)")
    for l in lines:
        print("  " + l.strip("."))
        if l.startswith(("FAIL", "VERIFY FAIL", "PANIC")):
            ok = False
    if qemu.poll() is None:
        qemu.kill()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
