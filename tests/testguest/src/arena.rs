//! Per-CPU mutation arenas: memory that keeps changing while the guest runs, so a VMM that loses
//! a write (a stale page, a dirty page not carried over) is caught.
//!
//! Each CPU owns [`ARENA_PAGES`] 4 KiB pages (in the image's .bss, so outside the static pattern).
//! Every iteration it takes the next page in turn, checks that it still holds the pattern of its
//! current generation, then rewrites it with the next generation. Every word of the page at `a`
//! with generation `g` holds `splitmix64(a ^ seed ^ g * GOLDEN)`.
//!
//! Each page's generation lives in a sequence counter `seq` (a seqlock): `seq = 2 * gen` when the
//! page is stable, odd while its owner is rewriting it. So the BSP can check other CPUs' pages
//! during `v` without stopping them: read `seq`, skip if odd, check the page, and trust a mismatch
//! only if `seq` did not move meanwhile.

use crate::cpu::read_word;
use crate::memory::splitmix64;
use crate::memory::{check_page as check_words, write_page};
use crate::report::{self, What};
use crate::MAX_CPUS;
use core::cell::UnsafeCell;
use core::sync::atomic::{fence, AtomicU64, Ordering::*};

/// Pages per CPU (64 KiB).
pub const ARENA_PAGES: usize = 16;
const WORDS: u64 = 512;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

#[repr(C, align(4096))]
struct Page([u64; WORDS as usize]);

struct Arenas(UnsafeCell<[[Page; ARENA_PAGES]; MAX_CPUS]>);

// SAFETY: a page is only written by its owner CPU, inside a seqlock write section; readers
// validate what they read against the sequence counter.
unsafe impl Sync for Arenas {}

static ARENAS: Arenas = Arenas(UnsafeCell::new(
    [const { [const { Page([0; WORDS as usize]) }; ARENA_PAGES] }; MAX_CPUS],
));
static SEQ: [[AtomicU64; ARENA_PAGES]; MAX_CPUS] =
    [const { [const { AtomicU64::new(0) }; ARENA_PAGES] }; MAX_CPUS];

fn page_addr(cpu: usize, page: usize) -> u64 {
    ARENAS.0.get() as u64 + ((cpu * ARENA_PAGES + page) as u64) * WORDS * 8
}

fn value(addr: u64, seed: u64, gen: u64) -> u64 {
    splitmix64(addr ^ seed ^ gen.wrapping_mul(GOLDEN))
}

/// First word of a page that does not match generation `gen`: (address, expected, got).
fn check_page(base: u64, seed: u64, gen: u64) -> Option<(u64, u64, u64)> {
    let expected = value(base, seed, gen);
    // SAFETY: `base` is an arena page.
    let addr = unsafe { check_words(base, expected) }?;
    // SAFETY: `addr` is inside that page.
    Some((addr, expected, unsafe { read_word(addr) }))
}

/// Writes generation 0 over all of `cpu`'s pages. The owner calls it once before going online.
pub fn init(cpu: usize, seed: u64) {
    for (page, seq) in SEQ[cpu].iter().enumerate() {
        seq.store(0, Relaxed);
        let base = page_addr(cpu, page);
        // SAFETY: the page belongs to `cpu`, the caller.
        unsafe { write_page(base, value(base, seed, 0)) };
    }
    fence(Release);
}

/// One mutation step by `cpu` (its owner): check page `iter % ARENA_PAGES` against its
/// generation, record a failure if it changed, then rewrite it with the next generation.
pub fn step(cpu: usize, iter: u64, seed: u64) {
    let page = (iter % ARENA_PAGES as u64) as usize;
    let base = page_addr(cpu, page);
    let seq = &SEQ[cpu][page];
    let s = seq.load(Relaxed);
    let gen = s / 2;
    if let Some((addr, expected, got)) = check_page(base, seed, gen) {
        report::record(What::Arena, cpu, gen, addr, expected, got);
    }
    seq.store(s + 1, Relaxed); // odd: being rewritten
    fence(Release);
    // SAFETY: the page belongs to `cpu`, the caller.
    unsafe { write_page(base, value(base, seed, gen + 1)) };
    seq.store(s + 2, Release);
}

/// Checks every page of `cpu`'s arena while its owner may be running (BSP, for `v`). A bad page
/// is recorded; the error is its failure number.
pub fn verify(cpu: usize, seed: u64) -> Result<(), u64> {
    for (page, seq) in SEQ[cpu].iter().enumerate() {
        let base = page_addr(cpu, page);
        // A few tries: each fails only if the owner rewrote the page under us.
        for _ in 0..100 {
            let s1 = seq.load(Acquire);
            if s1 % 2 == 1 {
                crate::cpu::pause();
                continue;
            }
            let bad = check_page(base, seed, s1 / 2);
            fence(Acquire);
            if seq.load(Relaxed) != s1 {
                continue;
            }
            if let Some((addr, expected, got)) = bad {
                return Err(report::record(
                    What::Arena,
                    cpu,
                    s1 / 2,
                    addr,
                    expected,
                    got,
                ));
            }
            break;
        }
    }
    Ok(())
}

/// Physical extent of all arenas `[start, end)`.
pub fn range() -> (u64, u64) {
    let start = page_addr(0, 0);
    (start, start + (MAX_CPUS * ARENA_PAGES) as u64 * WORDS * 8)
}
