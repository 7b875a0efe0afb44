#!/usr/bin/env python3
"""Boots cpr-testguest under QEMU/KVM and drives its COM1 protocol (a manual smoke test).

usage: qemu-smoke.py GUEST_ELF [--smp N] [--mem MIB] [--machine pc|q35] [--edu [--irq msi|intx]]
                    [--cmds vcvcq] [--wait SECONDS]

Starts QEMU with COM1 on a unix socket, waits for READY, sends each command character in turn
(waiting for its reply line), counts heartbeat dots, and checks that `q` powers QEMU off.
Exits non-zero on any FAIL/VERIFY FAIL/PANIC line or a missing reply.

--edu adds QEMU's edu PCI device (`-device edu`) and makes the default commands `vdddvcq`; each
`d` must then answer `DMA OK` with `runs` one more and `irqs` three more than the previous one,
and `irq=msi` (QEMU's edu device has an MSI capability, which the guest uses; --irq intx expects
INTx instead, for a device without one). Without --edu, `d` must answer `DMA FAIL nodevice`.
"""
import argparse, os, re, socket, subprocess, sys, tempfile, time

REPLY = {"v": r"VERIFY (OK|FAIL)", "c": r"COUNTERS ", "s": r"WAKE", "q": r"POWEROFF",
         "d": r"DMA (OK|FAIL)"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("elf")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--mem", type=int, default=512)
    ap.add_argument("--machine", default="pc")
    ap.add_argument("--edu", action="store_true", help="add -device edu and check `d` answers")
    ap.add_argument("--irq", choices=("msi", "intx"), default="msi",
                    help="the interrupt mode `d` must report with --edu (default msi)")
    ap.add_argument("--cmds", default=None, help="default: cvcq, or vdddvcq with --edu")
    ap.add_argument("--wait", type=float, default=0.5, help="seconds of heartbeats between commands")
    ap.add_argument("--timeout", type=float, default=60)
    a = ap.parse_args()
    if a.cmds is None:
        a.cmds = "vdddvcq" if a.edu else "cvcq"

    sock_path = os.path.join(tempfile.mkdtemp(), "com1.sock")
    qemu = subprocess.Popen([
        "qemu-system-x86_64", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-M", a.machine, "-smp", str(a.smp), "-m", str(a.mem), "-display", "none",
        "-monitor", "none", "-no-reboot", "-serial", f"unix:{sock_path},server=on,wait=on",
        "-kernel", a.elf,
    ] + (["-device", "edu"] if a.edu else []))
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

    def read_until(pattern, timeout, start=0):
        """Reads until `pattern` matches in buf[start:] (None: for `timeout` seconds); returns the
        match."""
        nonlocal buf
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = pattern and re.compile(pattern.encode()).search(buf, start)
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
        return pattern and re.compile(pattern.encode()).search(buf, start)

    t0 = time.time()
    m = read_until(r"\nREADY [^\n]*\n", a.timeout)
    if not m:
        print("no READY; output:", buf.decode(errors="replace")[-2000:])
        qemu.kill()
        return 1
    t_ready = time.time()
    dots_at_ready = buf.count(b".")
    print(f"READY after {t_ready - t0:.2f}s")
    last_dma = None  # (runs, irqs) of the previous DMA OK
    for c in a.cmds:
        read_until(None, a.wait)  # keep reading: see settimeout above
        sent_at, t_sent = len(buf), time.time()
        s.send(c.encode() + b"\n")
        pat = REPLY.get(c)
        if pat is None:
            continue
        m = read_until(r"\n" + pat + r"[^\n]*\n", a.timeout, sent_at)
        if not m:
            print(f"command {c!r}: no reply")
            ok = False
            break
        if c == "d":
            reply = m.group(0).decode(errors="replace").strip()
            print(f"d: answered in {time.time() - t_sent:.3f}s")
            if not a.edu:
                if not reply.startswith("DMA FAIL nodevice"):
                    print(f"d without an edu device: {reply!r}, expected DMA FAIL nodevice")
                    ok = False
                continue
            d = re.match(r"DMA OK bdf=\S+ runs=(\d+) irqs=(\d+) hash=[0-9a-f]{16} irq=(msi|intx)$",
                         reply)
            if not d:
                print(f"d: {reply!r}")
                ok = False
                continue
            if d.group(3) != a.irq:
                print(f"d: irq={d.group(3)}, expected irq={a.irq}")
                ok = False
            now = (int(d.group(1)), int(d.group(2)))
            if last_dma and now != (last_dma[0] + 1, last_dma[1] + 3):
                print(f"d: runs/irqs {now} after {last_dma}: expected one more run, 3 more irqs")
                ok = False
            last_dma = now
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
        if l.startswith(("FAIL", "VERIFY FAIL", "PANIC")) or (a.edu and l.startswith("DMA FAIL")):
            ok = False
    if qemu.poll() is None:
        qemu.kill()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
