#!/usr/bin/env python3
"""Checks the instructions of cpr-testguest where it matters.

usage: check-insns.py GUEST_ELF

1. The CPL-0 code (output sections .kernel32, .kernel16 and .kernel64, all hand-written assembly
   in src/kernel.rs). On the PVM hosts this project runs on, KVM runs guest CPL-0 code through
   its instruction emulator, which knows integer instructions but almost no SSE and no AVX/x87
   arithmetic; an instruction it does not know kills the VM ("KVM internal error. Suberror: 1").
   So every instruction there must be on ALLOWED (integer instructions the guest's kernel needs,
   all of which the emulator runs), and direct jumps and calls must stay inside the kernel
   sections: the kernel never runs compiled code (it reaches CPL 3 only through `iretq`).
2. The CPL-3 code (.text: all the Rust code, natively executed): xmm8..xmm15 hold values across
   loop iterations (src/fpu.rs), so compiled code must not touch them outside fpu.rs's asm, and
   VEX-encoded instructions (which would clobber the ymm upper halves fpu.rs checks) may appear
   only in `ymm_swap`. libcore's formatting code is exempt: it is linked but never runs (the
   guest prints without core::fmt).
3. The interrupt handlers' places: the IDT gate of vector v points at exception_stubs + 16 * v,
   so timer_interrupt (32), edu_intx_interrupt (33) and edu_msi_interrupt (34) must be exactly
   there.
Exit status 0 if clean; prints each offending instruction with its function otherwise.
"""
import re, subprocess, sys

KERNEL_SECTIONS = {".kernel32": "i386", ".kernel16": "i8086", ".kernel64": "x86-64"}
ALLOWED = {
    "mov", "movzx", "movabs", "lea", "push", "pop", "xchg", "add", "sub", "and", "or", "xor", "neg",
    "inc", "dec", "cmp", "test", "bt", "shl", "shr", "rol", "xadd",
    "jmp", "call", "ret", "jb", "jae", "je", "jne", "jbe", "ja", "loop",
    "cli", "sti", "cld", "hlt", "in", "out", "stos", "cpuid", "rdmsr", "wrmsr", "xsetbv",
    "lgdt", "lgdtd", "lidt", "ltr", "iretq", "nop", "int3",
}
PREFIXES = ("rep", "repz", "repe", "lock", "data16", "data32", "addr32", "cs", "ds", "es")
HIGH_XMM_OK = ("fpu",)  # functions allowed to name xmm8..15 (fxsave/fxrstor users)
VEX_OK = ("ymm_swap",)
DATA = ("ap_trampoline_gdtr",)  # data inside the kernel sections (the trampoline's GDT pointer)
NEVER_RUN = ("4core3fmt", "4core3str5count", "core..fmt..", "core..str..count")


def disassemble(elf, section=None, mode="x86-64"):
    args = ["objdump", "-d", "--no-show-raw-insn", "-M", f"intel,{mode}"]
    if section:
        args += ["-j", section]
    out = subprocess.run(args + [elf], check=True, capture_output=True, text=True).stdout
    func = "?"
    for line in out.splitlines():
        m = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if m:
            func = m.group(2)
            continue
        m = re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if not m:
            continue
        addr, mnem, ops = m.groups()
        while mnem in PREFIXES and ops:
            parts = ops.split(None, 1)
            mnem, ops = parts[0], parts[1] if len(parts) > 1 else ""
        yield func, int(addr, 16), mnem, ops


def section_ranges(elf):
    out = subprocess.run(["objdump", "-h", elf], check=True, capture_output=True, text=True).stdout
    ranges = {}
    for m in re.finditer(r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)", out, re.M):
        name, size, vma = m.group(1), int(m.group(2), 16), int(m.group(3), 16)
        ranges[name] = (vma, vma + size)
    return ranges


def gate_layout(elf):
    out = subprocess.run(["nm", elf], check=True, capture_output=True, text=True).stdout
    syms = {p[2]: int(p[0], 16) for p in (l.split() for l in out.splitlines()) if len(p) == 3}
    base = syms.get("exception_stubs")
    bad = []
    for name, vec in (("timer_interrupt", 32), ("edu_intx_interrupt", 33), ("edu_msi_interrupt", 34)):
        if base is None or syms.get(name) != base + 16 * vec:
            bad.append(f"{name} is not at exception_stubs + 16 * {vec}   [IDT gate {vec} misses it]")
    return bad


def main():
    elf = sys.argv[1]
    ranges = section_ranges(elf)
    missing = [s for s in KERNEL_SECTIONS if s not in ranges]
    if missing:
        print(f"sections missing: {missing}")
        return 1
    kernel = [ranges[s] for s in KERNEL_SECTIONS]
    bad, count = [], 0
    for section, mode in KERNEL_SECTIONS.items():
        for func, addr, mnem, ops in disassemble(elf, section, mode):
            if func in DATA:
                continue
            count += 1
            why = None
            if mnem not in ALLOWED:
                why = "not on the CPL-0 allow list"
            elif re.search(r"\b([xyz]mm\d+|mm\d|st\(\d\))", ops):
                why = "SIMD/x87 register at CPL 0"
            elif mnem in ("jmp", "call", "loop") or mnem.startswith("j"):
                t = re.match(r"^([0-9a-f]+) <", ops)
                if t and not any(a <= int(t.group(1), 16) < b for a, b in kernel):
                    why = "jumps out of the kernel"
            if why:
                bad.append(f"{section} {addr:x}: {mnem} {ops}   [{why}] in {func}")
    for func, addr, mnem, ops in disassemble(elf, ".text"):
        why = None
        if mnem.startswith("v") and re.search(r"\b[xyz]mm\d+", ops) and not any(k in func for k in VEX_OK):
            why = "VEX outside ymm_swap"
        elif re.search(r"\b[xy]mm(8|9|1[0-5])\b", ops) and not any(k in func for k in HIGH_XMM_OK + VEX_OK):
            why = "xmm8..15 are reserved for fpu.rs"
        if why and not any(k in func for k in NEVER_RUN):
            bad.append(f".text {addr:x}: {mnem} {ops}   [{why}] in {func}")
    bad += gate_layout(elf)
    for b in bad:
        print(b)
    print(f"{len(bad)} problem(s)" if bad else f"ok: {count} CPL-0 instructions, all allowed; CPL-3 code leaves xmm8..15 and ymm alone")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
