//! Boot code, all in assembly: nothing written in Rust runs before this file has put the CPU in
//! 64-bit long mode with a stack and SSE (and AVX, when the CPU has it) enabled.
//!
//! * `pvh_start32`: the PVH entry (named by the `Xen` ELF note below). The loader enters it in 32-bit
//!   protected mode, paging off, flat segments, `ebx` = physical address of `hvm_start_info`. It
//!   loads our GDT, zeroes `.bss`, builds identity page tables for the first 64 GiB (2 MiB pages),
//!   enters long mode and calls `main::bsp_main(start_info)` on CPU 0's stack.
//! * `ap_trampoline`: real-mode code that `smp` copies to [`TRAMPOLINE_ADDR`] before sending
//!   INIT/SIPI/SIPI. An application processor (AP) starts there in real mode, loads the same GDT,
//!   switches to protected mode, then takes the same path to long mode as the BSP (same page
//!   tables), takes a CPU index with `lock xadd` and calls `smp::ap_main(index)` on its own stack.
//! * `cpu_setup`: per-CPU control-register setup shared by both: caches on, SSE on
//!   (CR0.EM=0, CR0.MP=1, CR4.OSFXSR|OSXMMEXCPT), `fninit`, and if CPUID reports XSAVE and AVX,
//!   CR4.OSXSAVE and XCR0 = x87|SSE|AVX.
//! * `memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`: the compiler calls these; there is no libc,
//!   and writing them in assembly (`rep movsb`/`rep stosb`) means the compiler cannot turn them
//!   into calls to themselves.
//!
//! GDT selectors: 0x08 = 32-bit code, 0x10 = data, 0x18 = 64-bit code.

use crate::{smp, MAX_CPUS, STACK_SIZE};

/// Physical address the AP trampoline is copied to (must be RAM below 1 MiB, 4 KiB aligned).
pub const TRAMPOLINE_ADDR: usize = 0x8000;
/// The SIPI vector that starts an AP at [`TRAMPOLINE_ADDR`] (CS = vector << 8, IP = 0).
pub const TRAMPOLINE_VECTOR: u32 = (TRAMPOLINE_ADDR >> 12) as u32;

/// How much memory the identity map covers. RAM above this is ignored.
pub const IDENTITY_MAP_BYTES: u64 = 64 << 30;
const PD_TABLES: usize = (IDENTITY_MAP_BYTES >> 30) as usize;

extern "C" {
    /// First and one-past-last byte of the real-mode AP trampoline (to be copied below 1 MiB).
    pub static ap_trampoline: u8;
    pub static ap_trampoline_end: u8;
    /// First and one-past-last byte of the loaded image (code, data, bss: see `link.ld`).
    pub static __image_start: u8;
    pub static __image_end: u8;
}

core::arch::global_asm!(
    r#"
/* ---------------------------------------------------------------------------------------------
 * PVH entry note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18), descriptor = 32-bit entry.
 * The descriptor is padded to 8 bytes because older QEMUs read it as a 64-bit value.
 * ------------------------------------------------------------------------------------------- */
.pushsection .note.pvh, "a", @note
.balign 4
.long 4                 /* namesz */
.long 8                 /* descsz */
.long 18                /* type: XEN_ELFNOTE_PHYS32_ENTRY */
.asciz "Xen"
.long pvh_start32
.long 0
.popsection

/* ---------------------------------------------------------------------------------------------
 * GDT, shared by every CPU. Accessed bits are preset so the CPU never writes to it.
 * ------------------------------------------------------------------------------------------- */
.pushsection .data.gdt, "aw"
.balign 16
gdt:
.quad 0                         /* 0x00: null */
.quad 0x00cf9b000000ffff        /* 0x08: 32-bit code, base 0, limit 4 GiB */
.quad 0x00cf93000000ffff        /* 0x10: data, base 0, limit 4 GiB */
.quad 0x00af9b000000ffff        /* 0x18: 64-bit code */
gdt_end:
.balign 8
gdtr:
.word gdt_end - gdt - 1
.quad gdt

/* Next CPU index handed to an AP (the BSP is 0). Lives in .data: .bss is zeroed at boot. */
.balign 4
next_cpu_index:
.long 1
.popsection

/* ---------------------------------------------------------------------------------------------
 * Page tables (identity map, 2 MiB pages) and per-CPU stacks. Zeroed by pvh_start32.
 * ------------------------------------------------------------------------------------------- */
.pushsection .bss.boot, "aw", @nobits
.balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096 * {pd_tables}
.balign 4096
cpu_stacks:
        .skip {stack_size} * {max_cpus}
.popsection

/* ---------------------------------------------------------------------------------------------
 * 32-bit code
 * ------------------------------------------------------------------------------------------- */
.pushsection .text.boot, "ax"
.code32
.globl pvh_start32
pvh_start32:
    cli
    cld
    /* Mask both 8259 PICs first: firmware (QEMU's SeaBIOS) leaves the PIT ticking on IRQ0. We
     * never enable interrupts, and an interrupt left pending while IF=0 makes some hosts (KVM
     * under PVM here) emulate every instruction waiting for an interrupt window, and their
     * emulator cannot run SSE code. */
    movb $0xff, %al
    outb %al, $0xa1
    outb %al, $0x21
    movl %ebx, %esi                 /* esi = hvm_start_info (kept until bsp_main) */
    lgdt gdtr
    ljmp $0x08, $1f
1:  movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs

    /* Zero .bss (page tables, stacks, Rust statics, arenas). */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb

    /* PML4[0] -> PDPT */
    movl $pdpt + 0x3, pml4          /* present | writable */

    /* PDPT[i] -> PD i, for each GiB of the identity map */
    movl $pdpt, %edi
    movl $pd + 0x3, %eax
    movl ${pd_tables}, %ecx
2:  movl %eax, (%edi)
    addl $4096, %eax
    addl $8, %edi
    loop 2b

    /* PD entries: 2 MiB pages, entry i maps physical i << 21. The 32 MiB just below 4 GiB (IOAPIC,
     * local APIC, firmware) is mapped uncacheable, as an OS maps device memory. */
    xorl %edx, %edx                 /* edx = entry index */
3:  movl %edx, %eax
    shll $21, %eax
    orl $0x83, %eax                 /* present | writable | 2 MiB page */
    cmpl $0x7f0, %edx
    jb 4f
    cmpl $0x800, %edx
    jae 4f
    orl $0x18, %eax                 /* PWT | PCD: uncacheable */
4:  movl %edx, %ecx
    shrl $11, %ecx                  /* high half of the physical address */
    movl %eax, pd(, %edx, 8)
    movl %ecx, pd + 4(, %edx, 8)
    incl %edx
    cmpl ${pd_tables} * 512, %edx
    jb 3b

    movl $bsp_far, %ebp
    jmp enter_long_mode

/* APs arrive here from the trampoline, already in protected mode with our GDT. */
ap_start32:
    movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $ap_far, %ebp
    /* fall through */

/* Enable PAE, load CR3, set EFER.LME, enable paging, far-jump into 64-bit code through the far pointer
 * at ebp. No stack is used: the PVH ABI does not give us one (esp may be anything, e.g. 0). */
enter_long_mode:
    movl %cr4, %eax
    orl $0x20, %eax                 /* CR4.PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* PG | PE */
    movl %eax, %cr0
    ljmp *(%ebp)

/* Far pointers (offset, 64-bit code selector) for the jump into long mode. */
.balign 8
bsp_far: .long bsp_long
         .word 0x18
.balign 8
ap_far:  .long ap_long
         .word 0x18

/* ---------------------------------------------------------------------------------------------
 * 64-bit code
 * ------------------------------------------------------------------------------------------- */
.code64
bsp_long:
    movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    leaq cpu_stacks + {stack_size}(%rip), %rsp   /* CPU 0's stack */
    call cpu_setup
    movl %esi, %edi                 /* bsp_main(start_info) */
    call {bsp_main}
    jmp park

ap_long:
    movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movl $1, %eax
    lock xaddl %eax, next_cpu_index(%rip)   /* eax = this CPU's index */
    cmpl ${max_cpus}, %eax
    jae park                        /* more CPUs than we have stacks for: park this one */
    movl %eax, %edi                 /* ap_main(index) */
    leal 1(%eax), %eax
    shlq ${stack_shift}, %rax
    leaq cpu_stacks(%rip), %rsp
    addq %rax, %rsp                 /* top of this CPU's stack */
    call cpu_setup
    call {ap_main}
park:
    cli
    hlt
    jmp park

/* Per-CPU setup; clobbers rax, rcx, rdx (rbx, rsi, rdi preserved). */
cpu_setup:
    movq %cr0, %rax
    andq $~0x6000000c, %rax         /* clear CD, NW (caches on), TS, EM */
    orq $0x22, %rax                 /* set MP, NE */
    movq %rax, %cr0
    movq %cr4, %rax
    orq $0x600, %rax                /* OSFXSR | OSXMMEXCPT */
    movq %rax, %cr4
    fninit
    pushq %rbx
    movl $1, %eax
    cpuid
    popq %rbx
    btl $26, %ecx                   /* XSAVE */
    jnc 5f
    btl $28, %ecx                   /* AVX */
    jnc 5f
    movq %cr4, %rax
    orq $0x40000, %rax              /* OSXSAVE */
    movq %rax, %cr4
    xorl %ecx, %ecx
    xorl %edx, %edx
    movl $7, %eax                   /* XCR0 = x87 | SSE | AVX */
    xsetbv
5:  ret

/* ---------------------------------------------------------------------------------------------
 * AP trampoline: copied to TRAMPOLINE_ADDR; entered in real mode with CS = TRAMPOLINE_ADDR >> 4,
 * IP = 0. Position independent (addresses are relative to the segment base).
 * ------------------------------------------------------------------------------------------- */
.code16
.globl ap_trampoline
ap_trampoline:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_trampoline_gdtr - ap_trampoline   /* our GDT, wherever it is in the first 4 GiB */
    movl %cr0, %eax
    orl $1, %eax                    /* PE */
    movl %eax, %cr0
    ljmpl $0x08, $ap_start32
.balign 8
ap_trampoline_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
.globl ap_trampoline_end
ap_trampoline_end:
.code64
.popsection

/* ---------------------------------------------------------------------------------------------
 * The memory functions the compiler expects from libc.
 * ------------------------------------------------------------------------------------------- */
.pushsection .text.mem, "ax"
.globl memcpy
memcpy:
    movq %rdi, %rax
    movq %rdx, %rcx
    rep movsb
    ret

.globl memmove
memmove:
    movq %rdi, %rax
    movq %rdx, %rcx
    cmpq %rsi, %rdi
    jbe 1f                          /* dst <= src: copying forwards is safe */
    leaq -1(%rsi, %rdx), %rsi       /* otherwise copy backwards */
    leaq -1(%rdi, %rdx), %rdi
    std
    rep movsb
    cld
    ret
1:  rep movsb
    ret

.globl memset
memset:
    movq %rdi, %r9
    movl %esi, %eax
    movq %rdx, %rcx
    rep stosb
    movq %r9, %rax
    ret

.globl memcmp
.globl bcmp
memcmp:
bcmp:
    xorl %eax, %eax
    testq %rdx, %rdx
    jz 2f
1:  movzbl (%rdi), %eax
    movzbl (%rsi), %ecx
    subl %ecx, %eax
    jnz 2f
    incq %rdi
    incq %rsi
    decq %rdx
    jnz 1b
2:  ret

/* Referenced by the prebuilt libcore's unwind tables; never called (panic = "abort"). */
.globl rust_eh_personality
rust_eh_personality:
    ud2
.popsection
"#,
    pd_tables = const PD_TABLES,
    stack_size = const STACK_SIZE,
    stack_shift = const STACK_SIZE.trailing_zeros(),
    max_cpus = const MAX_CPUS,
    bsp_main = sym crate::bsp_main,
    ap_main = sym smp::ap_main,
    options(att_syntax)
);

/// The image's physical extent `[start, end)`.
pub fn image_range() -> (u64, u64) {
    // Only the addresses of the linker-defined symbols are taken.
    (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    )
}
