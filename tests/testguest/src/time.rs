//! Time keeping by the TSC, calibrated at boot against the PIT, as an OS does.
//!
//! PIT channel 2 is gated on through port 0x61 (speaker off) and programmed in mode 0 with a count
//! of ~20 ms; its output (port 0x61 bit 5) goes high when the count runs out. The TSC ticks seen
//! meanwhile give the TSC frequency. If the PIT does not answer sensibly, CPUID leaf 0x15/0x16
//! is used, and failing that a guess of 2 GHz (heartbeats would then be off by that ratio).

use crate::cpu::{cpuid, inb, outb, pause, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

const PIT_HZ: u64 = 1_193_182;
const PIT_CH2: u16 = 0x42;
const PIT_CMD: u16 = 0x43;
const PORT_61: u16 = 0x61;
/// PIT count for the calibration window: 20 ms.
const PIT_LATCH: u64 = PIT_HZ / 50;

/// TSC ticks per millisecond; set once by [`calibrate`] before any AP starts.
static TSC_PER_MS: AtomicU64 = AtomicU64::new(2_000_000);

/// Where the TSC frequency came from.
#[derive(Clone, Copy)]
pub enum Source {
    Pit,
    Cpuid,
    Guess,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Pit => "pit",
            Source::Cpuid => "cpuid",
            Source::Guess => "guess",
        }
    }
}

/// Measures the TSC frequency; returns where the answer came from.
pub fn calibrate() -> Source {
    let (per_ms, source) = match pit_tsc_per_ms() {
        Some(t) => (t, Source::Pit),
        None => match cpuid_tsc_per_ms() {
            Some(t) => (t, Source::Cpuid),
            None => (2_000_000, Source::Guess),
        },
    };
    TSC_PER_MS.store(per_ms, Relaxed);
    source
}

/// PIT channel 2 countdowns timed by the TSC: the first whose end was seen precisely enough
/// (each port access costs tens of microseconds, and the host may preempt the vCPU between two),
/// else the most precise of three. `None` if the PIT looks absent.
fn pit_tsc_per_ms() -> Option<u64> {
    let mut best: Option<(u64, u64)> = None;
    for _ in 0..3 {
        let (ticks, uncertainty) = pit_window()?;
        if best.is_none_or(|(_, u)| uncertainty < u) {
            best = Some((ticks, uncertainty));
        }
        if uncertainty <= ticks / 500 {
            break;
        }
    }
    let (ticks, _) = best?;
    // The window lasted PIT_LATCH / PIT_HZ seconds.
    let per_ms = ticks * PIT_HZ / (PIT_LATCH * 1000);
    // Plausible CPUs run between 100 MHz and 10 GHz.
    (100_000..=10_000_000).contains(&per_ms).then_some(per_ms)
}

/// One countdown of [`PIT_LATCH`]: (TSC ticks it took, uncertainty of that in ticks), or `None`
/// if the output never went high.
fn pit_window() -> Option<(u64, u64)> {
    let saved = inb(PORT_61);
    outb(PORT_61, (saved & !0x02) | 0x01); // gate channel 2 on, speaker off
    outb(PIT_CMD, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(PIT_CH2, (PIT_LATCH & 0xff) as u8);
    outb(PIT_CH2, (PIT_LATCH >> 8) as u8); // counting starts
    let start = rdtsc();
    let mut before = start;
    let mut end = None;
    // Bounded wait: even at 10 GHz the window is 2e8 ticks; give up after ~25x that.
    while before.wrapping_sub(start) < 5_000_000_000 {
        let high = inb(PORT_61) & 0x20 != 0;
        let now = rdtsc();
        if high {
            end = Some((before, now));
            break;
        }
        before = now;
    }
    outb(PORT_61, saved);
    // The output went high between the last two reads. Each TSC read follows the port access it
    // times by about the same latency (the write that started the count included), so taking
    // the middle leaves an error of at most half the gap between the two.
    let (before, after) = end?;
    Some((before / 2 + after / 2 - start, after - before))
}

/// TSC frequency from CPUID 0x15 (crystal ratio) or 0x16 (base MHz), when the CPU reports it.
fn cpuid_tsc_per_ms() -> Option<u64> {
    let (max_leaf, ..) = cpuid(0);
    if max_leaf >= 0x15 {
        let (den, num, crystal_hz, _) = cpuid(0x15);
        if den != 0 && num != 0 && crystal_hz != 0 {
            return Some(crystal_hz as u64 * num as u64 / den as u64 / 1000);
        }
    }
    if max_leaf >= 0x16 {
        let (mhz, ..) = cpuid(0x16);
        if mhz != 0 {
            return Some((mhz & 0xffff) as u64 * 1000);
        }
    }
    None
}

/// TSC ticks per millisecond.
pub fn ticks_per_ms() -> u64 {
    TSC_PER_MS.load(Relaxed)
}

/// TSC ticks per microsecond (at least 1).
pub fn ticks_per_us() -> u64 {
    (ticks_per_ms() / 1000).max(1)
}

/// Busy-waits for `us` microseconds.
pub fn delay_us(us: u64) {
    let start = rdtsc();
    let ticks = us * ticks_per_us();
    // wrapping_sub: a TSC that jumps backwards ends the wait instead of hanging it.
    while rdtsc().wrapping_sub(start) < ticks {
        pause();
    }
}
