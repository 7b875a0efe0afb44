//! Emulated devices and the port-I/O bus the vCPU threads dispatch to.

pub mod pci;
pub mod pm;
pub mod serial;

use std::sync::{Mutex, MutexGuard};

use tracing::trace;

use pci::PciBus;
use pm::PmDevice;
use serial::SerialDevice;

/// What the guest asked for through a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRequest {
    /// Power off (ACPI S5).
    PowerOff,
    /// Suspend to RAM (ACPI S3).
    Suspend,
    /// Reset or an unrecoverable fault.
    Reset(String),
}

/// All port-I/O devices of the VM.
pub struct Devices {
    /// COM1.
    pub serial: Mutex<SerialDevice>,
    /// The ACPI PM1a event and control registers.
    pub pm: Mutex<PmDevice>,
    /// PCI bus 0: config ports and the passthrough devices' BARs.
    pub pci: Mutex<PciBus>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Devices {
    /// Handles an OUT instruction.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<GuestRequest> {
        match port {
            serial::COM1_BASE..=serial::COM1_LAST => {
                let mut s = lock(&self.serial);
                for &b in data {
                    s.write((port - serial::COM1_BASE) as u8, b);
                }
                None
            }
            pm::PM_BASE..=pm::PM_LAST => lock(&self.pm).write(port - pm::PM_BASE, data),
            pci::CONFIG_ADDRESS | pci::CONFIG_DATA..=pci::CONFIG_DATA_LAST => {
                lock(&self.pci).pio_write(port, data);
                None
            }
            _ => {
                trace!(
                    port = format!("{port:#x}"),
                    ?data,
                    "write to unassigned port"
                );
                None
            }
        }
    }

    /// Handles an IN instruction.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            serial::COM1_BASE..=serial::COM1_LAST => {
                let mut s = lock(&self.serial);
                for b in data.iter_mut() {
                    *b = s.read((port - serial::COM1_BASE) as u8);
                }
            }
            pm::PM_BASE..=pm::PM_LAST => lock(&self.pm).read(port - pm::PM_BASE, data),
            pci::CONFIG_ADDRESS | pci::CONFIG_DATA..=pci::CONFIG_DATA_LAST => {
                lock(&self.pci).pio_read(port, data)
            }
            _ => {
                trace!(port = format!("{port:#x}"), "read from unassigned port");
                data.fill(0xff);
            }
        }
    }

    /// Handles a guest MMIO read; false when no device claims `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        lock(&self.pci).mmio_read(addr, data)
    }

    /// Handles a guest MMIO write; false when no device claims `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        lock(&self.pci).mmio_write(addr, data)
    }

    /// Locks the PCI bus.
    pub fn pci(&self) -> MutexGuard<'_, PciBus> {
        lock(&self.pci)
    }

    /// Locks COM1.
    pub fn serial(&self) -> MutexGuard<'_, SerialDevice> {
        lock(&self.serial)
    }

    /// Locks the PM device.
    pub fn pm(&self) -> MutexGuard<'_, PmDevice> {
        lock(&self.pm)
    }
}
