//! The static memory pattern: every 4 KiB page of RAM above 1 MiB that the image does not use is
//! filled with one 64-bit value, `splitmix64(page physical address ^ seed)`, in every word.
//! Written once at boot with `rep stosq`, checked by `v` with `repe scasq`.
//!
//! One value per page (rather than per word) keeps boot and `v` fast; a VMM loses, swaps or
//! stales memory in whole pages anyway, and every page still holds a value no other page has.
//! This runs at CPL 3, natively: filling costs about what the host's first touch of each page
//! costs. (The BOOT line says `pattern=full`; an earlier version of the guest, which ran under
//! the instruction emulator, wrote only two words per page, `pattern=stamps`.)
//!
//! The "static region" is every type-1 (RAM) entry of the PVH memory map, clipped to
//! [1 MiB, 64 GiB) and to whole pages, minus the image itself (code, data, bss: page tables,
//! stacks, the mutation arenas of `arena.rs`). Memory below 1 MiB is left alone (boot structures,
//! the AP trampoline).

use crate::cpu::{fill_words, find_other_word, read_word};
use crate::kernel::{image_range, IDENTITY_MAP_BYTES};
use crate::pvh::{BootInfo, E820_RAM, MAX_MEMMAP};
use crate::report::{self, What};
use core::cell::UnsafeCell;

/// Start of the static region: everything below is left alone.
const LOW_LIMIT: u64 = 1 << 20;
const PAGE: u64 = 4096;
const WORDS_PER_PAGE: u64 = PAGE / 8;
/// Pages between two calls of the verify loop's `tick` callback (64 KiB).
const TICK_PAGES: u64 = 16;

/// The splitmix64 finaliser: a cheap, well-mixed 64-bit hash.
#[inline(always)]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The static pattern's value for every word of the page at physical address `page`.
#[inline(always)]
pub fn pattern(page: u64, seed: u64) -> u64 {
    splitmix64(page ^ seed)
}

/// A physical range `[start, end)`, page aligned.
#[derive(Clone, Copy)]
pub struct Region {
    pub start: u64,
    pub end: u64,
}

/// The static region: up to one more piece than memory map entries (the image splits one).
pub struct Layout {
    regions: [Region; MAX_MEMMAP + 1],
    len: usize,
}

struct LayoutCell(UnsafeCell<Layout>);
// SAFETY: written once by the BSP before it starts using it; only the BSP uses it.
unsafe impl Sync for LayoutCell {}
static LAYOUT: LayoutCell = LayoutCell(UnsafeCell::new(Layout {
    regions: [Region { start: 0, end: 0 }; MAX_MEMMAP + 1],
    len: 0,
}));

impl Layout {
    /// Computes the static region from the memory map (once, on the BSP).
    pub fn compute(info: &BootInfo) -> &'static Layout {
        // SAFETY: called once at boot, before any reference to LAYOUT exists.
        let layout = unsafe { &mut *LAYOUT.0.get() };
        let (image_start, image_end) = image_range();
        for e in info.memmap() {
            if e.kind != E820_RAM {
                continue;
            }
            let start = e.addr.max(LOW_LIMIT);
            let end = e.addr.saturating_add(e.size).min(IDENTITY_MAP_BYTES);
            // Cut the image out: keep what lies below it and what lies above it.
            layout.push(start, end.min(image_start));
            layout.push(start.max(image_end), end);
        }
        layout
    }

    fn push(&mut self, start: u64, end: u64) {
        let (start, end) = ((start + PAGE - 1) & !(PAGE - 1), end & !(PAGE - 1));
        if start < end && self.len < self.regions.len() {
            self.regions[self.len] = Region { start, end };
            self.len += 1;
        }
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.len]
    }

    /// Bytes covered by the pattern.
    pub fn bytes(&self) -> u64 {
        let mut total = 0;
        for r in self.regions() {
            total += r.end - r.start;
        }
        total
    }
}

/// Writes `value` over every word of the page at `page`.
///
/// # Safety
/// `page` must be a writable, identity-mapped page.
pub unsafe fn write_page(page: u64, value: u64) {
    // SAFETY: per the caller.
    unsafe { fill_words(page, WORDS_PER_PAGE, value) }
}

/// The first word of the page at `page` that is not `value`.
///
/// # Safety
/// `page` must be a readable, identity-mapped page.
pub unsafe fn check_page(page: u64, value: u64) -> Option<u64> {
    // SAFETY: per the caller.
    unsafe { find_other_word(page, WORDS_PER_PAGE, value) }
}

/// Writes the pattern over the whole static region.
pub fn fill(layout: &Layout, seed: u64) {
    for r in layout.regions() {
        let mut page = r.start;
        while page < r.end {
            // SAFETY: the static region is RAM the image does not use, identity mapped.
            unsafe { write_page(page, pattern(page, seed)) };
            page += PAGE;
        }
    }
}

/// Checks every word of the static region and hashes its contents with the seed.
///
/// Returns the hash, or records a `memory` failure naming the first bad word (and counting the
/// bad pages) and returns its failure number. `tick` is called every 64 KiB so the caller can keep its heartbeat going.
///
/// The hash folds in each page's value and how many of its words hold it; since those words were
/// just checked, it is a hash of the region's (checked) contents.
pub fn verify(layout: &Layout, seed: u64, tick: &mut dyn FnMut()) -> Result<u64, u64> {
    let mut hash = splitmix64(seed);
    let mut pages = 0u64;
    let mut bad = 0u64;
    let (mut first_addr, mut first_expected, mut first_got) = (0, 0, 0);
    for r in layout.regions() {
        let mut page = r.start;
        while page < r.end {
            let expected = pattern(page, seed);
            // SAFETY: as in `fill`.
            if let Some(addr) = unsafe { check_page(page, expected) } {
                if bad == 0 {
                    // SAFETY: `addr` is inside the page just scanned.
                    (first_addr, first_expected, first_got) =
                        (addr, expected, unsafe { read_word(addr) });
                }
                bad += 1;
            }
            hash = (hash.rotate_left(23) ^ expected ^ WORDS_PER_PAGE)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
            pages += 1;
            if pages & (TICK_PAGES - 1) == 0 {
                tick();
            }
            page += PAGE;
        }
    }
    if bad == 0 {
        Ok(splitmix64(hash ^ pages))
    } else {
        Err(report::record(
            What::Memory,
            0,
            bad,
            first_addr,
            first_expected,
            first_got,
        ))
    }
}
