//! The VM state composed from every part's [`Persist`] state, and loaded back part by part.

use std::sync::{Arc, Mutex};

use cpr_common::state::encode_meta;
use kvm_ioctls::{VcpuFd, VmFd};

use super::{lock, MigrationReport, Vm, VmError, VERSION};
use crate::console::ConsoleState;
use crate::devices::pm::PmDevice;
use crate::devices::serial::SerialDevice;
use crate::devices::Devices;
use crate::memory::RamRegion;
use crate::persist::Persist;
use crate::state::{DevicesState, KvmVm, SavedRunState, VmState};
use crate::vcpu::{self, Vcpu, VcpuArgs};
use crate::vfio::device::PassthroughDevice;
use crate::vfio::VfioError;

/// Exactly what a capture reads: also what the cpr-exec bridge's control continuation gets, instead
/// of the whole [`Vm`].
#[derive(Clone, Copy)]
pub(crate) struct SnapshotSource<'a> {
    pub(crate) vm_fd: &'a VmFd,
    pub(crate) vcpu_fds: &'a [Arc<Mutex<VcpuFd>>],
    pub(crate) msr_indices: &'a [u32],
    pub(crate) memory: &'a [RamRegion],
    pub(crate) devices: &'a Devices,
}

/// The value of an infallible result.
fn never<T>(e: std::convert::Infallible) -> T {
    match e {}
}

impl SnapshotSource<'_> {
    /// Composes the VM state of a paused VM from its parts' saved states. `console` is the stopped
    /// console's undelivered bytes (empty when the console stays with this process).
    pub(crate) fn capture(
        &self,
        run_state: SavedRunState,
        console: ConsoleState,
    ) -> Result<VmState, VmError> {
        let mut vcpus = Vec::with_capacity(self.vcpu_fds.len());
        for (id, fd) in self.vcpu_fds.iter().enumerate() {
            vcpus.push(Vcpu::new(&lock(fd), id as u8, self.msr_indices).save()?);
        }
        let vfio = self
            .devices
            .pci()
            .devices()
            .iter()
            .map(|d| d.save().unwrap_or_else(never))
            .collect();
        Ok(VmState {
            vmmd_version: VERSION.to_string(),
            memory: self.memory.to_vec(),
            run_state,
            vm: KvmVm(self.vm_fd).save()?,
            vcpus,
            devices: DevicesState {
                serial: self.devices.serial().save()?,
                pm: self.devices.pm().save().unwrap_or_else(never),
                vfio,
                console,
            },
        })
    }

    /// Captures and encodes the state (the meta section of a state file).
    pub(crate) fn encode(
        &self,
        run_state: SavedRunState,
        console: ConsoleState,
        report: &mut MigrationReport,
    ) -> Result<Vec<u8>, VmError> {
        let meta = encode_meta(&self.capture(run_state, console)?).map_err(VmError::Encode)?;
        report.state_bytes = meta.len() as u64;
        Ok(meta)
    }
}

impl Vm {
    /// What a capture of this VM reads.
    pub(crate) fn snapshot_source(&self) -> SnapshotSource<'_> {
        SnapshotSource {
            vm_fd: &self.vm_fd,
            vcpu_fds: &self.vcpus.fds,
            msr_indices: &self.msr_indices,
            memory: self.ram.regions(),
            devices: &self.devices,
        }
    }

    /// Captures and encodes the vCPU/VM/device state of the paused VM.
    pub(crate) fn encode_state(
        &self,
        run_state: SavedRunState,
        console: ConsoleState,
        report: &mut MigrationReport,
    ) -> Result<Vec<u8>, VmError> {
        self.snapshot_source().encode(run_state, console, report)
    }

    /// Loads every part's state into this incoming VM, whose vCPUs have never run. Passthrough
    /// devices inherited by cpr-exec get the guest's MSI programming back and are wired to this VM;
    /// freshly opened ones were reset and wired at build time, so their saved state does not apply.
    pub(crate) fn restore_state(&mut self, state: &VmState) -> Result<(), VmError> {
        KvmVm::restore(&self.vm_fd, &state.vm)?;
        for (fd, s) in self.vcpus.fds.iter().zip(&state.vcpus) {
            let fd = lock(fd);
            // Which MSRs later saves read is probed below, once the CPUIDs are set.
            let args = VcpuArgs {
                fd: &fd,
                msr_indices: &[],
            };
            Vcpu::restore(args, s)?;
        }
        self.msr_indices = vcpu::saveable_msrs(&self.kvm, &lock(&self.vcpus.fds[0]))?;
        {
            let mut serial = self.devices.serial();
            let args = serial.constructor_args()?;
            *serial = SerialDevice::restore(args, &state.devices.serial)?;
        }
        *self.devices.pm() = PmDevice::restore((), &state.devices.pm).unwrap_or_else(never);
        if self.inherited.is_some() {
            if let Some(router) = &self.msi_router {
                let mut pci = self.devices.pci();
                let mut devices = Vec::new();
                let mut wired = Ok(());
                for (i, dev) in pci.take_devices().into_iter().enumerate() {
                    let mut dev = match state.devices.vfio.get(i) {
                        Some(saved) => PassthroughDevice::restore(dev, saved).unwrap_or_else(never),
                        None => dev,
                    };
                    if wired.is_ok() {
                        wired = dev.wire(router.clone());
                    }
                    devices.push(dev);
                }
                // Every device goes back on the bus, wired or not: a rollback hands them all on.
                pci.put_devices(devices);
                wired.map_err(VfioError::from)?;
            }
        }
        Ok(())
    }
}
