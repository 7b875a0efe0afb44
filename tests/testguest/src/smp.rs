//! Application processors: started with INIT/SIPI/SIPI as an OS starts them, then they loop
//! forever mutating their arena and checking their FPU state, never printing. Each iteration ends
//! with a sleep of [`AP_SLEEP_US`] on the local APIC timer, so that an AP leaves the host CPU to
//! others (on a 2-core host, to the BSP's vCPU and the VMM) most of the time instead of spinning.
//!
//! The BSP (at CPL 3) copies the real-mode trampoline (`kernel.rs`) to [`TRAMPOLINE_ADDR`],
//! broadcasts INIT, SIPI, SIPI through the xAPIC ICR with the "all excluding self" shorthand
//! (local APIC MMIO works from CPL 3: the page is mapped user-accessible, and KVM emulates the
//! access, about 2.5 us each), and waits for the APs to check in. Each AP takes a CPU index with
//! `lock xadd` in the kernel, sets itself up, drops to CPL 3 on its own stack, initialises its
//! arena, marks itself online and enters [`ap_main`]'s loop.

use crate::cpu::{pause, rdtsc};
use crate::fpu::{self, Fpu};
use crate::kernel::{ap_trampoline, ap_trampoline_end, TRAMPOLINE_ADDR, TRAMPOLINE_VECTOR};
use crate::{arena, time, MAX_CPUS};
use core::arch::asm;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};

pub const LAPIC_BASE: usize = 0xfee0_0000;
pub const LAPIC_SVR: usize = 0xf0; // spurious-interrupt vector register
const LAPIC_ICR_LO: usize = 0x300;
const LAPIC_ICR_HI: usize = 0x310;
const ICR_ALL_EXCLUDING_SELF: u32 = 0b11 << 18;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;
pub const LAPIC_LVT_TIMER: usize = 0x320;
pub const LAPIC_TIMER_INITIAL: usize = 0x380;
const LAPIC_TIMER_CURRENT: usize = 0x390;
pub const LAPIC_TIMER_DIVIDE: usize = 0x3e0;
pub const TIMER_DIVIDE_BY_1: u32 = 0xb;
const LVT_MASKED: u32 = 1 << 16;
/// The IDT vector of the local APIC timer (see `kernel.rs`).
pub const TIMER_VECTOR: u32 = 32;

/// How long an AP sleeps after each iteration (its hold window is 200 us).
pub const AP_SLEEP_US: u64 = 800;

/// Seed shared with the APs (set by the BSP before it starts them).
pub static SEED: AtomicU64 = AtomicU64::new(0);
/// Iterations completed by each CPU's loop.
pub static ITERS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Each CPU's largest TSC gap between two consecutive loop iterations, in ticks, since boot or the
/// last `g` command: the guest's own view of how long it stood still (a VMM pause, a host stall).
/// Time the BSP spends answering a command is not counted.
pub static MAX_GAP: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Records the gap since `*prev` (a TSC reading) for `cpu` and moves `*prev` to now.
pub fn note_gap(cpu: usize, prev: &mut u64) {
    let now = rdtsc();
    MAX_GAP[cpu].fetch_max(now.wrapping_sub(*prev), Relaxed);
    *prev = now;
}

/// CPUs that have checked in (set by each AP once its arena is ready; the BSP is always online).
pub static ONLINE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static CHECKED_IN: AtomicUsize = AtomicUsize::new(0);
/// Local APIC timer ticks per millisecond (divide by 1), measured by the BSP; 0 if the timer does
/// not count, and then APs do not sleep.
static TIMER_TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);

pub fn lapic_read(reg: usize) -> u32 {
    // SAFETY: the local APIC page is identity mapped (uncacheable).
    unsafe { read_volatile((LAPIC_BASE + reg) as *const u32) }
}

pub fn lapic_write(reg: usize, v: u32) {
    // SAFETY: as in `lapic_read`.
    unsafe { write_volatile((LAPIC_BASE + reg) as *mut u32, v) }
}

/// Sends an IPI to all CPUs but this one and waits (bounded) for the APIC to accept it.
fn broadcast_ipi(icr_lo: u32) {
    lapic_write(LAPIC_ICR_HI, 0);
    lapic_write(LAPIC_ICR_LO, ICR_ALL_EXCLUDING_SELF | icr_lo);
    for _ in 0..1000 {
        if lapic_read(LAPIC_ICR_LO) & ICR_DELIVERY_PENDING == 0 {
            break;
        }
        time::delay_us(1);
    }
}

/// Starts every AP the machine has; returns the number of online CPUs (BSP included). `expected`
/// is how many CPUs ACPI lists, if it does: the wait for APs to check in ends when they all have
/// (and nothing is started for 1), else after 100 ms.
pub fn start_aps(expected: Option<usize>) -> usize {
    ONLINE[0].store(true, Release);
    if expected == Some(1) {
        return 1;
    }
    // SAFETY: copies the trampoline's bytes to low RAM that nothing else uses after boot.
    unsafe {
        let start = core::ptr::addr_of!(ap_trampoline);
        let len = core::ptr::addr_of!(ap_trampoline_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE_ADDR as *mut u8, len);
    }
    // Software-enable the local APIC (spurious vector 0xff), as an OS does.
    lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x1ff);
    calibrate_timer();

    broadcast_ipi(ICR_INIT | ICR_LEVEL_ASSERT);
    time::delay_us(10_000);
    for _ in 0..2 {
        broadcast_ipi(ICR_STARTUP | ICR_LEVEL_ASSERT | TRAMPOLINE_VECTOR);
        time::delay_us(200);
    }
    let start = rdtsc();
    let want = expected.unwrap_or(MAX_CPUS).min(MAX_CPUS);
    while 1 + CHECKED_IN.load(Acquire) < want
        && rdtsc().wrapping_sub(start) < 100 * time::ticks_per_ms()
    {
        pause();
    }
    1 + CHECKED_IN.load(Acquire).min(MAX_CPUS - 1)
}

/// Measures the local APIC timer's rate against the TSC over 1 ms, masked (no interrupt). Run
/// by the BSP before it starts APs, or by `edu` on the BSP the first time it needs the timer.
pub fn calibrate_timer() {
    lapic_write(LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_BY_1);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
    lapic_write(LAPIC_TIMER_INITIAL, u32::MAX);
    time::delay_us(1000);
    let ticks = u32::MAX - lapic_read(LAPIC_TIMER_CURRENT);
    lapic_write(LAPIC_TIMER_INITIAL, 0); // stop it
    TIMER_TICKS_PER_MS.store(ticks as u64, Release);
}

/// Local APIC timer ticks per millisecond (0: not measured yet, or the timer does not count).
pub fn timer_ticks_per_ms() -> u64 {
    TIMER_TICKS_PER_MS.load(Acquire)
}

/// Sleeps about `us` microseconds: arms this CPU's local APIC timer (one-shot) and executes
/// `hlt`, which the kernel turns into "wait for an interrupt" with interrupts enabled. The timer
/// is armed right before the `hlt`, in one asm block: an interrupt must never become pending
/// while CPL-3 code runs with IF = 0 (on PVM, KVM would then emulate instructions until IF = 1).
fn sleep_us(us: u64) {
    let ticks = (TIMER_TICKS_PER_MS.load(Relaxed) * us / 1000).clamp(1, u32::MAX as u64) as u32;
    // SAFETY: the timer register is identity mapped; the kernel returns past the `hlt`.
    unsafe {
        asm!("mov dword ptr [{reg}], {ticks:e}", "hlt",
             reg = in(reg) LAPIC_BASE + LAPIC_TIMER_INITIAL, ticks = in(reg) ticks,
             options(nostack))
    };
}

/// An AP's life after boot, at CPL 3 (entered from `kernel.rs` with its index, 1..MAX_CPUS).
pub extern "C" fn ap_main(cpu: u32) -> ! {
    let cpu = cpu as usize;
    let seed = SEED.load(Acquire);
    arena::init(cpu, seed);
    let mut fpu = Fpu::start(cpu);
    ONLINE[cpu].store(true, Release);
    CHECKED_IN.fetch_add(1, AcqRel);
    let hold = fpu::ap_hold_ticks();
    let sleeps = TIMER_TICKS_PER_MS.load(Acquire) != 0;
    if sleeps {
        // This CPU's local APIC: software-enable it (LVT entries stay masked otherwise), then
        // set its timer up.
        lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x1ff);
        lapic_write(LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_BY_1);
        lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR); // one-shot, unmasked
    }
    let mut iter = 0u64;
    let mut prev = rdtsc();
    loop {
        arena::step(cpu, iter, seed);
        fpu.check_and_advance();
        fpu.hold(hold);
        if sleeps {
            sleep_us(AP_SLEEP_US);
        }
        iter += 1;
        ITERS[cpu].store(iter, Release);
        note_gap(cpu, &mut prev);
    }
}
