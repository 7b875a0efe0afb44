//! Polled 16550 UART on COM1 (0x3f8): no interrupts, the guest checks the line-status register.
//!
//! Only the BSP writes to the UART (panics excepted). Every protocol line is framed as
//! `"\n<LINE>\n"` by [`line`] / [`Line::end`] so it never shares a line with heartbeat dots.
//!
//! Each `in`/`out` costs about 25 us on the PVM hosts (KVM performs it for CPL 3), so I/O is kept
//! down: a line is built in a buffer and written 16 bytes (the transmit FIFO) per check of the
//! line status, and [`putc`] returns the line status it read, whose "data ready" bit tells the
//! heartbeat whether a command byte is waiting without another read.
//!
//! Formatting is done by hand ([`Line`]) rather than with `core::fmt`: small, and it keeps
//! libcore's formatting code (never checked by `scripts/check-insns.py`) out of the running guest.

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

/// Transmit FIFO depth: bytes that may be written after the line status says it is empty.
const TX_FIFO: usize = 16;

/// Waits (bounded: a UART nobody drains must not hang the guest) for the transmitter to be
/// empty; returns the last line status read.
fn wait_tx_empty() -> u8 {
    let mut lsr = 0;
    for _ in 0..1000 {
        lsr = inb(LSR);
        if lsr & LSR_THR_EMPTY != 0 {
            break;
        }
    }
    lsr
}

/// Writes `bytes`, up to a FIFO's worth after each wait for the transmitter to be empty.
pub fn write(bytes: &[u8]) {
    for chunk in bytes.chunks(TX_FIFO) {
        wait_tx_empty();
        for &b in chunk {
            outb(THR, b);
        }
    }
}

/// Writes one byte; returns the line status read before writing it (see [`getc_if_ready`]).
pub fn putc(b: u8) -> u8 {
    let lsr = wait_tx_empty();
    outb(THR, b);
    lsr
}

/// The received byte, if the line status `lsr` (as returned by [`putc`]) says one is waiting.
pub fn getc_if_ready(lsr: u8) -> Option<u8> {
    (lsr & LSR_DATA_READY != 0).then(|| inb(RBR))
}

/// A protocol line being printed: started by [`line`], finished by [`Line::end`]. Bytes are
/// collected here and written in one go (longer lines are written in pieces).
#[must_use = "a line must be finished with .end()"]
pub struct Line {
    buf: [u8; 160],
    len: usize,
}

/// Starts a protocol line (with its leading newline).
pub fn line() -> Line {
    Line {
        buf: [0; 160],
        len: 0,
    }
    .byte(b'\n')
}

impl Line {
    fn byte(mut self, b: u8) -> Line {
        if self.len == self.buf.len() {
            write(&self.buf);
            self.len = 0;
        }
        self.buf[self.len] = b;
        self.len += 1;
        self
    }

    /// Text.
    pub fn s(mut self, s: &str) -> Line {
        for &b in s.as_bytes() {
            self = self.byte(b);
        }
        self
    }

    /// An unsigned number in decimal.
    pub fn dec(mut self, v: u64) -> Line {
        let mut p = 1u64;
        while p <= v / 10 {
            p *= 10;
        }
        loop {
            self = self.byte(b'0' + ((v / p) % 10) as u8);
            if p == 1 {
                return self;
            }
            p /= 10;
        }
    }

    /// A number as exactly 16 lowercase hex digits.
    pub fn hex(mut self, v: u64) -> Line {
        for i in (0..16).rev() {
            self = self.byte(hex_digit(v >> (i * 4)));
        }
        self
    }

    /// The low `digits` hex digits of a number (lowercase, zero-padded).
    pub fn hexn(mut self, v: u64, digits: u32) -> Line {
        for i in (0..digits).rev() {
            self = self.byte(hex_digit(v >> (i * 4)));
        }
        self
    }

    /// A number as `0x` and the fewest hex digits.
    pub fn addr(self, v: u64) -> Line {
        let mut l = self.s("0x");
        let mut shift = 60;
        while shift > 0 && (v >> shift) & 0xf == 0 {
            shift -= 4;
        }
        loop {
            l = l.byte(hex_digit(v >> shift));
            if shift == 0 {
                return l;
            }
            shift -= 4;
        }
    }

    /// Finishes the line (with its trailing newline) and writes it.
    pub fn end(self) {
        let l = self.byte(b'\n');
        write(&l.buf[..l.len]);
    }
}

/// The low 4 bits of `v` as a lowercase hex digit.
fn hex_digit(v: u64) -> u8 {
    let d = (v & 0xf) as u8;
    if d < 10 {
        b'0' + d
    } else {
        b'a' + d - 10
    }
}
