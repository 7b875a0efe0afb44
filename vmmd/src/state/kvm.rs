//! The VM-wide KVM state (interrupt controllers, PIT, kvmclock), saved and restored through
//! [`Persist`].

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use crate::persist::Persist;

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

/// The KVM VM's own state, as a [`Persist`] object over its fd.
pub struct KvmVm<'a>(pub &'a VmFd);

impl<'a> Persist for KvmVm<'a> {
    type State = KvmVmState;
    /// The new VM, whose vCPUs have not run yet.
    type ConstructorArgs = &'a VmFd;
    type Error = KvmVmError;

    /// Reads the VM-wide state of a paused VM.
    fn save(&self) -> Result<KvmVmState, KvmVmError> {
        let vm = self.0;
        Ok(KvmVmState {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(err("KVM_GET_CLOCK"))?,
        })
    }

    /// Loads the state into `vm`.
    fn restore(vm: &'a VmFd, state: &KvmVmState) -> Result<KvmVm<'a>, KvmVmError> {
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            vm.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&state.pit).map_err(err("KVM_SET_PIT2"))?;
        // Only the clock value carries over: TSC_STABLE and friends are outputs of KVM_GET_CLOCK.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
        Ok(KvmVm(vm))
    }
}
