//! The VM state saved in a state file's meta section, and the VM-level (not per-vCPU) KVM state.
//!
//! Versioning: the container (magic, format version, checksums) is `cpr_common::state`. Any change to
//! these structures bumps `STATE_FORMAT_VERSION`; an older vmmd then refuses the file before touching
//! the guest, and a newer vmmd keeps a reader for each version it still accepts.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use crate::devices::pm::PmState;
use crate::devices::serial::UartState;
use crate::memory::RamRegion;
use crate::vcpu::VcpuState;

/// The runstate the guest had when it was saved, and gets back when loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SavedRunState {
    /// Running.
    Running,
    /// Paused by the operator.
    Paused,
    /// Suspended to RAM by the guest.
    Suspended,
}

/// Interrupt controllers, PIT and kvmclock.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct KvmVmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// Everything but guest RAM.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// vmmd version that wrote the file (informational).
    pub vmmd_version: String,
    /// Guest RAM layout; must match the loading VM's.
    pub memory: Vec<RamRegion>,
    /// Runstate to go back to.
    pub run_state: SavedRunState,
    /// Per-vCPU state, indexed by vCPU id.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide KVM state.
    pub vm: KvmVmState,
    /// COM1.
    pub serial: UartState,
    /// PM device.
    pub pm: PmState,
}

/// A VM-level KVM ioctl failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed on the VM")]
pub struct KvmVmError {
    /// The ioctl.
    pub op: &'static str,
    /// The kernel's error.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmVmError {
    move |source| KvmVmError { op, source }
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmVmError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl KvmVmState {
    /// Reads the VM-wide state of a paused VM.
    pub fn capture(vm: &VmFd) -> Result<KvmVmState, KvmVmError> {
        Ok(KvmVmState {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(err("KVM_GET_CLOCK"))?,
        })
    }

    /// Loads it into a VM whose vCPUs have not run yet.
    pub fn restore(&self, vm: &VmFd) -> Result<(), KvmVmError> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(err("KVM_SET_PIT2"))?;
        // Only the clock value carries over: TSC_STABLE and friends are outputs of KVM_GET_CLOCK.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
        Ok(())
    }
}
