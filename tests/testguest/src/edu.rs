//! The `d` command: a DMA and interrupt check with QEMU's `edu` PCI device (vendor 0x1234,
//! device 0x11e8; QEMU's docs/specs/edu.rst and hw/misc/edu.c), so that a VMM's device model,
//! its DMA into guest RAM and its INTx routing are checked, before and after a live update.
//!
//! Finding the device (once; later runs check that it is still there with the same BAR): PCI
//! configuration mechanism #1 on bus 0, devices 0..31, function 0. BAR0 (1 MiB of MMIO) is the
//! platform's (firmware or VMM) assignment: read, never assigned. The identity map has the 512 MiB
//! below 4 GiB uncacheable (`kernel.rs`); a BAR elsewhere below 4 GiB has its 2 MiB entries made
//! uncacheable before first use. Set up once, then left alone (so that a VMM that loses any of it
//! across an update is caught): Memory Space and Bus Master in the command register; the
//! device's interrupt, either MSI or INTx (chosen then, fixed until the next boot); the BSP's
//! local APIC (software-enabled, timer one-shot on vector 32 but stopped, task priority 0xf0).
//!
//! * **MSI**, when the status register shows a capability list holding an MSI capability (ID 5;
//!   QEMU's edu has one, 64-bit, without per-vector masking): message address 0xfee00000 | the
//!   BSP's APIC ID << 12 (physical destination; the high half 0 in the 64-bit layout), data
//!   [`EDU_MSI_VECTOR`] (fixed delivery, edge), vector 0 unmasked if the capability can mask,
//!   then Interrupt Disable (with Memory Space and Bus Master) in the command register, then MSI
//!   Enable with one vector. The IOAPIC is left alone, and the interrupt line and pin are not
//!   looked at.
//! * **INTx** otherwise: the IOAPIC redirection entry of the interrupt line register's GSI (INTx
//!   pin A: level-triggered, active-high, fixed delivery to the BSP's APIC ID, vector
//!   [`EDU_VECTOR`]).
//!
//! Interrupts: guest CPL-3 code runs with IF = 0 and an interrupt must never be pending then (on
//! PVM hosts KVM would emulate instruction by instruction until IF = 1, see README). So the
//! BSP's task priority (TPR = 0xf0) keeps every interrupt in the local APIC's IRR, undelivered,
//! except while the BSP sleeps during `d`: in one asm block it arms its local APIC timer (at most
//! until the next heartbeat is due), lowers the TPR to 0, executes `hlt` (the kernel's
//! `sti; hlt; cli`), then raises the TPR again and stops the timer. The kernel's handler for
//! [`EDU_VECTOR`] and [`EDU_MSI_VECTOR`] (one handler) reads the device's interrupt status,
//! acknowledges it all (the device lowers INTx), ORs it into [`EDU_SEEN`], counts the interrupt
//! in [`EDU_IRQS`] and, on the MSI vector, in [`EDU_MSI_IRQS`] (unless the status was 0: a
//! spurious interrupt, not counted) and signals EOI to the local APIC. A wait in MSI mode is
//! satisfied only by interrupts on the MSI vector. The device's interrupt never reaches the APs.
//!
//! One `d` run: ident (low 16 bits 0x00ed), liveness (reads back the NOT of a fresh value),
//! factorial (polled, no interrupt), DMA of a 4 KiB buffer holding a fresh pattern from RAM into
//! the device's buffer (0x40000) and back into a second, zeroed, buffer, both with the
//! raise-interrupt bit, each waited for by its interrupt (status bit 0x100); compare; then one
//! interrupt raised through register 0x60, waited for. Each wait is bounded by [`WAIT_MS`] of TSC
//! time, with heartbeats. Under QEMU each DMA takes 100 ms (a timer of the device model), so a run
//! takes about 0.2 s. The DMA buffers are in `.bss` (below 256 MiB, the device's DMA mask, and
//! outside the static pattern that `v` checks).
//!
//! Registers are accessed 32 bits wide, those at 0x80 and above (64-bit in the spec) too: QEMU
//! takes a 4-byte write there as the whole value, and the buffers are below 4 GiB.

use crate::commands::Heartbeat;
use crate::cpu::{pause, rdtsc};
use crate::kernel::identity_map_pd;
use crate::memory::splitmix64;
use crate::pci::{self, Bdf};
use crate::smp::{self, lapic_read, lapic_write, LAPIC_BASE};
use crate::time::{ticks_per_ms, ticks_per_us};
use crate::uart::{line, Line};
use core::arch::asm;
use core::cell::UnsafeCell;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering::*};

/// `device << 16 | vendor`.
const EDU_ID: u32 = 0x11e8 << 16 | 0x1234;
const BAR_BYTES: u64 = 1 << 20;

const IDENT: usize = 0x00;
const LIVENESS: usize = 0x04;
const FACTORIAL: usize = 0x08;
const STATUS: usize = 0x20;
const IRQ_STATUS: usize = 0x24;
const IRQ_RAISE: usize = 0x60;
const IRQ_ACK: usize = 0x64;
const DMA_SRC: usize = 0x80;
const DMA_DST: usize = 0x88;
const DMA_COUNT: usize = 0x90;
const DMA_CMD: usize = 0x98;

const STATUS_COMPUTING: u32 = 0x01;
const DMA_RUN: u32 = 0x1;
const DMA_TO_RAM: u32 = 0x2;
const DMA_RAISE_IRQ: u32 = 0x4;
/// Interrupt status bit of a finished DMA.
const IRQ_DMA: u32 = 0x100;
/// What `d` raises through [`IRQ_RAISE`] (a bit the device never sets itself).
const IRQ_RAISED: u32 = 0x0001_0000;
/// The device's internal DMA buffer, as the DMA engine addresses it.
const DEVICE_BUFFER: u32 = 0x40000;
const DMA_BYTES: usize = 4096;
/// The device's DMA mask: 28 bits.
const DMA_LIMIT: u64 = 1 << 28;

/// The IDT vector of the device's INTx interrupt (`kernel.rs`).
pub const EDU_VECTOR: u32 = 33;
/// The IDT vector of the device's MSI (`kernel.rs`): the message data.
pub const EDU_MSI_VECTOR: u32 = 34;
/// The MSI capability, as the doubleword at its offset: ID (byte 0), next pointer (byte 1),
/// message control (bits 16..31).
const MSI_ENABLE: u32 = 1 << 16;
/// Multiple Message Enable: 0 = one vector.
const MSI_MULTIPLE_ENABLE: u32 = 0b111 << (16 + 4);
const MSI_64BIT: u32 = 1 << (16 + 7);
const MSI_MASKABLE: u32 = 1 << (16 + 8);
/// Message address: the local APIC's window, destination APIC ID in bits 12..19, physical
/// destination mode, no redirection hint.
const MSI_ADDRESS: u32 = 0xfee0_0000;
const IOAPIC_BASE: usize = 0xfec0_0000;
const IOAPIC_VERSION: u32 = 0x01;
const IOAPIC_REDIR: u32 = 0x10;
const REDIR_LEVEL: u32 = 1 << 15;
const LAPIC_ID: usize = 0x20;
const LAPIC_TPR: usize = 0x80;
/// Task priority that keeps every interrupt out (vectors 0x10..0xff; class 15 and below).
const TPR_BLOCK_ALL: u32 = 0xf0;
/// The longest wait for one step.
const WAIT_MS: u64 = 1000;
/// Shorter sleeps than this are not worth a `hlt` (its round trip costs about 150 us on PVM).
const MIN_SLEEP_US: u64 = 50;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// BAR0 of the device once set up, else 0: read by the kernel's interrupt handler.
pub static EDU_MMIO: AtomicU64 = AtomicU64::new(0);
/// The interrupt status bits the handler acknowledged (OR), cleared by `d` before each step.
pub static EDU_SEEN: AtomicU32 = AtomicU32::new(0);
/// Interrupts taken on [`EDU_VECTOR`] or [`EDU_MSI_VECTOR`] since boot with a non-zero interrupt
/// status (the handler counts them).
pub static EDU_IRQS: AtomicU64 = AtomicU64::new(0);
/// Those of [`EDU_IRQS`] taken on [`EDU_MSI_VECTOR`].
pub static EDU_MSI_IRQS: AtomicU64 = AtomicU64::new(0);
/// Whether setup chose MSI (else INTx).
static MSI: AtomicBool = AtomicBool::new(false);
/// `0x100 | dev << 3 | func` of the device once set up, else 0.
static DEVICE: AtomicU32 = AtomicU32::new(0);
/// Its GSI (for failure details).
static GSI: AtomicU32 = AtomicU32::new(0);
/// `d` commands handled, and those that passed.
static ATTEMPTS: AtomicU64 = AtomicU64::new(0);
static RUNS: AtomicU64 = AtomicU64::new(0);

const WORDS: usize = DMA_BYTES / 8;

/// The two DMA buffers: what goes to the device, what comes back. Only the BSP uses them.
#[repr(C, align(4096))]
struct Buffers(UnsafeCell<[[u64; WORDS]; 2]>);
// SAFETY: only the BSP touches the buffers (and the device, while the BSP waits for it).
unsafe impl Sync for Buffers {}
static BUFFERS: Buffers = Buffers(UnsafeCell::new([[0; WORDS]; 2]));

fn buffer(i: usize) -> *mut u64 {
    // SAFETY: only the address is taken.
    unsafe { (*BUFFERS.0.get())[i].as_mut_ptr() }
}

/// The device's registers.
#[derive(Clone, Copy)]
struct Edu {
    base: u64,
}

impl Edu {
    fn read(self, reg: usize) -> u32 {
        // SAFETY: BAR0 is 1 MiB of MMIO, identity mapped uncacheable (see `map_uncached`).
        unsafe { read_volatile((self.base as usize + reg) as *const u32) }
    }

    fn write(self, reg: usize, v: u32) {
        // SAFETY: as in `read`.
        unsafe { write_volatile((self.base as usize + reg) as *mut u32, v) }
    }
}

fn ioapic_read(reg: u32) -> u32 {
    // SAFETY: the IOAPIC's page is identity mapped (uncacheable); only the BSP uses it.
    unsafe {
        write_volatile(IOAPIC_BASE as *mut u32, reg);
        read_volatile((IOAPIC_BASE + 0x10) as *const u32)
    }
}

fn ioapic_write(reg: u32, v: u32) {
    // SAFETY: as in `ioapic_read`.
    unsafe {
        write_volatile(IOAPIC_BASE as *mut u32, reg);
        write_volatile((IOAPIC_BASE + 0x10) as *mut u32, v);
    }
}

/// `d`: one run, answered by `DMA OK ...` or (printed where it failed) `DMA FAIL <what> <detail>`.
pub fn check(seed: u64, hb: &mut Heartbeat) {
    if let Ok((bdf, hash)) = run(seed, hb) {
        line()
            .s("DMA OK bdf=00:")
            .hexn(bdf.dev as u64, 2)
            .s(".")
            .hexn(bdf.func as u64, 1)
            .s(" runs=")
            .dec(RUNS.load(Relaxed))
            .s(" irqs=")
            .dec(EDU_IRQS.load(Acquire))
            .s(" hash=")
            .hex(hash)
            .s(if MSI.load(Relaxed) {
                " irq=msi"
            } else {
                " irq=intx"
            })
            .end();
    }
}

/// A failure whose `DMA FAIL` line has been printed.
struct Printed;

fn printed(l: Line) -> Printed {
    l.end();
    Printed
}

/// A failure line: `DMA FAIL <what> ` (the caller adds the detail, then [`printed`] prints it).
fn fail(what: &str) -> Line {
    line().s("DMA FAIL ").s(what).s(" ")
}

fn run(seed: u64, hb: &mut Heartbeat) -> Result<(Bdf, u64), Printed> {
    let (bdf, edu) = device(hb)?;
    let n = ATTEMPTS.fetch_add(1, Relaxed) + 1;
    // Status left over from an earlier run that failed.
    let stale = edu.read(IRQ_STATUS);
    if stale != 0 {
        edu.write(IRQ_ACK, stale);
    }

    let ident = edu.read(IDENT);
    if ident & 0xffff != 0x00ed {
        return Err(printed(fail("ident").s("got=").addr(ident as u64)));
    }
    let probe = splitmix64(seed ^ n) as u32;
    edu.write(LIVENESS, probe);
    let got = edu.read(LIVENESS);
    if got != !probe {
        return Err(printed(
            fail("liveness")
                .s("wrote=")
                .addr(probe as u64)
                .s(" got=")
                .addr(got as u64),
        ));
    }

    // Factorial of 1..12 (fits 32 bits; the device computes modulo 2^32), polled.
    let k = 1 + (n % 12) as u32;
    edu.write(STATUS, 0); // no interrupt when done
    edu.write(FACTORIAL, k);
    if !wait(hb, false, &mut || edu.read(STATUS) & STATUS_COMPUTING == 0) {
        return Err(printed(
            fail("timeout")
                .s("step=factorial status=")
                .addr(edu.read(STATUS) as u64),
        ));
    }
    let expected = (1..=k).fold(1u32, |a, b| a.wrapping_mul(b));
    let got = edu.read(FACTORIAL);
    if got != expected {
        return Err(printed(
            fail("factorial")
                .s("n=")
                .dec(k as u64)
                .s(" expected=")
                .addr(expected as u64)
                .s(" got=")
                .addr(got as u64),
        ));
    }

    // A fresh pattern out, zeroes where it comes back.
    let (out, back) = (buffer(0), buffer(1));
    for i in 0..WORDS {
        // SAFETY: both buffers are WORDS words long, used only here.
        unsafe {
            write_volatile(out.add(i), pattern(seed, n, i));
            write_volatile(back.add(i), 0);
        }
    }
    let (out_addr, back_addr) = (out as u64, back as u64);
    if back_addr + DMA_BYTES as u64 > DMA_LIMIT {
        return Err(printed(fail("data").s("buffer=").addr(out_addr)));
    }
    fence(SeqCst);
    dma(
        edu,
        hb,
        "to-device",
        out_addr as u32,
        DEVICE_BUFFER,
        DMA_RUN | DMA_RAISE_IRQ,
    )?;
    dma(
        edu,
        hb,
        "to-ram",
        DEVICE_BUFFER,
        back_addr as u32,
        DMA_RUN | DMA_TO_RAM | DMA_RAISE_IRQ,
    )?;
    fence(SeqCst);
    let mut hash = splitmix64(seed ^ n);
    for i in 0..WORDS {
        // SAFETY: as above; the device is done with the buffer.
        let (want, got) = unsafe { (read_volatile(out.add(i)), read_volatile(back.add(i))) };
        if got != want {
            return Err(printed(
                fail("data")
                    .s("offset=")
                    .addr(8 * i as u64)
                    .s(" expected=")
                    .hex(want)
                    .s(" got=")
                    .hex(got),
            ));
        }
        hash = (hash.rotate_left(23) ^ got).wrapping_mul(GOLDEN);
    }

    // An interrupt raised on request.
    let before = start_step();
    edu.write(IRQ_RAISE, IRQ_RAISED);
    if !wait_irq(hb, before, IRQ_RAISED) {
        return Err(printed(irq_fail("raise", edu)));
    }
    RUNS.fetch_add(1, Relaxed);
    Ok((bdf, splitmix64(hash)))
}

/// Word `i` of the pattern of run `n`.
fn pattern(seed: u64, n: u64, i: usize) -> u64 {
    splitmix64(seed ^ n.wrapping_mul(GOLDEN) ^ i as u64)
}

/// One DMA of [`DMA_BYTES`] with the raise-interrupt bit: started, then waited for by its
/// interrupt.
fn dma(
    edu: Edu,
    hb: &mut Heartbeat,
    step: &str,
    src: u32,
    dst: u32,
    cmd: u32,
) -> Result<(), Printed> {
    let before = start_step();
    edu.write(DMA_SRC, src);
    edu.write(DMA_DST, dst);
    edu.write(DMA_COUNT, DMA_BYTES as u32);
    edu.write(DMA_CMD, cmd);
    // Polled first (see `wait_irq`), then its interrupt.
    let done = wait(hb, false, &mut || edu.read(DMA_CMD) & DMA_RUN == 0);
    let irq = done && wait_irq(hb, before, IRQ_DMA);
    let now = edu.read(DMA_CMD);
    if now & DMA_RUN != 0 {
        return Err(printed(
            fail("timeout")
                .s("step=")
                .s(step)
                .s(" cmd=")
                .addr(now as u64),
        ));
    }
    if !irq {
        return Err(printed(irq_fail(step, edu)));
    }
    Ok(())
}

/// Clears [`EDU_SEEN`]; returns the interrupt count to wait past.
fn start_step() -> u64 {
    EDU_SEEN.store(0, Relaxed);
    irq_count()
}

/// The interrupts that count for a wait: those on the MSI vector in MSI mode, else all.
fn irq_count() -> u64 {
    if MSI.load(Relaxed) {
        EDU_MSI_IRQS.load(Acquire)
    } else {
        EDU_IRQS.load(Acquire)
    }
}

fn irq_fail(step: &str, edu: Edu) -> Line {
    fail("irq")
        .s("step=")
        .s(step)
        .s(" gsi=")
        .dec(GSI.load(Relaxed) as u64)
        .s(" irqs=")
        .dec(EDU_IRQS.load(Acquire))
        .s(" irq_status=")
        .addr(edu.read(IRQ_STATUS) as u64)
}

/// Waits for an interrupt after `before` that acknowledged `bits`.
///
/// Callers first poll the device until it has raised the interrupt, so that the interrupt is
/// already waiting (kept out by the task priority) when the BSP sleeps. An INTx interrupt that
/// arrives while the BSP is halted is delivered a second time right after its end of interrupt
/// on this host (QEMU 10 and KVM on PVM: the handler then reads status 0), which would make the
/// interrupt count unpredictable. (MSI, edge-triggered, does not need this; it is done the same
/// way.)
fn wait_irq(hb: &mut Heartbeat, before: u64, bits: u32) -> bool {
    wait(hb, true, &mut || {
        irq_count() > before && EDU_SEEN.load(Acquire) & bits == bits
    })
}

/// Waits at most [`WAIT_MS`] for `done`, keeping heartbeats going; between checks, sleeps with
/// interrupts let in (`sleep`) or spins until the next heartbeat (so a `done` that reads a
/// device register costs one exit per heartbeat). Returns whether `done` came true.
fn wait(hb: &mut Heartbeat, sleep: bool, done: &mut dyn FnMut() -> bool) -> bool {
    let start = rdtsc();
    let limit = WAIT_MS * ticks_per_ms();
    loop {
        if done() {
            return true;
        }
        hb.tick();
        let now = rdtsc();
        let elapsed = now.wrapping_sub(start);
        if elapsed >= limit {
            return done();
        }
        let ticks = hb.remaining(now).min(limit - elapsed);
        if !sleep {
            while rdtsc().wrapping_sub(now) < ticks {
                pause();
            }
        } else if ticks >= MIN_SLEEP_US * ticks_per_us() {
            sleep_with_interrupts(ticks);
        } else {
            pause();
        }
    }
}

/// Sleeps at most `tsc_ticks`, letting interrupts in meanwhile (see the module comment).
fn sleep_with_interrupts(tsc_ticks: u64) {
    let ticks =
        (tsc_ticks * smp::timer_ticks_per_ms() / ticks_per_ms()).clamp(1, u32::MAX as u64) as u32;
    // SAFETY: local APIC registers (identity mapped); the kernel returns past the `hlt` after an
    // interrupt, and the timer armed here guarantees one.
    unsafe {
        asm!("mov dword ptr [{apic} + {initial}], {ticks:e}",
             "mov dword ptr [{apic} + {tpr}], 0",
             "hlt",
             "mov dword ptr [{apic} + {tpr}], {block}",
             "mov dword ptr [{apic} + {initial}], 0",
             apic = in(reg) LAPIC_BASE, ticks = in(reg) ticks,
             initial = const smp::LAPIC_TIMER_INITIAL, tpr = const LAPIC_TPR,
             block = const TPR_BLOCK_ALL, options(nostack))
    };
}

/// The device, found and set up (the first time), or checked (later).
fn device(hb: &mut Heartbeat) -> Result<(Bdf, Edu), Printed> {
    let known = DEVICE.load(Relaxed);
    if known != 0 {
        let bdf = Bdf::from_u8(known as u8);
        let id = bdf.read(pci::VENDOR_DEVICE);
        if id != EDU_ID {
            return Err(printed(
                fail("nodevice")
                    .s("dev=")
                    .hexn(bdf.dev as u64, 2)
                    .s(" id=")
                    .addr(id as u64),
            ));
        }
        let bar = bar0(bdf)?;
        let was = EDU_MMIO.load(Relaxed);
        if bar != was {
            return Err(printed(
                fail("bar").s("bar0=").addr(bar).s(" was=").addr(was),
            ));
        }
        return Ok((bdf, Edu { base: bar }));
    }
    let bdf = pci::find(EDU_ID, &mut || {
        hb.tick();
    })
    .ok_or_else(|| printed(fail("nodevice").s("id=1234:11e8 bus=00")))?;
    let bar = bar0(bdf)?;
    setup(bdf, bar)?;
    DEVICE.store(0x100 | bdf.to_u8() as u32, Relaxed);
    Ok((bdf, Edu { base: bar }))
}

/// BAR0's address: a memory BAR, assigned, below 4 GiB.
fn bar0(bdf: Bdf) -> Result<u64, Printed> {
    let raw = bdf.read(pci::BAR0);
    let mut addr = (raw & !0xf) as u64;
    if raw & 0b110 == 0b100 {
        addr |= (bdf.read(pci::BAR1) as u64) << 32; // a 64-bit BAR
    }
    if raw & 1 != 0 || addr == 0 || addr + BAR_BYTES > 1 << 32 {
        return Err(printed(
            fail("bar")
                .s("bar0=")
                .addr(addr)
                .s(" raw=")
                .addr(raw as u64),
        ));
    }
    Ok(addr)
}

/// One-time setup: interrupt routing (MSI if the device has the capability, else INTx), the
/// BSP's local APIC, the command register.
fn setup(bdf: Bdf, bar: u64) -> Result<(), Printed> {
    let msi = bdf.find_capability(pci::CAP_ID_MSI);
    let int = bdf.read(pci::INTERRUPT);
    let (gsi, pin) = (int & 0xff, (int >> 8) & 0xff);
    if msi.is_none() {
        let max = (ioapic_read(IOAPIC_VERSION) >> 16) & 0xff;
        if pin != 1 || gsi > max {
            return Err(printed(
                fail("irqline")
                    .s("line=")
                    .dec(gsi as u64)
                    .s(" pin=")
                    .dec(pin as u64)
                    .s(" ioapic_max=")
                    .dec(max as u64),
            ));
        }
    }
    if smp::timer_ticks_per_ms() == 0 {
        smp::calibrate_timer(); // not done at boot with a single CPU
    }
    if smp::timer_ticks_per_ms() == 0 {
        return Err(printed(fail("timer").s("lapic_timer=0")));
    }
    // The BSP's local APIC: interrupts kept out by the task priority first, then enabled (as an
    // OS does), its timer ready for `sleep_with_interrupts` (one-shot, stopped).
    lapic_write(LAPIC_TPR, TPR_BLOCK_ALL);
    lapic_write(smp::LAPIC_SVR, lapic_read(smp::LAPIC_SVR) | 0x1ff);
    lapic_write(smp::LAPIC_TIMER_DIVIDE, smp::TIMER_DIVIDE_BY_1);
    lapic_write(smp::LAPIC_TIMER_INITIAL, 0);
    lapic_write(smp::LAPIC_LVT_TIMER, smp::TIMER_VECTOR);

    map_uncached(bar, BAR_BYTES);
    let command = bdf.read(pci::COMMAND) & 0xffff; // status bits (write 1 to clear) left alone
    let bsp = lapic_read(LAPIC_ID) >> 24;
    GSI.store(gsi, Relaxed);
    if let Some(cap) = msi {
        EDU_MMIO.store(bar, Release); // before the interrupt can come: the handler needs it
        setup_msi(bdf, cap, bsp);
        bdf.write(
            pci::COMMAND,
            command | pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER | pci::COMMAND_INTX_DISABLE,
        );
        let control = bdf.read(cap);
        bdf.write(cap, (control & !MSI_MULTIPLE_ENABLE) | MSI_ENABLE);
        MSI.store(true, Relaxed);
        return Ok(());
    }
    bdf.write(
        pci::COMMAND,
        command | pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER,
    );
    EDU_MMIO.store(bar, Release); // before the interrupt can come: the handler needs it
    ioapic_write(IOAPIC_REDIR + 2 * gsi + 1, bsp << 24);
    ioapic_write(IOAPIC_REDIR + 2 * gsi, REDIR_LEVEL | EDU_VECTOR); // fixed, physical, unmasked
    Ok(())
}

/// Programs the MSI capability at `cap` (not yet enabled): message address (to the local APIC of
/// `apic_id`), message data ([`EDU_MSI_VECTOR`], fixed, edge), vector 0 unmasked if maskable.
/// Every access is a doubleword; read-modify-write where the doubleword holds more than the
/// field (the data register's upper half: extended message data or beyond the capability).
fn setup_msi(bdf: Bdf, cap: u8, apic_id: u32) {
    let control = bdf.read(cap);
    let is64 = control & MSI_64BIT != 0;
    bdf.write(cap + 4, MSI_ADDRESS | (apic_id & 0xff) << 12);
    let data = if is64 {
        bdf.write(cap + 8, 0); // message upper address
        cap + 0xc
    } else {
        cap + 8
    };
    bdf.write(data, (bdf.read(data) & 0xffff_0000) | EDU_MSI_VECTOR);
    if control & MSI_MASKABLE != 0 {
        let mask = data + 4;
        bdf.write(mask, bdf.read(mask) & !1);
    }
}

/// Makes the identity map uncacheable (PCD | PWT) over `[addr, addr + len)`, which nothing has
/// accessed yet (so no TLB entry needs flushing: `invlpg` is for CPL 0). Normally a no-op: the
/// 512 MiB below 4 GiB are mapped so from the start.
fn map_uncached(addr: u64, len: u64) {
    const PCD_PWT: u64 = 0x18;
    let pd = &raw mut identity_map_pd;
    for i in (addr >> 21)..=((addr + len - 1) >> 21) {
        // SAFETY: entry `i` of the identity map's page directories (addr < 4 GiB, the map
        // covers 64 GiB); only the BSP writes them, only here.
        unsafe {
            let e = read_volatile(pd.add(i as usize));
            if e & PCD_PWT != PCD_PWT {
                write_volatile(pd.add(i as usize), e | PCD_PWT);
            }
        }
    }
}
