//! Thin wrappers around the x86 instructions the guest needs: port I/O, the TSC, CPUID, halting.
//!
//! All of this runs at CPL 3. Port I/O works there because every CPU's TSS carries an I/O
//! permission bitmap that allows all ports (`kernel.rs`); on the PVM hosts KVM performs each
//! `in`/`out` itself (about 25 us, see README) without entering the guest's kernel.

use core::arch::asm;

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O has no memory effects; the guest owns the whole machine.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: as for `inb`.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Writes a 16-bit word to an I/O port (ACPI PM1 control registers are 16 bits wide).
pub fn outw(port: u16, v: u16) {
    // SAFETY: as for `inb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a 32-bit doubleword from an I/O port (PCI configuration data).
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `inb`.
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a 32-bit doubleword to an I/O port (PCI configuration address and data).
pub fn outl(port: u16, v: u32) {
    // SAFETY: as for `inb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    };
}

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Executes CPUID for `leaf` (subleaf 0) and returns eax, ebx, ecx, edx.
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Spin-loop hint.
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

/// Stops this CPU for good. `hlt` at CPL 3 raises #GP, which the kernel takes as "wait for an
/// interrupt" (`sti; hlt; cli` at CPL 0); a CPU that has not armed its local APIC timer gets none
/// (and should one come, it halts again).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: traps into the kernel, which returns after the next interrupt, if any.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// Fills `words` 8-byte words at `addr` with `value` (`rep stosq`).
///
/// # Safety
/// `[addr, addr + 8 * words)` must be memory the caller may write.
pub unsafe fn fill_words(addr: u64, words: u64, value: u64) {
    // SAFETY: per the caller; DF is clear (boot code and the ABI keep it so).
    unsafe {
        asm!("rep stosq", inout("rdi") addr => _, inout("rcx") words => _, in("rax") value,
             options(nostack, preserves_flags))
    };
}

/// Address of the first of `words` 8-byte words at `addr` that is not `value` (`repe scasq`).
///
/// # Safety
/// `[addr, addr + 8 * words)` must be memory the caller may read.
pub unsafe fn find_other_word(addr: u64, words: u64, value: u64) -> Option<u64> {
    let end: u64;
    let differs: u8;
    // SAFETY: per the caller. `cmp rax, rax` sets ZF so that zero words compare equal.
    unsafe {
        asm!("cmp rax, rax", "repe scasq", "setne {d}",
             d = out(reg_byte) differs, inout("rdi") addr => end, inout("rcx") words => _,
             in("rax") value, options(nostack, readonly))
    };
    (differs != 0).then(|| end - 8)
}

/// Reads a 64-bit word of physical memory (identity mapped).
///
/// # Safety
/// `addr` must be mapped and 8-byte aligned.
pub unsafe fn read_word(addr: u64) -> u64 {
    // SAFETY: per the caller.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Measures whether this CPU executes natively or inside the hypervisor's instruction emulator:
/// 2000 iterations of a two-instruction loop take about a microsecond natively and about a
/// millisecond emulated. Only reported (`exec=` on the BOOT line): CPL-3 code is expected to run
/// natively, and the guest does not work otherwise (it uses SSE and AVX freely). Call after
/// `time::calibrate`.
pub fn detect_emulation() -> bool {
    let start = rdtsc();
    // SAFETY: a register-only loop.
    unsafe {
        asm!("2:", "dec {n}", "jnz 2b", n = inout(reg) 2000u64 => _, options(nomem, nostack))
    };
    rdtsc().wrapping_sub(start) > 100 * crate::time::ticks_per_us()
}
