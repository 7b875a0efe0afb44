//! Failure records shared by all CPUs.
//!
//! Any CPU that detects a failure calls [`record`]: the global counter goes up and, for the first
//! [`LOG_LEN`] failures, the details are stored in a slot. The BSP prints each new slot once as
//! `FAIL <what> cpu=<n> <detail>` ([`print_new`]); past the log's capacity it prints one
//! `FAIL overflow cpu=0 total=<n>` line per batch instead.
//!
//! Details travel as plain words written with volatile stores before the slot's `ready` flag is
//! set, so a reader on another CPU sees either nothing or the whole record.

use crate::uart::{line, Line};
use core::cell::UnsafeCell;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};

/// How many failure details are kept.
pub const LOG_LEN: usize = 64;

/// What failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum What {
    /// A word of the static pattern region (found by `v`). loc = address.
    Memory = 1,
    /// A word of a mutation arena page. loc = address.
    Arena,
    /// An x87 register (loc = 0..7: st0..st7) or the x87 control word (loc = 8) lost its value.
    X87,
    /// The upper half of a ymm register lost its value. loc = [`reg`].
    Ymm,
    /// An xmm register lost its value (xmm8..15 between iterations, xmm0..7 in a hold window).
    /// loc = [`reg`].
    Xmm,
    /// MXCSR lost its value between iterations.
    Mxcsr,
    /// The BSP saw its TSC go backwards by more than a millisecond.
    Tsc,
    /// An online AP made no progress during `v`.
    Stall,
}

impl What {
    fn from_u8(v: u8) -> Option<What> {
        Some(match v {
            1 => What::Memory,
            2 => What::Arena,
            3 => What::X87,
            4 => What::Ymm,
            5 => What::Xmm,
            6 => What::Mxcsr,
            7 => What::Tsc,
            8 => What::Stall,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            What::Memory => "memory",
            What::Arena => "arena",
            What::X87 => "x87",
            What::Ymm => "ymm",
            What::Xmm => "xmm",
            What::Mxcsr => "mxcsr",
            What::Tsc => "tsc",
            What::Stall => "stall",
        }
    }
}

/// Encodes register `idx`, 64-bit lane `lane` as a failure location.
pub fn reg(idx: usize, lane: usize) -> u64 {
    (idx as u64) | (lane as u64) << 8
}

/// Words per slot: what | cpu << 8, iter, loc, expected, got.
const WORDS: usize = 5;

struct Slot {
    ready: AtomicBool,
    words: UnsafeCell<[u64; WORDS]>,
}

// SAFETY: a slot is written once, by the CPU that claimed its index, before `ready` is set with
// Release; it is read only after `ready` is seen with Acquire.
unsafe impl Sync for Slot {}

static COUNT: AtomicU64 = AtomicU64::new(0);
static LOG: [Slot; LOG_LEN] = [const {
    Slot {
        ready: AtomicBool::new(false),
        words: UnsafeCell::new([0; WORDS]),
    }
}; LOG_LEN];

/// Records a failure (any CPU); returns its number. `iter` is the detecting CPU's iteration (for
/// `memory`: the number of bad pages; `arena`: the page's generation; `stall`: the AP's
/// iteration count). Never inlined, so callers pass plain registers, not a struct.
#[inline(never)]
pub fn record(what: What, cpu: usize, iter: u64, loc: u64, expected: u64, got: u64) -> u64 {
    let i = COUNT.fetch_add(1, AcqRel);
    if let Some(slot) = LOG.get(i as usize) {
        let w = slot.words.get() as *mut u64;
        // SAFETY: index `i` is ours alone (fetch_add), and nobody reads it before `ready`.
        unsafe {
            write_volatile(w, what as u64 | (cpu as u64) << 8);
            write_volatile(w.add(1), iter);
            write_volatile(w.add(2), loc);
            write_volatile(w.add(3), expected);
            write_volatile(w.add(4), got);
        }
        slot.ready.store(true, Release);
    }
    i
}

/// How many failures have been recorded so far.
pub fn count() -> u64 {
    COUNT.load(Acquire)
}

/// Word `k` of failure `i`, if its details are stored and complete.
fn word(i: u64, k: usize) -> Option<u64> {
    let slot = LOG.get(i as usize)?;
    if !slot.ready.load(Acquire) {
        return None;
    }
    // SAFETY: `ready` is set only after the write, which never happens again.
    Some(unsafe { read_volatile((slot.words.get() as *const u64).add(k)) })
}

/// True once failure `i`'s details are in the log.
fn ready(i: u64) -> bool {
    word(i, 0).is_some()
}

/// Prints failure `i` as `<what> cpu=<n> <detail>` onto a line being built (or
/// `overflow cpu=0 total=<n>` if its details were not kept).
pub fn print(i: u64, l: Line) -> Line {
    let (Some(w0), Some(iter), Some(loc), Some(expected), Some(got)) =
        (word(i, 0), word(i, 1), word(i, 2), word(i, 3), word(i, 4))
    else {
        return l.s("overflow cpu=0 total=").dec(count());
    };
    let Some(what) = What::from_u8(w0 as u8) else {
        return l.s("overflow cpu=0 total=").dec(count());
    };
    let l = l.s(what.name()).s(" cpu=").dec(w0 >> 8);
    let (idx, lane) = (loc & 0xff, (loc >> 8) & 0xff);
    match what {
        What::Memory => l
            .s(" addr=")
            .hex(loc)
            .s(" expected=")
            .hex(expected)
            .s(" got=")
            .hex(got)
            .s(" bad_pages=")
            .dec(iter),
        What::Arena => l
            .s(" addr=")
            .hex(loc)
            .s(" expected=")
            .hex(expected)
            .s(" got=")
            .hex(got)
            .s(" gen=")
            .dec(iter),
        What::Tsc => l.s(" before=").hex(expected).s(" after=").hex(got),
        What::Stall => l.s(" iters=").dec(iter),
        What::Mxcsr => l
            .s(" iter=")
            .dec(iter)
            .s(" expected=")
            .hex(expected)
            .s(" got=")
            .hex(got),
        What::X87 if idx == 8 => l
            .s(" iter=")
            .dec(iter)
            .s(" reg=fcw expected=")
            .hex(expected)
            .s(" got=")
            .hex(got),
        What::X87 => l
            .s(" iter=")
            .dec(iter)
            .s(" reg=st")
            .dec(idx)
            .s(" expected=")
            .hex(expected)
            .s(" got=")
            .hex(got),
        What::Xmm | What::Ymm => l
            .s(" iter=")
            .dec(iter)
            .s(" reg=")
            .s(what.name())
            .dec(idx)
            .s("[")
            .dec(lane)
            .s("]")
            .s(" expected=")
            .hex(expected)
            .s(" got=")
            .hex(got),
    }
}

/// Prints failures recorded since the last call (BSP only). `printed` is the caller's cursor.
pub fn print_new(printed: &mut u64) {
    let total = count();
    while *printed < total {
        if *printed as usize >= LOG_LEN {
            line().s("FAIL overflow cpu=0 total=").dec(total).end();
            *printed = total;
            return;
        }
        if !ready(*printed) {
            return; // still being written: print it next time
        }
        print(*printed, line().s("FAIL ")).end();
        *printed += 1;
    }
}
