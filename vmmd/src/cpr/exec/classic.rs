//! cpr-exec without the bridge (with VFIO devices, or `--cpr-exec-bridge false`): the guest stays
//! paused from the save to the new process's load.
//!
//! | step | what it does | compensation |
//! | --- | --- | --- |
//! | keep the address space | a `CLONE_VM` child keeps it alive across `execve`, so the exec does not tear down guest RAM's page tables inside the pause (or: unmap guest RAM first) | the keeper exits |
//! | pause | park the vCPUs | resume them |
//! | invalidate VADDR | `VFIO_IOMMU_UNMAP_DMA` with `VADDR` on every container (the container that fails undoes the ones before it) | map the addresses again |
//! | stop the console | its thread stops; fds and undelivered bytes kept | the console serves again |
//! | save | vCPU/VM/device state, console bytes included, to the state file (no RAM, no fsync) | — (the next update overwrites it) |
//! | hand over and exec | the hand-over (fds, process facts) in a memfd; close-on-exec cleared; `execve` | close-on-exec set again |
//!
//! After `execve` succeeds there is no way back in this process: the new one loads the state, or
//! re-executes this binary with it (`crate::cpr::incoming`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use cpr_common::state::write_state_without_ram;
use tracing::warn;

use super::process::AddressSpaceKeeper;
use super::{Compensation, Compensations};
use crate::cpr::CprError;
use crate::migration::UNMAP_CHUNK;
use crate::persist::Persist;
use crate::state::handover::fd_names;
use crate::state::SavedRunState;
use crate::sys::fd::monotonic_ns;
use crate::vfio::Vfio;
use crate::vm::{lock, FaultInjection, MigrationReport, PhaseClock, UpdateStatus, Vm, VmError};

/// Whether the one-shot `--fault-inject vfio-invalidate-twice` has fired in this process.
static INVALIDATED_TWICE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Vm {
    /// Runs the classic path's steps; returns only when one failed, after every compensation ran.
    pub(super) fn exec_classic(
        &mut self,
        path: &Path,
        saved: SavedRunState,
        previous: OwnedFd,
        clock: &mut PhaseClock,
        report: &mut MigrationReport,
    ) -> CprError {
        let mut undo = Compensations::default();
        let err = self.classic_steps(path, saved, &previous, clock, report, &mut undo);
        undo.unwind(self).unwrap_or(err)
    }

    fn classic_steps(
        &mut self,
        path: &Path,
        saved: SavedRunState,
        previous: &OwnedFd,
        clock: &mut PhaseClock,
        report: &mut MigrationReport,
        undo: &mut Compensations,
    ) -> CprError {
        // Keep the address space, while the guest still runs.
        let keeper = match AddressSpaceKeeper::spawn() {
            Ok(k) => Some(k),
            Err(e) => {
                warn!(error = %e, "cannot keep the address space across the exec; unmapping guest RAM first");
                if let Err(e) = self
                    .ram
                    .drop_host_mappings(UNMAP_CHUNK, Duration::from_micros(500))
                {
                    warn!(error = %e, "cannot drop guest RAM mappings before the exec; the pause may be longer");
                }
                None
            }
        };
        let keeper_fd = keeper.as_ref().map(|k| (k.release_fd(), k.pid()));
        if let Some(k) = keeper {
            undo.push(Compensation::ReleaseKeeper(k));
        }

        // Pause.
        if saved == SavedRunState::Running {
            // Also when the pause fails half-way: a vCPU that did park must run again.
            undo.push(Compensation::ResumeVcpus);
            if let Err(e) = self.pause_vcpus() {
                return e.into();
            }
        }
        let paused_at = monotonic_ns();
        clock.lap("pause");

        // Invalidate the VFIO DMA host addresses.
        if let Some(v) = &mut self.vfio {
            self.update_status = UpdateStatus::InProgress("invalidating VFIO DMA host addresses");
            // One-shot, so that the next update from this process can succeed.
            let twice = self.config.fault == Some(FaultInjection::VfioInvalidateTwice)
                && !INVALIDATED_TWICE.swap(true, std::sync::atomic::Ordering::Relaxed);
            if let Err(source) = v.invalidate(twice) {
                return CprError::VfioDma {
                    step: "invalidate-vaddr",
                    source,
                };
            }
            undo.push(Compensation::RestoreVfioAddresses);
            clock.lap("vfio-invalidate");
        }

        // Stop the console: its undelivered bytes go into the state.
        self.update_status = UpdateStatus::InProgress("saving");
        let Some(console) = self.console.take() else {
            return VmError::Internal("the console is missing").into();
        };
        let console = console.quiesce();
        let console_state = match console.save() {
            Ok(s) => s,
            Err(e) => return VmError::from(e).into(),
        };
        let console_fds: Vec<(String, i32)> = console
            .handover()
            .named_fds()
            .into_iter()
            .map(|(n, fd)| (n.to_string(), fd))
            .collect();
        let console_pty = console.handover().pty_path.clone();
        undo.push(Compensation::ResumeConsole(console));

        // Save. The file only has to outlive the exec on this host: no fsync inside the pause.
        let written = self
            .encode_state(saved, console_state, report)
            .map_err(CprError::from)
            .and_then(|meta| Ok(write_state_without_ram(path, &meta, false)?));
        if let Err(e) = written {
            return e;
        }
        clock.lap("save-state");

        // Hand over and exec. The old VM is destroyed by whoever closes its fds last: let that be
        // the new process, after the guest runs again (see `fd_names::RETIRED_KVM_PREFIX`).
        let prefix = fd_names::RETIRED_KVM_PREFIX;
        let mut fds = vec![
            (format!("{prefix}-dev"), self.kvm.as_raw_fd()),
            (format!("{prefix}-vm"), self.vm_fd.as_raw_fd()),
        ];
        for (i, vcpu) in self.vcpus.fds.iter().enumerate() {
            fds.push((format!("{prefix}-vcpu{i}"), lock(vcpu).as_raw_fd()));
        }
        if let Some((fd, _)) = keeper_fd {
            fds.push((fd_names::ADDRESS_SPACE_KEEPER.to_string(), fd));
        }
        fds.extend(console_fds);
        if let Some(v) = &self.vfio {
            fds.extend(v.handover_fds());
            for (i, dev) in self.devices.pci().devices().iter().enumerate() {
                fds.extend(dev.handover_fds(i));
            }
        }
        let handover = self
            .handover(path, paused_at, previous)
            .fds(fds)
            .phases(&clock.phases)
            .console_pty(console_pty)
            .keeper(keeper_fd.map(|(_, pid)| pid))
            .vfio_model_containers(
                self.vfio
                    .as_ref()
                    .map(Vfio::model_container_ids)
                    .unwrap_or_default(),
            )
            .build();
        self.exec_with_handover(&handover, "cpr-exec: exec")
    }
}
