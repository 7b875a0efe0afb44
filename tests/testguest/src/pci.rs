//! PCI configuration space through mechanism #1 (address at port 0xcf8, data at 0xcfc), as an OS
//! reads it before it has ACPI's MCFG: enough to find a device on bus 0 and set it up.
//!
//! Runs at CPL 3 (the TSS I/O bitmap allows the ports); each access is two port accesses
//! (about 25 us each on the PVM hosts). Only the BSP uses it. A machine without PCI reads all
//! ones (vmmd answers unassigned ports with 0xff), which looks like "no device".

use crate::cpu::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

pub const VENDOR_DEVICE: u8 = 0x00;
pub const COMMAND: u8 = 0x04;
pub const BAR0: u8 = 0x10;
pub const BAR1: u8 = 0x14;
/// Interrupt line (byte 0: the platform's routing of the pin, here an IOAPIC GSI), interrupt
/// pin (byte 1: 1 = INTA#).
pub const INTERRUPT: u8 = 0x3c;

pub const COMMAND_MEMORY: u32 = 1 << 1;
pub const COMMAND_BUS_MASTER: u32 = 1 << 2;

/// A function on bus 0: device `dev` (0..31), function `func` (0..7).
#[derive(Clone, Copy)]
pub struct Bdf {
    pub dev: u8,
    pub func: u8,
}

impl Bdf {
    /// As stored by `edu` (`dev << 3 | func`).
    pub fn from_u8(v: u8) -> Bdf {
        Bdf {
            dev: v >> 3,
            func: v & 7,
        }
    }

    pub fn to_u8(self) -> u8 {
        self.dev << 3 | self.func
    }

    fn address(self, reg: u8) -> u32 {
        1 << 31 | (self.dev as u32) << 11 | (self.func as u32) << 8 | (reg & 0xfc) as u32
    }

    /// The configuration doubleword at `reg` (a multiple of 4).
    pub fn read(self, reg: u8) -> u32 {
        outl(CONFIG_ADDRESS, self.address(reg));
        inl(CONFIG_DATA)
    }

    /// Writes the configuration doubleword at `reg` (a multiple of 4).
    pub fn write(self, reg: u8, v: u32) {
        outl(CONFIG_ADDRESS, self.address(reg));
        outl(CONFIG_DATA, v);
    }
}

/// The first device on bus 0 (function 0 of devices 0..31) whose vendor and device IDs are
/// `id` (`device << 16 | vendor`). `tick` runs after each probe (heartbeats).
pub fn find(id: u32, tick: &mut dyn FnMut()) -> Option<Bdf> {
    for dev in 0..32 {
        let bdf = Bdf { dev, func: 0 };
        let found = bdf.read(VENDOR_DEVICE) == id;
        tick();
        if found {
            return Some(bdf);
        }
    }
    None
}
