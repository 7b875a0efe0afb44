//! The BSP's main loop: heartbeats, its own arena and FPU checks, failure lines, and the
//! commands read from COM1 (`v`, `c`, `d`, `s`, `q`; every other byte is ignored).

use crate::arena;
use crate::cpu::{halt_forever, rdtsc};
use crate::edu;
use crate::fpu::Fpu;
use crate::memory::{self, Layout};
use crate::pm::Pm;
use crate::report::{self, What};
use crate::smp::{note_gap, ITERS, MAX_GAP, ONLINE};
use crate::time::ticks_per_ms;
use crate::uart::{getc_if_ready, line, putc};
use crate::MAX_CPUS;
use core::sync::atomic::{AtomicU64, Ordering::*};

/// Heartbeats emitted so far.
static HEARTBEATS: AtomicU64 = AtomicU64::new(0);
/// `s` commands handled so far.
static SUSPENDS: AtomicU64 = AtomicU64::new(0);

/// How long `v` waits for each online AP to show progress before reporting it stalled.
const STALL_TIMEOUT_MS: u64 = 500;

/// One `.` on COM1 about every millisecond of TSC time. Never bursts to catch up after a pause:
/// a late heartbeat just restarts the period.
pub struct Heartbeat {
    period: u64,
    last: u64,
}

impl Heartbeat {
    fn new() -> Heartbeat {
        Heartbeat {
            period: ticks_per_ms(),
            last: rdtsc(),
        }
    }

    /// TSC ticks until the next heartbeat is due (0 if it is due now).
    pub fn remaining(&self, now: u64) -> u64 {
        self.period.saturating_sub(now.wrapping_sub(self.last))
    }

    /// Emits a heartbeat if one is due; returns the UART line status read meanwhile if it did.
    pub fn tick(&mut self) -> Option<u8> {
        let now = rdtsc();
        if now.wrapping_sub(self.last) >= self.period {
            let lsr = putc(b'.');
            self.last = now;
            HEARTBEATS.fetch_add(1, Relaxed);
            Some(lsr)
        } else {
            None
        }
    }
}

/// Everything the BSP keeps after boot.
pub struct Bsp {
    pub pm: Pm,
    pub layout: &'static Layout,
    pub seed: u64,
    pub cpus: usize,
    hb: Heartbeat,
    fpu: Fpu,
    /// TSC at the previous iteration, to notice it going backwards.
    last_tsc: u64,
}

impl Bsp {
    pub fn new(pm: Pm, layout: &'static Layout, seed: u64, cpus: usize, fpu: Fpu) -> Bsp {
        Bsp {
            pm,
            layout,
            seed,
            cpus,
            hb: Heartbeat::new(),
            fpu,
            last_tsc: rdtsc(),
        }
    }

    /// The main loop: one iteration per heartbeat period (the FPU hold window fills the rest).
    pub fn run(mut self) -> ! {
        let mut iter = 0u64;
        let mut printed = 0u64; // failures printed so far (cursor into the failure log)
        let mut prev = rdtsc();
        loop {
            arena::step(0, iter, self.seed);
            self.fpu.check_and_advance();
            self.check_tsc(iter);
            report::print_new(&mut printed);
            self.fpu.hold(self.hb.remaining(rdtsc()));
            // Input is polled once per heartbeat, with the line status the heartbeat read.
            let byte = self.hb.tick().and_then(getc_if_ready);
            note_gap(0, &mut prev);
            if let Some(byte) = byte {
                self.command(byte);
                // The answer's own time is not a stall.
                prev = rdtsc();
            }
            iter += 1;
            ITERS[0].store(iter, Release);
        }
    }

    /// Records a `tsc` failure if the TSC went backwards by more than a millisecond.
    fn check_tsc(&mut self, iter: u64) {
        let now = rdtsc();
        if self.last_tsc > now.saturating_add(ticks_per_ms()) {
            report::record(What::Tsc, 0, iter, 0, self.last_tsc, now);
        }
        self.last_tsc = now;
    }

    fn command(&mut self, byte: u8) {
        match byte {
            b'v' => self.verify(),
            b'c' => self.counters(),
            b'g' => self.reset_gaps(),
            b'd' => edu::check(self.seed, &mut self.hb),
            b's' => self.suspend(),
            b'q' => self.poweroff(),
            _ => {}
        }
    }

    /// `v`: static region, every arena, AP progress, then any failure recorded so far.
    fn verify(&mut self) {
        match self.verify_inner() {
            Ok(hash) => line().s("VERIFY OK ").hex(hash).end(),
            Err(i) => report::print(i, line().s("VERIFY FAIL ")).end(),
        }
    }

    /// The hash, or the number of the failure to report.
    fn verify_inner(&mut self) -> Result<u64, u64> {
        let hb = &mut self.hb;
        let hash = memory::verify(self.layout, self.seed, &mut || {
            hb.tick();
        })?;
        for cpu in (0..MAX_CPUS).filter(|&c| ONLINE[c].load(Acquire)) {
            arena::verify(cpu, self.seed)?;
        }
        // Every online AP must still make progress.
        for cpu in (1..MAX_CPUS).filter(|&c| ONLINE[c].load(Acquire)) {
            let before = ITERS[cpu].load(Acquire);
            let start = rdtsc();
            while ITERS[cpu].load(Acquire) == before {
                if rdtsc().wrapping_sub(start) > STALL_TIMEOUT_MS * ticks_per_ms() {
                    return Err(report::record(What::Stall, cpu, before, 0, 0, 0));
                }
                self.hb.tick();
            }
        }
        // Anything any CPU recorded earlier (FPU state, arena pages) also fails the check.
        if report::count() > 0 {
            return Err(0);
        }
        Ok(hash)
    }

    /// `c`: the counters line.
    fn counters(&mut self) {
        let mut l = line()
            .s("COUNTERS hb=")
            .dec(HEARTBEATS.load(Relaxed))
            .s(" cpus=")
            .dec(self.cpus as u64)
            .s(" iters=");
        for (cpu, iters) in ITERS.iter().enumerate().take(self.cpus) {
            if cpu > 0 {
                l = l.s(",");
            }
            l = l.dec(iters.load(Acquire));
        }
        l = l.s(" maxgap_us=");
        let per_us = (ticks_per_ms() / 1000).max(1);
        for (cpu, gap) in MAX_GAP.iter().enumerate().take(self.cpus) {
            if cpu > 0 {
                l = l.s(",");
            }
            l = l.dec(gap.load(Relaxed) / per_us);
        }
        l.s(" fails=")
            .dec(report::count())
            .s(" suspends=")
            .dec(SUSPENDS.load(Relaxed))
            .s(" seed=")
            .hex(self.seed)
            .end();
    }

    /// `g`: forgets the largest gaps seen so far (`maxgap_us` in COUNTERS starts again).
    fn reset_gaps(&mut self) {
        for gap in &MAX_GAP {
            gap.store(0, Relaxed);
        }
        line().s("GAPS RESET").end();
    }

    /// `s`: S3 through PM1a_CNT; under vmmd execution continues here once woken.
    fn suspend(&mut self) {
        line().s("SUSPEND").end();
        SUSPENDS.fetch_add(1, Relaxed);
        self.pm.suspend();
        line().s("WAKE").end();
        self.last_tsc = rdtsc(); // real S3 may reset the TSC: not a failure
    }

    /// `q`: S5 through PM1a_CNT; if that did not stop us, halt.
    fn poweroff(&mut self) -> ! {
        line().s("POWEROFF").end();
        self.pm.poweroff();
        halt_forever()
    }
}
