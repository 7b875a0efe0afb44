//! The CPL-0 "kernel": every instruction the guest runs at CPL 0 is in this file, in assembly.
//!
//! Why: on the PVM hosts this project runs on, KVM runs guest CPL-0 code through its instruction
//! emulator (1–10 us per instruction, integer instructions only: no SSE beyond a few moves, no
//! AVX), while CPL-3 code runs natively. So the kernel does only what needs CPL 0, with
//! integer instructions, and then drops every CPU to CPL 3 where all the Rust code runs. See
//! README.md, "Privilege levels".
//!
//! * `pvh_start32` (.kernel32): the PVH entry (named by the `Xen` ELF note below), entered in
//!   32-bit protected mode, paging off, `ebx` = `hvm_start_info`. Masks the 8259s, loads our GDT
//!   and enters long mode on the identity page tables (user-accessible: U/S = 1 at
//!   every level; the 512 MiB below 4 GiB uncacheable: PCI BARs, IOAPIC, local APIC), which are
//!   data built by the assembler.
//! * `ap_trampoline` (.kernel16): real-mode code that `smp` copies to [`TRAMPOLINE_ADDR`]; an AP
//!   started by INIT/SIPI/SIPI goes real -> protected -> the same long-mode path as the BSP.
//! * .kernel64: per-CPU setup (CR0/CR4, XCR0 with `xsetbv`, IDT, TSS), the exception handlers,
//!   the interrupt handlers (local APIC timer, vector 32; the edu device, vector 33 for INTx, 34
//!   for MSI, see `edu`) and the drop to CPL 3 (`iretq`) into `main::bsp_main` / `smp::ap_main` on the CPU's user
//!   stack.
//!
//! Services for CPL 3:
//! * Port I/O: each CPU's TSS has an I/O permission bitmap that allows every port, so `in`/`out`
//!   work at CPL 3 with IOPL = 0 (on PVM, KVM performs them without entering the guest kernel).
//! * `hlt` at CPL 3 raises #GP; the kernel treats a #GP on a `hlt` instruction from CPL 3 as
//!   "wait for an interrupt": `sti; hlt; cli`, then it returns past the `hlt`. The interrupts
//!   are the local APIC timer (vector 32: its handler just signals end of interrupt), which an AP
//!   (or the BSP during `d`) arms before its `hlt` to sleep, and the edu device's (vector 33 or 34,
//!   BSP only, only during `d`: the BSP's task priority blocks it otherwise); without one the CPU
//!   stays halted for good.
//! * Any other exception prints `PANIC exception vec=0x.. err=0x... rip=0x... cs=0x... rsp=0x...
//!   cr2=0x... cpu=0x..` on COM1 (from the interrupted context; `cpu` from the kernel stack in use)
//!   and halts the CPU.
//!
//! The file also holds the little CPL-3 assembly the Rust code needs (in .text):
//! `bsp_user_entry` (zeroes .bss, then calls `bsp_main`) and the `mem*` functions.
//!
//! GDT selectors: 0x08 32-bit code, 0x10 data, 0x18 64-bit kernel code, 0x23 user data, 0x2b
//! 64-bit user code, 0x30 + 16 * cpu that CPU's TSS.

use crate::{edu, smp, MAX_CPUS, STACK_SIZE};

/// Physical address the AP trampoline is copied to (must be RAM below 1 MiB, 4 KiB aligned).
pub const TRAMPOLINE_ADDR: usize = 0x8000;
/// The SIPI vector that starts an AP at [`TRAMPOLINE_ADDR`] (CS = vector << 8, IP = 0).
pub const TRAMPOLINE_VECTOR: u32 = (TRAMPOLINE_ADDR >> 12) as u32;

/// How much memory the identity map covers. RAM above this is ignored.
pub const IDENTITY_MAP_BYTES: u64 = 64 << 30;
const GIBS: usize = (IDENTITY_MAP_BYTES >> 30) as usize;
/// Kernel stack per CPU (exception frames only: the handlers use a few dozen bytes).
const KSTACK_SIZE: usize = 4096;
/// Bytes reserved per TSS (104 used).
const TSS_STRIDE: usize = 128;

extern "C" {
    /// First and one-past-last byte of the real-mode AP trampoline (to be copied below 1 MiB).
    pub static ap_trampoline: u8;
    pub static ap_trampoline_end: u8;
    /// First and one-past-last byte of the loaded image (code, data, bss: see `link.ld`).
    pub static __image_start: u8;
    pub static __image_end: u8;
    /// The identity map's 2 MiB page-directory entries: `IDENTITY_MAP_BYTES >> 21` of them, entry
    /// `i` maps `[i << 21, (i + 1) << 21)`.
    pub static mut identity_map_pd: u64;
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
 * GDT, shared by every CPU. Accessed bits are preset so the CPU never writes to the code and
 * data descriptors; the TSS descriptors are filled in by kernel_setup.
 * ------------------------------------------------------------------------------------------- */
.pushsection .data.gdt, "aw"
.balign 16
gdt:
.quad 0                         /* 0x00: null */
.quad 0x00cf9b000000ffff        /* 0x08: 32-bit code, base 0, limit 4 GiB */
.quad 0x00cf93000000ffff        /* 0x10: data, base 0, limit 4 GiB */
.quad 0x00af9b000000ffff        /* 0x18: 64-bit kernel code */
.quad 0x00cff3000000ffff        /* 0x20: user data (DPL 3) */
.quad 0x00affb000000ffff        /* 0x28: 64-bit user code (DPL 3) */
gdt_tss:
.skip 16 * {max_cpus}           /* 0x30 + 16 * cpu: 64-bit TSS descriptors */
gdt_end:
.balign 8
gdtr:
.word gdt_end - gdt - 1
.quad gdt
idtr:
.word 35 * 16 - 1               /* the 32 exception vectors, the local APIC timer, edu INTx, MSI */
.quad idt

/* Next CPU index handed to an AP (the BSP is 0). Lives in .data: nothing zeroes it. */
.balign 4
next_cpu_index:
.long 1

panic_msg:   .asciz "\nPANIC exception vec=0x"
err_msg:     .asciz " err=0x"
rip_msg:     .asciz " rip=0x"
cs_msg:      .asciz " cs=0x"
rsp_msg:     .asciz " rsp=0x"
cr2_msg:     .asciz " cr2=0x"
cpu_msg:     .asciz " cpu=0x"
nl_msg:      .asciz "\n"
.popsection

/* ---------------------------------------------------------------------------------------------
 * Page tables: an identity map of the first 64 GiB, with U/S = 1 at every level (all memory is
 * reachable from CPL 3) and 2 MiB pages, the 512 MiB just below 4 GiB (PCI BARs such as the edu
 * device's, which vmmd puts at 0xE0000000-0xFDFFFFFF and SeaBIOS near 0xFE000000; IOAPIC, local
 * APIC, firmware) uncacheable as an OS maps device memory. (vmmd's RAM ends at 3 GiB, QEMU's at
 * 0xE0000000 at most, so no RAM is there.) Built by the assembler, not at run time:
 * CPL-0 code is emulated on PVM hosts, where filling 32768 entries one instruction at a time
 * takes most of a second.
 * ------------------------------------------------------------------------------------------- */
.pushsection .data.page_tables, "aw"
.balign 4096
pml4:
.quad pdpt + 0x7                /* present | writable | user */
.skip 4096 - 8
pdpt:
.set i, 0
.rept {gibs}
.quad pd + i * 4096 + 0x7       /* present | writable | user */
.set i, i + 1
.endr
.skip 4096 - 8 * {gibs}
.globl identity_map_pd              /* edu.rs makes a BAR outside the uncacheable window UC */
identity_map_pd:
pd:
.set i, 0
.rept {gibs} * 512
.if (i >= 0x700) && (i < 0x800)
.quad (i << 21) + 0x9f          /* present | writable | user | PWT | PCD (uncacheable) | 2 MiB */
.else
.quad (i << 21) + 0x87          /* present | writable | user | 2 MiB page */
.endif
.set i, i + 1
.endr
.popsection

/* ---------------------------------------------------------------------------------------------
 * IDT (filled in by kernel_setup), TSSs and the I/O permission bitmap they share: data, so that
 * nothing needs zeroing at CPL 0. Stacks (.noinit) are never zeroed.
 * ------------------------------------------------------------------------------------------- */
.pushsection .data.kernel, "aw"
.balign 4096
idt:    .skip 35 * 16
tss:    .skip {tss_stride} * {max_cpus}
io_bitmap:
        .skip 8192               /* one bit per port, all 0: every port allowed */
        .byte 0xff               /* the CPU reads 2 bytes per check: this ends the bitmap */
.popsection

.pushsection .noinit, "aw", @nobits
.balign 4096
kernel_stacks:
        .skip {kstack_size} * {max_cpus}
user_stacks:
        .skip {stack_size} * {max_cpus}
.popsection

/* ---------------------------------------------------------------------------------------------
 * 32-bit boot code (CPL 0)
 * ------------------------------------------------------------------------------------------- */
.pushsection .kernel32, "ax"
.code32
.globl pvh_start32
pvh_start32:
    cli
    cld
    /* Mask both 8259 PICs first: firmware (QEMU's SeaBIOS) leaves the PIT ticking on IRQ0. We
     * never enable interrupts, and an interrupt left pending while IF=0 makes some hosts (KVM
     * under PVM here) wait for an interrupt window in the instruction emulator. */
    movb $0xff, %al
    outb %al, $0xa1
    outb %al, $0x21
    movl %ebx, %esi                 /* esi = hvm_start_info (kept until bsp_main) */
    lgdt gdtr
    movl $bsp_far, %ebp
    ljmp $0x08, $1f

/* APs arrive here from the trampoline, already in protected mode with our GDT. */
ap_start32:
    movl $ap_far, %ebp
1:  movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    /* fall through */

/* Enable PAE, load CR3, set EFER.LME, enable paging, far-jump into 64-bit code through the far
 * pointer at ebp. No stack is used: the PVH ABI does not give us one (esp may be anything). */
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

.popsection

/* Far pointers (offset, 64-bit code selector) for the jump into long mode. */
.pushsection .data.far, "aw"
.balign 8
bsp_far: .long bsp_long
         .word 0x18
.balign 8
ap_far:  .long ap_long
         .word 0x18
.popsection

/* ---------------------------------------------------------------------------------------------
 * AP trampoline (CPL 0, real mode): copied to TRAMPOLINE_ADDR; entered with CS = TRAMPOLINE_ADDR
 * >> 4, IP = 0. Position independent (addresses are relative to the segment base).
 * ------------------------------------------------------------------------------------------- */
.pushsection .kernel16, "ax"
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
.popsection

/* ---------------------------------------------------------------------------------------------
 * 64-bit kernel code (CPL 0)
 * ------------------------------------------------------------------------------------------- */
.pushsection .kernel64, "ax"
.code64
bsp_long:
    movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    leaq kernel_stacks + {kstack_size}(%rip), %rsp  /* CPU 0's kernel stack */
    call kernel_setup
    xorl %edi, %edi
    call cpu_setup
    movl %esi, %edi                 /* bsp_main(start_info), entered through bsp_user_entry */
    leaq bsp_user_entry(%rip), %rsi
    leaq user_stacks + {stack_size}(%rip), %rdx
    jmp enter_user

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
    jae halt                        /* more CPUs than we have stacks for: park this one */
    movl %eax, %edi
    movl %eax, %ecx
    incl %ecx
    shlq ${kstack_shift}, %rcx
    leaq kernel_stacks(%rip), %rsp
    addq %rcx, %rsp                 /* top of this CPU's kernel stack */
    call cpu_setup                  /* edi = index (preserved) */
    movl %edi, %edx
    incl %edx
    shlq ${stack_shift}, %rdx
    leaq user_stacks(%rip), %rax
    addq %rax, %rdx                 /* top of this CPU's user stack */
    leaq {ap_main}(%rip), %rsi      /* ap_main(index) */
    jmp enter_user

/* Once, on the BSP: TSS descriptors and TSSs for every CPU (RSP0 = its kernel stack, the shared
 * I/O bitmap that allows every port), and the IDT (32 exception vectors, the local APIC timer and
 * the edu device's interrupt, INTx and MSI: DPL 0 interrupt gates).
 * Clobbers rax, rcx, rdx, rdi, r8, r9, r10. */
kernel_setup:
    leaq tss(%rip), %r10            /* r10 = this TSS */
    leaq gdt_tss(%rip), %rdi        /* rdi = its descriptor */
    leaq kernel_stacks + {kstack_size}(%rip), %r8   /* r8 = its RSP0 */
    movl ${tss_stride} * {max_cpus}, %r9d           /* r9 = offset of the bitmap from the TSS */
    movl ${max_cpus}, %ecx
1:  movq %r8, 4(%r10)               /* RSP0 */
    movw %r9w, 102(%r10)            /* I/O map base */
    leal 8192(%r9), %eax            /* limit: through the 0xff byte after the bitmap (< 64 KiB) */
    movw %ax, (%rdi)                /* limit 15:0 */
    movq %r10, %rax
    movw %ax, 2(%rdi)               /* base 15:0 */
    shrq $16, %rax
    movb %al, 4(%rdi)               /* base 23:16 */
    movb $0x89, 5(%rdi)             /* present, DPL 0, 64-bit TSS (available) */
    movb $0, 6(%rdi)                /* limit 19:16 = 0, granularity bytes */
    shrq $8, %rax
    movb %al, 7(%rdi)               /* base 31:24 */
    shrq $8, %rax
    movl %eax, 8(%rdi)              /* base 63:32 */
    addq ${tss_stride}, %r10
    addq $16, %rdi
    addq ${kstack_size}, %r8
    subl ${tss_stride}, %r9d
    decl %ecx
    jnz 1b

    leaq exception_stubs(%rip), %rax   /* vector i's handler is at exception_stubs + 16 * i */
    leaq idt(%rip), %rdi
    movl $35, %ecx
2:  movw %ax, (%rdi)                /* offset 15:0 */
    movw $0x18, 2(%rdi)             /* kernel code selector */
    movw $0x8e00, 4(%rdi)           /* present, DPL 0, 64-bit interrupt gate */
    movq %rax, %rdx
    shrq $16, %rdx
    movw %dx, 6(%rdi)               /* offset 31:16 */
    shrq $16, %rdx
    movl %edx, 8(%rdi)              /* offset 63:32 */
    addq $16, %rax
    addq $16, %rdi
    decl %ecx
    jnz 2b
    ret

/* Per-CPU setup for the CPU whose index is in edi (preserved); clobbers rax, rcx, rdx. Caches on,
 * SSE on (CR0.EM = 0, CR0.MP = 1, CR4.OSFXSR | OSXMMEXCPT), RDTSC allowed at CPL 3 (CR4.TSD = 0),
 * no SMEP/SMAP (the kernel runs from, and reads, user-accessible pages),
 * and if CPUID reports XSAVE and AVX: CR4.OSXSAVE and XCR0 = x87 | SSE | AVX. Then the IDT and
 * this CPU's TSS. */
cpu_setup:
    movq %cr0, %rax
    andq $~0x6000000c, %rax         /* clear CD, NW (caches on), TS, EM */
    orq $0x22, %rax                 /* set MP, NE */
    movq %rax, %cr0
    movq %cr4, %rax
    andq $~0x300004, %rax           /* clear TSD, SMEP, SMAP: kernel and user share all pages */
    orq $0x600, %rax                /* OSFXSR | OSXMMEXCPT */
    movq %rax, %cr4
    pushq %rbx
    movl $1, %eax
    cpuid
    popq %rbx
    btl $26, %ecx                   /* XSAVE */
    jnc 1f
    btl $28, %ecx                   /* AVX */
    jnc 1f
    movq %cr4, %rax
    orq $0x40000, %rax              /* OSXSAVE */
    movq %rax, %cr4
    xorl %ecx, %ecx
    xorl %edx, %edx
    movl $7, %eax                   /* XCR0 = x87 | SSE | AVX */
    xsetbv
1:  lidt idtr(%rip)
    movl %edi, %eax
    shll $4, %eax
    addl $0x30, %eax
    ltr %ax
    ret

/* Drops to CPL 3: jumps to rsi with rdi as its first argument, on the user stack whose top is
 * rdx (as if called: rsp = top - 8), RFLAGS = 0x3002 (IF = 0, IOPL = 3). IOPL 3 as well as the
 * TSS I/O bitmap: PVM only honours the bitmap, and QEMU's TCG only accepts the bitmap of an
 * "available" (type 9) TSS, while KVM on SVM saves and restores TR as busy (type 11), so after a
 * state restore only IOPL lets CPL-3 port I/O through under TCG. */
enter_user:
    xorl %eax, %eax
    movw %ax, %ds
    movw %ax, %es
    pushq $0x23                     /* SS */
    leaq -8(%rdx), %rax
    pushq %rax                      /* RSP */
    pushq $0x3002                   /* RFLAGS: IOPL 3 */
    pushq $0x2b                     /* CS */
    pushq %rsi                      /* RIP */
    iretq

/* Exception entry: one 16-byte stub per vector; pushes a 0 error code where the CPU pushes none,
 * then the vector. */
.balign 16
exception_stubs:
.set vec, 0
.rept 32
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp exception
    .set vec, vec + 1
.endr

/* Vector 32, right after the stubs (each under 16 bytes, so this is exception_stubs + 32 * 16;
 * kernel_setup fills 35 gates; scripts/check-insns.py checks all three offsets): the local APIC timer,
 * which only wakes a CPU from wait_for_interrupt. */
.balign 16
timer_interrupt:
    pushq %rax
    movl $0xfee000b0, %eax          /* local APIC end-of-interrupt register */
    movl $0, (%rax)
    popq %rax
    iretq

/* Vectors 33 and 34: the edu PCI device's interrupt (src/edu.rs), taken by the BSP only, only
 * while it waits in wait_for_interrupt for a `d` step. Vector 33 (exception_stubs + 33 * 16: the
 * timer's handler is under 16 bytes) is its INTx, routed by the IOAPIC (level-triggered); vector
 * 34 (exception_stubs + 34 * 16: the INTx entry is under 16 bytes) its MSI (edge-triggered), when
 * the device has an MSI capability. One handler for both: it acknowledges everything the device
 * reports (for INTx the device then lowers its line), records it for CPL 3, counts the interrupt
 * unless the device had nothing to report (a spurious one: the line shared, or delivered again),
 * and those on the MSI vector separately (edx = 1 there), then signals end of interrupt (which,
 * for a level-triggered IOAPIC entry, also re-arms the entry; for MSI it only ends the vector). */
.balign 16
edu_intx_interrupt:
    pushq %rdx
    xorl %edx, %edx                 /* not the MSI vector */
    jmp edu_interrupt
.balign 16
edu_msi_interrupt:
    pushq %rdx
    movl $1, %edx                   /* the MSI vector */
edu_interrupt:
    pushq %rax
    pushq %rcx
    movq {edu_mmio}(%rip), %rax     /* the device's BAR0: 0 until CPL 3 has found it */
    testq %rax, %rax
    jz 1f
    movl 0x24(%rax), %ecx           /* interrupt status */
    movl %ecx, 0x64(%rax)           /* interrupt acknowledge: clears those bits */
    testl %ecx, %ecx
    jz 1f
    orl %ecx, {edu_seen}(%rip)
    incq {edu_irqs}(%rip)
    addq %rdx, {edu_msi_irqs}(%rip)
1:  movl $0xfee000b0, %eax          /* local APIC end-of-interrupt register */
    movl $0, (%rax)
    popq %rcx
    popq %rax
    popq %rdx
    iretq

/* Stack: vector, error code, rip, cs, rflags, rsp, ss. */
exception:
    cmpq $13, (%rsp)
    jne 1f
    testb $3, 24(%rsp)
    jz 1f
    movq 16(%rsp), %rax
    cmpb $0xf4, (%rax)              /* #GP on a `hlt` at CPL 3: do what it asks */
    je wait_for_interrupt
1:  movl $2, %edi
    leaq panic_msg(%rip), %rsi
    movq (%rsp), %rax
    call print_field
    movl $16, %edi
    leaq err_msg(%rip), %rsi
    movq 8(%rsp), %rax
    call print_field
    leaq rip_msg(%rip), %rsi
    movq 16(%rsp), %rax
    call print_field
    movl $4, %edi
    leaq cs_msg(%rip), %rsi
    movq 24(%rsp), %rax
    call print_field
    movl $16, %edi
    leaq rsp_msg(%rip), %rsi
    movq 40(%rsp), %rax
    call print_field
    leaq cr2_msg(%rip), %rsi
    movq %cr2, %rax
    call print_field
    movl $2, %edi
    leaq cpu_msg(%rip), %rsi
    movq %rsp, %rax
    leaq kernel_stacks(%rip), %rcx
    subq %rcx, %rax
    shrq ${kstack_shift}, %rax      /* this CPU's index, from its kernel stack */
    call print_field
    leaq nl_msg(%rip), %rsi
    call print_str
halt:
    cli
    hlt
    jmp halt

/* A `hlt` at CPL 3 raised the #GP whose frame is on the stack: halt until an interrupt, with
 * interrupts enabled only here (`sti; hlt` takes an interrupt already pending only once halted),
 * then return past the `hlt`. The interrupts are the local APIC timer, which CPL 3 arms before
 * its `hlt` to sleep, and (BSP, during `d`) the edu device's; without one the CPU stays halted. */
wait_for_interrupt:
    sti
    hlt
    cli
    incq 16(%rsp)                   /* return past the 1-byte hlt */
    addq $16, %rsp                  /* drop the vector and error code */
    iretq

/* Prints the string at rsi, then the low edi (1..16) hex digits of rax. Clobbers rax, rcx, rdx,
 * rsi, r8, r9, r10. */
print_field:
    movq %rax, %r9
    movl $16, %ecx
    subl %edi, %ecx
    shll $2, %ecx
    shlq %cl, %r9                   /* the first digit to print in the top 4 bits */
    call print_str
    movl %edi, %r10d
1:  rolq $4, %r9
    movl %r9d, %eax
    andl $15, %eax
    cmpl $10, %eax
    jb 2f
    addl $'a' - '0' - 10, %eax
2:  addl $'0', %eax
    call print_char
    decl %r10d
    jnz 1b
    ret

/* Prints the NUL-terminated string at rsi. Clobbers rax, rcx, rdx, rsi, r8. */
print_str:
1:  movzbl (%rsi), %eax
    testl %eax, %eax
    jz 2f
    call print_char
    incq %rsi
    jmp 1b
2:  ret

/* Writes al to COM1 once its transmit register is empty (bounded wait). Clobbers rax, rcx, rdx,
 * r8. */
print_char:
    movl %eax, %r8d
    movl $10000, %ecx
    movw $0x3fd, %dx                /* line status register */
1:  inb %dx, %al
    testb $0x20, %al                /* transmit holding register empty */
    jnz 2f
    decl %ecx
    jnz 1b
2:  movw $0x3f8, %dx
    movl %r8d, %eax
    outb %al, %dx
    ret
.popsection

/* ---------------------------------------------------------------------------------------------
 * CPL 3 from here on (ordinary .text).
 * ------------------------------------------------------------------------------------------- */
.pushsection .text.entry, "ax"
/* The BSP's first CPL-3 code: zero .bss (Rust statics, arenas), then bsp_main(start_info). */
bsp_user_entry:
    movq %rdi, %rbx
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    shrq $3, %rcx
    xorl %eax, %eax
    rep stosq
    movq %rbx, %rdi
    andq $-16, %rsp                 /* as the ABI wants it before a call */
    call {bsp_main}
    ud2

/* The memory functions the compiler expects from libc (no libc here). In assembly, so the
 * compiler cannot turn them into calls to themselves. */
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
    gibs = const GIBS,
    kstack_size = const KSTACK_SIZE,
    kstack_shift = const KSTACK_SIZE.trailing_zeros(),
    stack_size = const STACK_SIZE,
    stack_shift = const STACK_SIZE.trailing_zeros(),
    tss_stride = const TSS_STRIDE,
    max_cpus = const MAX_CPUS,
    bsp_main = sym crate::bsp_main,
    ap_main = sym smp::ap_main,
    edu_mmio = sym edu::EDU_MMIO,
    edu_seen = sym edu::EDU_SEEN,
    edu_irqs = sym edu::EDU_IRQS,
    edu_msi_irqs = sym edu::EDU_MSI_IRQS,
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
