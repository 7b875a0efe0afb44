//! Keeps x87, SSE and AVX state live across iterations, so a VMM that saves or restores a vCPU's
//! FPU/xsave state wrongly is caught.
//!
//! Registers the compiled code never touches hold values from one iteration to the next:
//! * all 8 x87 registers and the x87 control word (the compiler never uses x87);
//! * MXCSR (the guest does no floating-point arithmetic);
//! * xmm8..xmm15 (`scripts/check-insns.py` checks that no compiled code uses them);
//! * the upper halves of ymm0..ymm15, when AVX is usable (compiled code only uses legacy SSE
//!   encodings, which leave them alone).
//!
//! Each iteration, [`Fpu::check_and_advance`] saves them with `fxsave` (and `vextractf128`),
//! compares with what the previous iteration loaded, and loads values derived from the next
//! iteration number with `fxrstor` (and `vinsertf128`). All of it runs at CPL 3, natively; the
//! AVX part runs when CPUID reports AVX and OSXSAVE and XCR0 enables the AVX state (the kernel
//! sets XCR0 = x87 | SSE | AVX when the CPU has XSAVE and AVX).
//!
//! xmm0..xmm7 are free for compiled code, so they are checked inside one asm block instead:
//! [`Fpu::hold`] loads them, spins for a while (where a CPU spends most of its time), then checks.

use crate::cpu::cpuid;
use crate::memory::splitmix64;
use crate::report::{self, reg, What};
use crate::MAX_CPUS;
use core::arch::asm;
use core::cell::UnsafeCell;
use core::ptr::{read_volatile, write_volatile};

// FXSAVE area layout (Intel SDM vol. 1, 10.5.1).
const FX_FCW: usize = 0;
const FX_FTW: usize = 4;
const FX_MXCSR: usize = 24;
const FX_ST0: usize = 32;
const FX_XMM0: usize = 160;
/// MXCSR with all exceptions masked; RC (bits 13-14) and FZ (bit 15) vary per iteration.
const MXCSR_BASE: u32 = 0x1f80;
/// x87 control word with all exceptions masked, 64-bit precision; RC (bits 10-11) varies.
const FCW_BASE: u16 = 0x037f;

/// Per-CPU buffers (static: the hot path builds no arrays on the stack).
#[repr(C, align(64))]
struct Buffers {
    /// What `fxrstor` loads.
    image: [u8; 512],
    /// What `fxsave` stored.
    saved: [u8; 512],
    /// xmm0..xmm7 for the hold window, loaded and read back.
    hold_in: [u64; 16],
    hold_out: [u64; 16],
    /// Upper halves of ymm0..ymm15, loaded and read back.
    ymm_in: [u64; 32],
    ymm_out: [u64; 32],
    /// Cache for `Fpu::value`: the iteration whose hash `base` holds.
    base_iter: u64,
    base: u64,
}

struct AllBuffers(UnsafeCell<[Buffers; MAX_CPUS]>);
// SAFETY: each CPU only touches its own entry.
unsafe impl Sync for AllBuffers {}
static BUFFERS: AllBuffers = AllBuffers(UnsafeCell::new(
    [const {
        Buffers {
            image: [0; 512],
            saved: [0; 512],
            hold_in: [0; 16],
            hold_out: [0; 16],
            ymm_in: [0; 32],
            ymm_out: [0; 32],
            base_iter: 0,
            base: 0,
        }
    }; MAX_CPUS],
));

/// Volatile accesses keep the compiler from merging the fields into vector operations (which
/// might pick xmm8..15, the registers held across iterations).
fn put<T>(buf: *mut u8, off: usize, v: T) {
    // SAFETY: callers pass naturally aligned offsets inside a 512-byte, 64-aligned FXSAVE area.
    unsafe { write_volatile(buf.add(off) as *mut T, v) }
}

fn get<T>(buf: *const u8, off: usize) -> T {
    // SAFETY: as in `put`.
    unsafe { read_volatile(buf.add(off) as *const T) }
}

/// True if AVX is usable: the CPU has it and the kernel enabled it in XCR0.
fn avx_usable() -> bool {
    let (_, _, ecx, _) = cpuid(1);
    if ecx & (1 << 27) == 0 || ecx & (1 << 28) == 0 {
        return false; // no OSXSAVE, or no AVX
    }
    let (lo, _hi): (u32, u32);
    // SAFETY: XGETBV(0) is valid when CR4.OSXSAVE is set (CPUID.1:ECX.OSXSAVE says it is).
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") _hi, options(nomem, nostack)) };
    lo & 0b110 == 0b110
}

/// Per-CPU FPU checker; lives on its CPU's stack for the whole run.
pub struct Fpu {
    cpu: usize,
    avx: bool,
    /// The iteration whose values the registers hold now.
    iter: u64,
    bufs: *mut Buffers,
}

impl Fpu {
    /// Loads iteration 0's values.
    pub fn start(cpu: usize) -> Fpu {
        // SAFETY: only an address is computed; entry `cpu` is this CPU's alone.
        let bufs = unsafe { (BUFFERS.0.get() as *mut Buffers).add(cpu) };
        // SAFETY: this CPU's buffers; invalidate `value`'s cache.
        unsafe { write_volatile(&raw mut (*bufs).base_iter, u64::MAX) };
        let fpu = Fpu {
            cpu,
            avx: avx_usable(),
            iter: 0,
            bufs,
        };
        fpu.build_image(0);
        // SAFETY: the image is a valid FXSAVE area (reserved MXCSR bits clear), 16-byte aligned.
        unsafe {
            asm!("fxrstor [{img}]", img = in(reg) (*bufs).image.as_ptr(),
                 out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                 out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                 out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                 out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                 options(nostack, readonly))
        };
        if fpu.avx {
            fpu.build_ymm(0);
            fpu.ymm_swap();
        }
        fpu.build_hold(0);
        fpu
    }

    fn build_hold(&self, iter: u64) {
        for i in 0..16 {
            // SAFETY: this CPU's buffers.
            unsafe {
                write_volatile(
                    &mut (*self.bufs).hold_in[i],
                    self.value(iter, 128 + i as u64),
                )
            };
        }
    }

    /// Whether the ymm upper halves are checked.
    pub fn avx(&self) -> bool {
        self.avx
    }

    /// Value number `slot` of iteration `iter` on this CPU: one hash per iteration, cheap per
    /// slot. Never inlined, which keeps the loops calling it simple (and away from xmm8..15).
    #[inline(never)]
    fn value(&self, iter: u64, slot: u64) -> u64 {
        // SAFETY: this CPU's buffers.
        let (cached_iter, cached) =
            unsafe { (&raw mut (*self.bufs).base_iter, &raw mut (*self.bufs).base) };
        // SAFETY: as above.
        unsafe {
            if read_volatile(cached_iter) != iter {
                write_volatile(cached_iter, iter);
                write_volatile(cached, splitmix64(((self.cpu as u64) << 56) ^ iter));
            }
            read_volatile(cached)
                ^ (slot + 1)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .rotate_left(slot as u32)
        }
    }

    fn fcw(&self, iter: u64) -> u16 {
        FCW_BASE | ((iter & 3) as u16) << 10
    }

    fn mxcsr(&self, iter: u64) -> u32 {
        MXCSR_BASE | (((iter ^ self.cpu as u64) & 7) as u32) << 13
    }

    /// x87 register `k` of iteration `iter`: (64-bit significand, sign + exponent), a normal number.
    fn st(&self, iter: u64, k: usize) -> (u64, u16) {
        let v = self.value(iter, k as u64);
        (
            v | 1 << 63,
            (0x3f80 + ((v >> 48) & 0x7f) as u16) | (((v & 1) as u16) << 15),
        )
    }

    /// Writes iteration `iter`'s values into the `fxrstor` image.
    fn build_image(&self, iter: u64) {
        // SAFETY: this CPU's buffers.
        let img = unsafe { (*self.bufs).image.as_mut_ptr() };
        put(img, FX_FCW, self.fcw(iter));
        put(img, FX_FTW, 0xffu8); // abridged tag word: all 8 registers valid
        put(img, FX_MXCSR, self.mxcsr(iter));
        for k in 0..8 {
            let (mant, exp) = self.st(iter, k);
            put(img, FX_ST0 + 16 * k, mant);
            put(img, FX_ST0 + 16 * k + 8, exp);
        }
        for w in 16..32 {
            // xmm8..xmm15: words 16..31 of the xmm area
            put(img, FX_XMM0 + 8 * w, self.value(iter, 8 + w as u64));
        }
    }

    fn build_ymm(&self, iter: u64) {
        for i in 0..32 {
            // SAFETY: this CPU's buffers.
            unsafe { write_volatile(&mut (*self.bufs).ymm_in[i], self.value(iter, 64 + i as u64)) };
        }
    }

    fn fail(&self, what: What, loc: u64, expected: u64, got: u64) {
        report::record(what, self.cpu, self.iter, loc, expected, got);
    }

    /// Checks that the registers still hold this iteration's values, then loads the next's.
    /// The first mismatch of each kind is recorded; the registers are then overwritten, so each
    /// corruption is reported once.
    pub fn check_and_advance(&mut self) {
        let (iter, next) = (self.iter, self.iter + 1);
        self.build_image(next);
        // SAFETY: both areas are this CPU's, 16-byte aligned; the image is valid.
        unsafe {
            asm!("fxsave [{saved}]", "fxrstor [{img}]",
                 saved = in(reg) (*self.bufs).saved.as_mut_ptr(),
                 img = in(reg) (*self.bufs).image.as_ptr(),
                 out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                 out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                 out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                 out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                 options(nostack))
        };
        // SAFETY: this CPU's buffers.
        let saved = unsafe { (*self.bufs).saved.as_ptr() };

        let fcw: u16 = get(saved, FX_FCW);
        if fcw != self.fcw(iter) {
            self.fail(What::X87, 8, self.fcw(iter) as u64, fcw as u64);
        }
        for k in 0..8 {
            let (mant, exp) = self.st(iter, k);
            let (got_mant, got_exp): (u64, u16) =
                (get(saved, FX_ST0 + 16 * k), get(saved, FX_ST0 + 16 * k + 8));
            if got_mant != mant || got_exp != exp {
                let (e, g) = if got_mant != mant {
                    (mant, got_mant)
                } else {
                    (exp as u64, got_exp as u64)
                };
                self.fail(What::X87, k as u64, e, g);
                break;
            }
        }
        let mxcsr: u32 = get(saved, FX_MXCSR);
        if mxcsr & !0x3f != self.mxcsr(iter) & !0x3f {
            self.fail(What::Mxcsr, 0, self.mxcsr(iter) as u64, mxcsr as u64);
        }
        for w in 16..32 {
            let expected = self.value(iter, 8 + w as u64);
            let got: u64 = get(saved, FX_XMM0 + 8 * w);
            if got != expected {
                self.fail(What::Xmm, reg(w / 2, w % 2), expected, got);
                break;
            }
        }

        if self.avx {
            self.build_ymm(next);
            self.ymm_swap();
            for i in 0..32 {
                let expected = self.value(iter, 64 + i as u64);
                // SAFETY: this CPU's buffers.
                let got = unsafe { read_volatile(&(*self.bufs).ymm_out[i]) };
                if got != expected {
                    // ymm_out[2r], [2r + 1] = 64-bit lanes 2 and 3 (the upper half) of ymm r.
                    self.fail(What::Ymm, reg(i / 2, 2 + i % 2), expected, got);
                    break;
                }
            }
        }
        self.build_hold(next);
        self.iter = next;
    }

    /// Loads xmm0..xmm7 with values of the current iteration (computed by `check_and_advance`),
    /// spins `ticks` TSC ticks, and
    /// checks that they were not changed meanwhile.
    pub fn hold(&self, ticks: u64) {
        // SAFETY: only the declared registers are touched; legacy SSE moves leave the ymm upper
        // halves alone.
        unsafe {
            asm!(
                "movdqu xmm0, [{n}]", "movdqu xmm1, [{n} + 16]",
                "movdqu xmm2, [{n} + 32]", "movdqu xmm3, [{n} + 48]",
                "movdqu xmm4, [{n} + 64]", "movdqu xmm5, [{n} + 80]",
                "movdqu xmm6, [{n} + 96]", "movdqu xmm7, [{n} + 112]",
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                "mov {start}, rax",
                "2:",
                "pause",
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                "sub rax, {start}",
                "cmp rax, {ticks}",
                "jb 2b",
                "movdqu [{o}], xmm0", "movdqu [{o} + 16], xmm1",
                "movdqu [{o} + 32], xmm2", "movdqu [{o} + 48], xmm3",
                "movdqu [{o} + 64], xmm4", "movdqu [{o} + 80], xmm5",
                "movdqu [{o} + 96], xmm6", "movdqu [{o} + 112], xmm7",
                n = in(reg) (*self.bufs).hold_in.as_ptr(),
                o = in(reg) (*self.bufs).hold_out.as_mut_ptr(),
                ticks = in(reg) ticks,
                start = out(reg) _,
                out("rax") _, out("rdx") _,
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                options(nostack),
            )
        };
        for i in 0..16 {
            // SAFETY: this CPU's buffers.
            let (expected, got) = unsafe {
                (
                    read_volatile(&(*self.bufs).hold_in[i]),
                    read_volatile(&(*self.bufs).hold_out[i]),
                )
            };
            if got != expected {
                self.fail(What::Xmm, reg(i / 2, i % 2), expected, got);
                break;
            }
        }
    }

    /// Stores the upper halves of ymm0..ymm15 to `ymm_out` and loads new ones from `ymm_in`
    /// (`[2r, 2r + 1]` = lanes 2 and 3 of ymm r). The low halves are rewritten with their own
    /// value. VEX-encoded: only called when AVX is enabled. Never inlined, so
    /// `scripts/check-insns.py` can tell it apart.
    #[inline(never)]
    fn ymm_swap(&self) {
        macro_rules! swap {
            ($($r:literal),*) => { concat!($(
                "vextractf128 xmmword ptr [{o} + ", $r, " * 16], ymm", $r, ", 1\n",
                "vinsertf128 ymm", $r, ", ymm", $r, ", xmmword ptr [{n} + ", $r, " * 16], 1\n",
            )*) };
        }
        // SAFETY: AVX is enabled (checked by the caller); compiled code never uses the upper halves.
        unsafe {
            asm!(
                swap!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                o = in(reg) (*self.bufs).ymm_out.as_mut_ptr(),
                n = in(reg) (*self.bufs).ymm_in.as_ptr(),
                options(nostack),
            )
        };
    }
}

/// How long `hold` takes on an AP per iteration: long enough that APs spend most of their time
/// with values in the xmm registers, short enough for many arena iterations per second.
pub fn ap_hold_ticks() -> u64 {
    crate::time::ticks_per_us() * 200
}
