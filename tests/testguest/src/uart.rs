//! Polled 16550 UART on COM1 (0x3f8): no interrupts, the guest checks the line-status register.
//!
//! Only the BSP writes to the UART (the panic handler excepted). Every protocol line is framed as
//! `"\n<LINE>\n"` by [`line`] / [`Line::end`] so it never shares a line with heartbeat dots.
//!
//! No `core::fmt` here: its precompiled number formatting uses SSE instructions that KVM's
//! instruction emulator cannot run (see README, "Runs under emulation").

use crate::cpu::{inb, outb};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1; // transmit holding register (write)
const RBR: u16 = COM1; // receive buffer register (read)
const IER: u16 = COM1 + 1; // interrupt enable
const FCR: u16 = COM1 + 2; // FIFO control (write)
const LCR: u16 = COM1 + 3; // line control
const MCR: u16 = COM1 + 4; // modem control
const LSR: u16 = COM1 + 5; // line status
const DLL: u16 = COM1; // divisor latch, low byte (when LCR.DLAB = 1)
const DLM: u16 = COM1 + 1; // divisor latch, high byte (when LCR.DLAB = 1)

const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Programs COM1 the way an OS does: interrupts off, 115200 baud, 8N1, FIFOs on and cleared.
pub fn init() {
    outb(IER, 0x00);
    outb(LCR, 0x80); // DLAB = 1: the next two registers are the baud divisor
    outb(DLL, 0x01); // 115200 / 1
    outb(DLM, 0x00);
    outb(LCR, 0x03); // DLAB = 0, 8 data bits, no parity, 1 stop bit
    outb(FCR, 0xc7); // enable FIFOs, clear both, 14-byte receive threshold
    outb(MCR, 0x03); // DTR | RTS (OUT2 stays off: no interrupts)
}

/// Writes one byte, waiting (bounded) for the transmit holding register to be empty.
pub fn putc(b: u8) {
    for _ in 0..100_000 {
        if inb(LSR) & LSR_THR_EMPTY != 0 {
            break;
        }
    }
    outb(THR, b);
}

/// Returns the next received byte, if one is waiting.
pub fn try_getc() -> Option<u8> {
    if inb(LSR) & LSR_DATA_READY != 0 {
        Some(inb(RBR))
    } else {
        None
    }
}

/// A protocol line being printed: started by [`line`], finished by [`Line::end`].
#[must_use = "a line must be finished with .end()"]
pub struct Line(());

/// Starts a protocol line (prints the leading newline).
pub fn line() -> Line {
    putc(b'\n');
    Line(())
}

impl Line {
    /// Text.
    pub fn s(self, s: &str) -> Line {
        for &b in s.as_bytes() {
            putc(b);
        }
        self
    }

    /// An unsigned number in decimal.
    pub fn dec(self, v: u64) -> Line {
        let mut p = 1u64;
        while p <= v / 10 {
            p *= 10;
        }
        loop {
            putc(b'0' + ((v / p) % 10) as u8);
            if p == 1 {
                return self;
            }
            p /= 10;
        }
    }

    /// A number as exactly 16 lowercase hex digits.
    pub fn hex(self, v: u64) -> Line {
        for i in (0..16).rev() {
            let d = ((v >> (i * 4)) & 0xf) as u8;
            putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
        self
    }

    /// A number as `0x` and the fewest hex digits.
    pub fn addr(self, v: u64) -> Line {
        let l = self.s("0x");
        let mut shift = 60;
        while shift > 0 && (v >> shift) & 0xf == 0 {
            shift -= 4;
        }
        loop {
            let d = ((v >> shift) & 0xf) as u8;
            putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
            if shift == 0 {
                return l;
            }
            shift -= 4;
        }
    }

    /// Finishes the line (prints the trailing newline).
    pub fn end(self) {
        putc(b'\n');
    }
}
