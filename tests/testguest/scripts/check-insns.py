#!/usr/bin/env python3
"""Checks that cpr-testguest only uses instructions KVM's instruction emulator can run.

usage: check-insns.py GUEST_ELF

On hosts where KVM runs guests through its instruction emulator (a PVM host, like the machines
this project is developed on), an instruction the emulator does not know kills the VM with
"KVM internal error. Suberror: 1 ... emulation failure". The compiler emits SSE for copies and
zeroing, and vectorises loops, so this script disassembles the guest and fails on:
  * any SSE/MMX/x87/AVX instruction except the moves the emulator supports (movups, movaps,
    movdqu, movdqa, movntps, movntdq) and fxsave/fxrstor/fninit/fnstcw/fnstsw;
  * VEX-encoded instructions outside `ymm_swap` (which runs only when the guest runs natively);
  * any use of xmm8..xmm15 outside `fpu.rs`'s asm (they hold values across iterations);
libcore's formatting functions are exempt: they are linked but never run (the panic handler
prints without core::fmt).
  * instructions the emulator lacks or that are dangerous there: cmpxchg16b, mfence, lfence,
    sfence, popcnt, lzcnt, ldmxcsr, stmxcsr, xsave*, xrstor*.
Exit status 0 if clean; prints each offending instruction with its function otherwise.
"""
import re, subprocess, sys

OK_SSE = {"movups", "movaps", "movdqu", "movdqa", "movntps", "movntdq", "movupd", "movapd",
          "fxsave", "fxrstor", "fninit", "fnstcw", "fnstsw"}
# (tzcnt is allowed: LLVM emits it as `rep bsf`, which the emulator runs as bsf, and only where
# the two agree.)
BAD = {"cmpxchg16b", "mfence", "lfence", "sfence", "popcnt", "lzcnt", "ldmxcsr",
       "stmxcsr", "xsave", "xsaveopt", "xsavec", "xrstor", "xsave64", "xrstor64", "xsaves", "xrstors"}
HIGH_XMM_OK = ("fpu",)  # functions allowed to name xmm8..15 (fxsave/fxrstor users)
VEX_OK = ("ymm_swap",)
# libcore's formatting code is linked (panic paths reference it) but never runs: the guest's
# panic handler prints without core::fmt.
NEVER_RUN = ("4core3fmt", "4core3str5count", "core..fmt..", "core..str..count")


def main():
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-M", "intel", sys.argv[1]],
                         check=True, capture_output=True, text=True).stdout
    func, bad = "?", []
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            func = m.group(1)
            continue
        m = re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if not m:
            continue
        addr, mnem, ops = m.groups()
        if mnem in ("rep", "repz", "repe", "repnz", "repne", "lock", "data16", "cs", "ds", "notrack"):
            parts = ops.split(None, 1)
            mnem, ops = (parts[0], parts[1] if len(parts) > 1 else "") if parts else (mnem, "")
        why = None
        simd = re.search(r"\b(xmm\d+|ymm\d+|zmm\d+|mm\d|st\(\d\)|st)\b", ops) or mnem.startswith("f")
        if mnem in BAD:
            why = "not emulated"
        elif mnem.startswith("v") and re.search(r"\b[xyz]mm\d+", ops):
            if not any(k in func for k in VEX_OK):
                why = "VEX outside ymm_swap"
        elif simd and mnem not in OK_SSE:
            why = "SIMD/x87 instruction the emulator cannot run"
        if not why and re.search(r"\bxmm(8|9|1[0-5])\b", ops) and not any(k in func for k in HIGH_XMM_OK + VEX_OK):
            why = "xmm8..15 are reserved for fpu.rs"
        if why and any(k in func for k in NEVER_RUN):
            why = None
        if why:
            bad.append(f"{addr}: {mnem} {ops}   [{why}] in {func}")
    for b in bad:
        print(b)
    print(f"{len(bad)} problem(s)" if bad else "ok: only emulator-safe instructions")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
