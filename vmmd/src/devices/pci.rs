//! PCI bus 0 with configuration mechanism #1 (ports 0xCF8/0xCFC): a host bridge at 00:00.0 and the
//! passthrough devices at 00:01.0, 00:02.0, … in `--device` order.

use crate::vfio::device::PassthroughDevice;

/// The CONFIG_ADDRESS port.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// First CONFIG_DATA port.
pub const CONFIG_DATA: u16 = 0xcfc;
/// Last CONFIG_DATA port.
pub const CONFIG_DATA_LAST: u16 = 0xcff;

/// The host bridge's config header: vendor/device (Intel Q35 MCH, as QEMU's), class 06.00.
const HOST_BRIDGE: [u32; 4] = [0x29c0_8086, 0x0000_0000, 0x0600_0000, 0x0000_0000];

/// Bus 0.
#[derive(Debug, Default)]
pub struct PciBus {
    address: u32,
    devices: Vec<PassthroughDevice>,
}

impl PciBus {
    /// A bus with `devices` at slots 1, 2, ….
    pub fn new(devices: Vec<PassthroughDevice>) -> PciBus {
        PciBus {
            address: 0,
            devices,
        }
    }

    /// The devices (slot − 1 = index).
    pub fn devices(&self) -> &[PassthroughDevice] {
        &self.devices
    }

    /// Takes the devices off the bus (to rebuild them from a saved state); see [`Self::put_devices`].
    pub fn take_devices(&mut self) -> Vec<PassthroughDevice> {
        std::mem::take(&mut self.devices)
    }

    /// Puts devices (back) on the bus, in slot order.
    pub fn put_devices(&mut self, devices: Vec<PassthroughDevice>) {
        self.devices = devices;
    }

    /// The devices, mutably (to wire them to a VM).
    pub fn devices_mut(&mut self) -> &mut [PassthroughDevice] {
        &mut self.devices
    }

    /// The (slot, register offset) CONFIG_ADDRESS selects, if enabled and on bus 0, function 0.
    fn selected(&self, port: u16) -> Option<(usize, u16)> {
        let a = self.address;
        let (enabled, bus, slot, function) =
            (a >> 31 != 0, a >> 16 & 0xff, a >> 11 & 0x1f, a >> 8 & 7);
        (enabled && bus == 0 && function == 0)
            .then_some((slot as usize, (a & 0xfc) as u16 + (port - CONFIG_DATA)))
    }

    /// An OUT to 0xCF8–0xCFF.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            return;
        }
        if let Some((slot, offset)) = self.selected(port) {
            if let Some(dev) = slot.checked_sub(1).and_then(|i| self.devices.get_mut(i)) {
                dev.config_write(offset, data);
            }
        }
    }

    /// An IN from 0xCF8–0xCFF.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        data.fill(0xff);
        let Some((slot, offset)) = self.selected(port) else {
            return;
        };
        match slot {
            0 => {
                let dword = HOST_BRIDGE
                    .get(usize::from(offset / 4))
                    .copied()
                    .unwrap_or(0)
                    .to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = dword
                        .get(usize::from(offset & 3) + i)
                        .copied()
                        .unwrap_or(0xff);
                }
            }
            s => {
                if let Some(dev) = self.devices.get(s - 1) {
                    dev.config_read(offset, data);
                }
            }
        }
    }

    /// A guest MMIO read; false when no BAR claims `gpa`.
    pub fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> bool {
        self.devices.iter().any(|d| d.mmio_read(gpa, data))
    }

    /// A guest MMIO write; false when no BAR claims `gpa`.
    pub fn mmio_write(&self, gpa: u64, data: &[u8]) -> bool {
        self.devices.iter().any(|d| d.mmio_write(gpa, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(bus: &mut PciBus, slot: u32, reg: u32) {
        bus.pio_write(CONFIG_ADDRESS, &(1 << 31 | slot << 11 | reg).to_le_bytes());
    }

    #[test]
    fn host_bridge_and_empty_slots() {
        let mut bus = PciBus::new(Vec::new());
        select(&mut bus, 0, 0);
        let mut d = [0u8; 4];
        bus.pio_read(CONFIG_DATA, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x29c0_8086);
        let mut w = [0u8; 2];
        bus.pio_read(CONFIG_DATA + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x29c0);
        select(&mut bus, 3, 0);
        bus.pio_read(CONFIG_DATA, &mut d);
        assert_eq!(d, [0xff; 4], "no device: all ones");
        let mut a = [0u8; 4];
        bus.pio_read(CONFIG_ADDRESS, &mut a);
        assert_eq!(u32::from_le_bytes(a), 1 << 31 | 3 << 11);
    }
}
