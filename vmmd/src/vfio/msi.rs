//! MSI for passthrough devices: the guest-visible MSI capability and the VM's GSI routing.
//!
//! The guest programs the MSI capability vmmd shows it (a shadow: the device's own MSI registers
//! are never written); when it sets the enable bit, the device's MSI goes to an eventfd
//! (`VFIO_DEVICE_SET_IRQS`) that is a KVM irqfd on a GSI routed to the guest's message. KVM's GSI
//! routing table is replaced whole by `KVM_SET_GSI_ROUTING`, so [`MsiRouter`] keeps the default
//! PIC/IOAPIC entries and adds one MSI entry per enabled device.

use std::collections::BTreeMap;
use std::sync::Mutex;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

/// IOAPIC pins of the in-kernel irqchip (GSIs below this are routed to it).
pub const IOAPIC_PINS: u32 = 24;

/// An MSI message as the guest programmed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    /// Message address (0xFEExxxxx).
    pub address: u64,
    /// Message data (vector, delivery mode, trigger).
    pub data: u32,
}

/// The VM's GSI routing: KVM's defaults plus the enabled MSI messages.
pub struct MsiRouter {
    vm: VmFd,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl std::fmt::Debug for MsiRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiRouter").finish_non_exhaustive()
    }
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// KVM's default routing (`kvm_setup_default_irq_routing`): GSI 0–15 to the PICs and the IOAPIC,
/// 16–23 to the IOAPIC only.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip(gsi, chip, gsi % 8));
        }
        v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    v
}

impl MsiRouter {
    /// A router for `vm` (a VM fd of its own, e.g. a duplicate).
    pub fn new(vm: VmFd) -> MsiRouter {
        MsiRouter {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    /// The VM fd, to register irqfds on.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// Routes `gsi` to `message` (or removes its route with `None`) and installs the table.
    pub fn route(&self, gsi: u32, message: Option<MsiMessage>) -> Result<(), kvm_ioctls::Error> {
        let mut msi = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        match message {
            Some(m) => msi.insert(gsi, m),
            None => msi.remove(&gsi),
        };
        let mut entries = default_routes();
        for (&gsi, m) in msi.iter() {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.address as u32;
            e.u.msi.address_hi = (m.address >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        self.vm.set_gsi_routing(&table)
    }
}

/// The MSI capability as the guest sees it: the device's layout, vmmd's register values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiCap {
    /// Config-space offset of the capability.
    pub offset: u16,
    /// 64-bit message address.
    pub is64: bool,
    /// Per-vector masking.
    pub maskable: bool,
    /// Message control (bit 0 enable; one vector: MME stays 0).
    pub control: u16,
    /// The message.
    pub message: MsiMessage,
    /// Mask bits (when maskable).
    pub mask: u32,
}

impl MsiCap {
    /// The capability at `offset` whose message-control register reads `control` on the device.
    pub fn new(offset: u16, control: u16) -> MsiCap {
        MsiCap {
            offset,
            is64: control & (1 << 7) != 0,
            maskable: control & (1 << 8) != 0,
            // Only what the guest may see: 64-bit and maskable flags; MMC = 0 (one vector).
            control: control & (1 << 7 | 1 << 8),
            message: MsiMessage::default(),
            mask: 0,
        }
    }

    /// Length of the capability in config space.
    pub fn len(&self) -> u16 {
        match (self.is64, self.maskable) {
            (false, false) => 10,
            (true, false) => 14,
            (false, true) => 20,
            (true, true) => 24,
        }
    }

    /// Whether the capability is empty (never: it has at least its header).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether MSI is enabled.
    pub fn enabled(&self) -> bool {
        self.control & 1 != 0
    }

    fn data_offset(&self) -> u16 {
        if self.is64 {
            12
        } else {
            8
        }
    }

    /// The capability's bytes (from its start), `len()` of them.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; usize::from(self.len())];
        b[0] = 0x05;
        b[1] = 0; // the only capability shown
        b[2..4].copy_from_slice(&self.control.to_le_bytes());
        b[4..8].copy_from_slice(&(self.message.address as u32).to_le_bytes());
        if self.is64 {
            b[8..12].copy_from_slice(&((self.message.address >> 32) as u32).to_le_bytes());
        }
        let d = usize::from(self.data_offset());
        b[d..d + 2].copy_from_slice(&(self.message.data as u16).to_le_bytes());
        if self.maskable {
            b[d + 4..d + 8].copy_from_slice(&self.mask.to_le_bytes());
        }
        b
    }

    /// Applies a guest write of `data` at `rel` bytes into the capability (read-only parts ignored).
    pub fn write(&mut self, rel: u16, data: &[u8]) {
        let mut b = self.bytes();
        for (i, v) in data.iter().enumerate() {
            if let Some(x) = b.get_mut(usize::from(rel) + i) {
                *x = *v;
            }
        }
        let ro = self.control & !1;
        self.control = ro | (u16::from_le_bytes([b[2], b[3]]) & 1);
        let lo = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let hi = if self.is64 {
            u32::from_le_bytes([b[8], b[9], b[10], b[11]])
        } else {
            0
        };
        self.message.address = u64::from(hi) << 32 | u64::from(lo);
        let d = usize::from(self.data_offset());
        self.message.data = u32::from(u16::from_le_bytes([b[d], b[d + 1]]));
        if self.maskable {
            self.mask = u32::from_le_bytes([b[d + 4], b[d + 5], b[d + 6], b[d + 7]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_programs_a_64_bit_capability() {
        let mut cap = MsiCap::new(0x40, 0x0080 | 0x000e | 1);
        assert!(!cap.enabled(), "the device's enable bit is not shown");
        assert_eq!(cap.len(), 14);
        cap.write(4, &0xfee0_1000u32.to_le_bytes());
        cap.write(8, &0u32.to_le_bytes());
        cap.write(12, &0x0022u16.to_le_bytes());
        cap.write(2, &0x0071u16.to_le_bytes());
        assert!(cap.enabled());
        assert_eq!(cap.control & 0x70, 0, "one vector only");
        assert_eq!(
            cap.message,
            MsiMessage {
                address: 0xfee0_1000,
                data: 0x22
            }
        );
        let b = cap.bytes();
        assert_eq!((b[0], b[1]), (5, 0));
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 0x0081);
    }

    #[test]
    fn default_routes_match_kvm() {
        let r = default_routes();
        assert_eq!(r.len(), 16 * 2 + 8);
        assert!(r.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
    }
}
