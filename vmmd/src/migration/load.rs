//! Incoming load, for every mode: the state file is checked whole against this VM before any vCPU
//! or device state is set; then RAM (normal mode), every part's state, the VFIO DMA addresses
//! (cpr-exec), and the runstate the guest had.

use std::path::Path;
use std::time::Duration;

use cpr_common::state::StateReader;
use tracing::warn;

use super::{guest_bytes_mut, MigrationError, POPULATE_CHUNK, PROGRESS_EVERY, RAM_CHUNK};
use crate::state::{versions, VmState};
use crate::vm::builder::dma_regions;
use crate::vm::{
    runstate, FaultInjection, MigrationReport, MigrationStatus, PhaseClock, RunEvent, RunState,
    Step, Vm,
};

impl Vm {
    pub(super) fn load_from(
        &mut self,
        path: &Path,
        clock: &mut PhaseClock,
        report: &mut MigrationReport,
    ) -> Result<(), MigrationError> {
        // After cpr-exec with the bridge the previous process still runs the guest: take it over.
        let bridged = self.take_over_from_bridge()?;
        let path = match &bridged {
            Some((state, took_over)) => {
                if *took_over {
                    // The pause starts at the take-over; what came before ran beside the guest.
                    *clock = PhaseClock::new();
                }
                state.as_path()
            }
            None => path,
        };
        let (mut reader, mut state): (StateReader, VmState) = StateReader::open(path)?;
        report.state_bytes = reader.header().meta_len;
        if reader.header().version == 1 {
            // Written by the previous release, whose hand-over carried part of the devices' state.
            if let Some(legacy) = self.legacy_device_state() {
                let devices = self.devices.pci().devices().len();
                versions::apply_legacy(&mut state, &legacy, devices);
            }
        }
        self.check_fits(&state, path)?;
        let has_ram = reader.header().has_ram;
        if has_ram {
            reader.expect_ram_len(self.ram.size())?;
        } else if self.inherited.is_none() && !self.ram.preexisting() {
            let err = self.no_ram_error(path);
            self.ram.remove_if_created();
            return Err(err);
        }
        clock.lap("load-state");
        if has_ram {
            self.read_ram(&mut reader, report)?;
            clock.lap("load-ram");
        }
        reader.finish()?;
        match self.config.fault {
            Some(FaultInjection::CrashDuringLoad) => {
                warn!("fault injection: aborting while loading the state");
                std::process::abort();
            }
            Some(FaultInjection::FailLoad) => return Err(MigrationError::Injected("fail-load")),
            Some(FaultInjection::VfioInvalidateTwice) | None => {}
        }

        self.restore_state(&state)?;
        clock.lap("restore");
        if let Some(v) = self.vfio.as_mut().filter(|v| v.is_invalid()) {
            let after_failed = self
                .inherited
                .as_ref()
                .is_some_and(|i| i.handover.rollback_reason.is_some());
            v.revalidate(&dma_regions(&self.ram), after_failed)
                .map_err(|source| MigrationError::VfioDma {
                    step: "update-vaddr",
                    source,
                })?;
            clock.lap("vfio-remap");
        }

        let next = match runstate::step(self.run_state, RunEvent::Loaded(state.run_state)) {
            Ok(Step::To(next)) => next,
            _ => RunState::from(state.run_state),
        };
        if next == RunState::Running {
            self.vcpus.control.resume();
        }
        clock.lap("resume");
        if !has_ram && self.config.populate_after_load && bridged.is_none() {
            // The RAM is a fresh mapping of existing pages: map them before the guest faults on them.
            if let Err(e) = self
                .ram
                .populate_in_background(POPULATE_CHUNK, Duration::ZERO)
            {
                warn!(error = %e, "cannot start populating guest RAM in the background");
            }
        }
        // What this process saw of the guest's pause; a cpr-exec load knows the whole of it.
        report.downtime = clock.start.elapsed();
        if let Some(ctx) = self.inherited.take() {
            let running = next == RunState::Running;
            self.finish_cpr_incoming(ctx, clock, report, running, state.devices.console);
        }
        self.set_run_state(next, "incoming migration completed");
        Ok(())
    }

    /// Refuses a state saved from a VM of another shape (vCPUs, RAM layout).
    fn check_fits(&self, state: &VmState, path: &Path) -> Result<(), MigrationError> {
        let incompatible = |detail: String| MigrationError::Incompatible {
            path: path.to_path_buf(),
            detail,
        };
        if state.vcpus.len() != self.vcpus.count() {
            return Err(incompatible(format!(
                "it was saved with {} vCPUs and this vmmd has {}: start vmmd with --vcpus {}",
                state.vcpus.len(),
                self.vcpus.count(),
                state.vcpus.len()
            )));
        }
        if state.memory != self.ram.regions() {
            let saved: u64 = state.memory.iter().map(|r| r.size).sum();
            return Err(incompatible(format!(
                "it was saved with {saved} bytes of RAM and this vmmd has {}: start vmmd with --memory size={saved}",
                self.ram.size()
            )));
        }
        if state
            .vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| v.id as usize != i)
        {
            return Err(incompatible("vCPU ids are out of order".into()));
        }
        Ok(())
    }

    /// A state without RAM, and nothing this process maps holds the guest's RAM.
    fn no_ram_error(&self, path: &Path) -> MigrationError {
        MigrationError::Incompatible {
            path: path.to_path_buf(),
            detail: match self.ram.path() {
                Some(p) => format!(
                    "it holds no guest RAM (cpr-reboot), and the RAM file {} did not exist when this \
                     vmmd started: point --memory path= at the guest's RAM file",
                    p.display()
                ),
                None => "it holds no guest RAM (written in cpr-exec or cpr-reboot mode), and this vmmd \
                         neither inherited the guest's RAM nor maps a RAM file: load it with \
                         --memory size=...,path= pointing at the guest's RAM file"
                    .into(),
            },
        }
    }

    /// Normal mode: guest RAM from the state file.
    fn read_ram(
        &self,
        reader: &mut StateReader,
        report: &mut MigrationReport,
    ) -> Result<(), MigrationError> {
        let total = self.ram.size();
        let mut done = 0u64;
        for (_, host, len) in self.ram.host_slices() {
            for off in (0..len).step_by(RAM_CHUNK) {
                let n = RAM_CHUNK.min(len - off);
                // SAFETY: the mapping is live and owned by `self.ram`; the vCPUs of an incoming VM
                // have never run and are parked, so nothing else touches guest RAM.
                let chunk = unsafe { guest_bytes_mut(host.add(off), n) };
                reader.read_ram(chunk)?;
                done += n as u64;
                if done.is_multiple_of(PROGRESS_EVERY) {
                    self.report_progress(MigrationStatus::Active, "load-ram", done, total, true);
                }
            }
        }
        report.ram_bytes = done;
        Ok(())
    }
}
