//! cpr-testguest: a freestanding PVH guest that proves a VMM kept it intact across a live update.
//!
//! Boots like a Linux `vmlinux` (PVH ELF entry), so it runs under vmmd and unmodified under QEMU
//! (`-kernel`). It fills its RAM with a deterministic pattern, starts every AP, prints `READY`,
//! then emits a heartbeat `.` on COM1 every millisecond while mutating memory and keeping FPU/SSE/
//! AVX registers live on every CPU, and answers commands read from COM1. See README.md for the
//! protocol and the memory layout.
//!
//! Privilege levels: `kernel` is the only code that runs at CPL 0 (assembly: PVH entry, page
//! tables, long mode, GDT/IDT/TSS, AP trampoline, exception and timer handlers, `hlt` on behalf of
//! CPL 3); it drops every CPU to CPL 3, where all the Rust code runs natively (see README.md,
//! "Privilege levels").
//!
//! Modules: `kernel` (the above, plus mem* for the compiler), `cpu` (port I/O, TSC), `uart`
//! (COM1), `time` (TSC calibration), `pvh` (start info), `pm` (ACPI: S3/S5, CPU count), `memory`
//! (static pattern), `arena` (mutation arenas), `fpu` (register checks), `smp` (APs, their
//! sleep), `report` (failure log), `commands` (BSP main loop and commands), `pci` (configuration
//! mechanism #1), `edu` (QEMU's edu device: the `d` DMA/interrupt check).

#![no_std]
#![no_main]

mod arena;
mod commands;
mod cpu;
mod edu;
mod fpu;
mod kernel;
mod memory;
mod pci;
mod pm;
mod pvh;
mod report;
mod smp;
mod time;
mod uart;

use core::sync::atomic::Ordering::Release;

/// Most CPUs supported (BSP included); further APs park in the kernel.
pub const MAX_CPUS: usize = 16;
/// User (CPL 3) stack per CPU (a power of two).
pub const STACK_SIZE: usize = 32 << 10;

/// The BSP's Rust entry, at CPL 3 (entered from `kernel.rs` with `ebx` from the PVH entry).
extern "C" fn bsp_main(start_info: u32) -> ! {
    uart::init();
    // Read everything we need from firmware/loader structures before we overwrite memory.
    let info = pvh::read(start_info);
    let pm = pm::Pm::find(info.rsdp);
    let acpi_cpus = pm::madt_cpus(info.rsdp);
    let tsc_source = time::calibrate();
    let emulated = cpu::detect_emulation();
    let seed = memory::splitmix64(cpu::rdtsc());
    smp::SEED.store(seed, Release);
    arena::init(0, seed);
    let cpus = smp::start_aps(acpi_cpus);

    let layout = memory::Layout::compute(info);
    let (image_start, image_end) = kernel::image_range();
    let (arena_start, arena_end) = arena::range();
    let fpu = fpu::Fpu::start(0);
    uart::line()
        .s("BOOT cpr-testguest tsc_khz=")
        .dec(time::ticks_per_ms())
        .s(" tsc_source=")
        .s(tsc_source.name())
        .s(" exec=")
        .s(if emulated { "emulated" } else { "native" })
        .s(" pattern=")
        .s("full")
        .s(" avx=")
        .dec(fpu.avx() as u64)
        .s(" pm1a_cnt=")
        .addr(pm.pm1a_cnt as u64)
        .s(" pm_source=")
        .s(pm.source)
        .s(" image=")
        .addr(image_start)
        .s("-")
        .addr(image_end)
        .s(" arenas=")
        .addr(arena_start)
        .s("-")
        .addr(arena_end)
        .s(" pattern_mib=")
        .dec(layout.bytes() >> 20)
        .end();
    memory::fill(layout, seed);

    // Rounded up: the map leaves out the legacy hole and firmware areas below 1 MiB.
    let ram_mib = (info.ram_bytes() + (1 << 20) - 1) >> 20;
    uart::line()
        .s("READY cpus=")
        .dec(cpus as u64)
        .s(" ram_mib=")
        .dec(ram_mib)
        .s(" seed=")
        .hex(seed)
        .end();
    commands::Bsp::new(pm, layout, seed, cpus, fpu).run()
}

/// Prints `PANIC <message> at <file>:<line>` (without `core::fmt`, see `uart`) and halts.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut l = uart::line().s("PANIC ");
    if let Some(msg) = info.message().as_str() {
        l = l.s(msg);
    }
    if let Some(loc) = info.location() {
        l = l.s(" at ").s(loc.file()).s(":").dec(loc.line() as u64);
    }
    l.end();
    cpu::halt_forever()
}
