//! The VM: everything one vmmd process owns, its runstate, and the operations that do not move
//! the guest elsewhere. Construction is in [`builder`]; saving and loading in `crate::migration`;
//! live update in `crate::cpr`, which add their own `impl Vm` blocks on top of this layer.

pub mod builder;
pub mod config;
pub mod error;
pub mod events;
pub mod metrics;
pub mod runstate;
pub mod snapshot;
pub mod status;

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cpr_common::MigrationMode;
use kvm_ioctls::{Kvm, VmFd};
use tracing::{info, warn};

pub use builder::{EarlyVm, Inherited, VmBuilder};
pub use config::{FaultInjection, Incoming, VmConfig};
pub use error::VmError;
pub(crate) use events::PhaseClock;
pub use events::{EventBus, MigrationProgress, MigrationReport, MigrationStatus, VmEvent};
pub use metrics::{UpdateOutcome, VmMetrics};
pub use runstate::{RunEvent, RunState, Step};
pub use status::UpdateStatus;

use crate::boot::pvh;
use crate::console::Console;
use crate::devices::{Devices, GuestRequest};
use crate::memory::GuestRam;
use crate::state::handover::{BridgeReply, CprHandover, UndoneStep};
use crate::state::SavedRunState;
use crate::vcpu::{VcpuEvent, VcpuSet};
use crate::vfio::msi::MsiRouter;
use crate::vfio::Vfio;

/// vmmd's version as reported over the API: the crate version, or `VMMD_BUILD_VERSION` when the
/// binary was built with it set (how a test builds "a different vmmd" to update to).
pub const VERSION: &str = match option_env!("VMMD_BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// How long parking the vCPUs may take.
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The console's output buffer.
pub(crate) const CONSOLE_BUFFER: usize = 1 << 20;

/// The VM and everything it owns.
///
/// Field order is drop order: vCPU threads stop first, then devices and the console, then the KVM VM,
/// and guest RAM is unmapped last. The layers above (`migration`, `cpr`) work on the fields directly.
pub struct Vm {
    pub(crate) vcpus: VcpuSet,
    pub(crate) devices: Arc<Devices>,
    pub(crate) console: Option<Console>,
    pub(crate) vm_fd: VmFd,
    /// VFIO containers and DMA mappings (the devices themselves are on the PCI bus); closed before
    /// guest RAM is unmapped, so the pinned pages are released first.
    pub(crate) vfio: Option<Vfio>,
    /// The passthrough devices' interrupt routing (with VFIO devices).
    pub(crate) msi_router: Option<Arc<MsiRouter>>,
    pub(crate) ram: GuestRam,
    pub(crate) config: VmConfig,
    pub(crate) msr_indices: Vec<u32>,
    pub(crate) run_state: RunState,
    pub(crate) mode: MigrationMode,
    pub(crate) exec_args: Vec<String>,
    pub(crate) api_listener_fd: Option<RawFd>,
    pub(crate) inherited: Option<InheritedContext>,
    pub(crate) generation: u64,
    pub(crate) update_status: UpdateStatus,
    /// What this process (or, after a rollback, the failed one) undid itself of the last update.
    pub(crate) update_undone: Vec<UndoneStep>,
    /// Live-update counters, carried across updates.
    pub(crate) metrics: VmMetrics,
    pub(crate) workflow_step: String,
    /// The runstate a completed save started from (what `resume` from postmigrate returns to).
    pub(crate) saved_from: Option<SavedRunState>,
    /// Shut down straight from `postmigrate`: the state was handed to a successor.
    pub(crate) shut_down_after_save: bool,
    pub(crate) events: EventBus,
    pub(crate) last_migration: Arc<Mutex<MigrationReport>>,
    /// Where vCPU events go (guest requests the bridge saw are re-raised here).
    pub(crate) vcpu_events: tokio::sync::mpsc::UnboundedSender<VcpuEvent>,
    pub(crate) kvm: Kvm,
}

/// What stays of the hand-over while the new process loads the state.
pub(crate) struct InheritedContext {
    pub(crate) handover: CprHandover,
    /// The inherited fds (by hand-over name) under the numbers the hand-over names, kept for a
    /// rollback.
    pub(crate) held: Vec<(String, OwnedFd)>,
    pub(crate) started_ns: u64,
    /// The previous process's bridge, which runs the guest until it is taken over.
    pub(crate) bridge: Option<std::os::unix::net::UnixStream>,
    /// The bridge's answer, once taken over.
    pub(crate) bridge_reply: Option<BridgeReply>,
}

impl From<runstate::Refused> for VmError {
    fn from(r: runstate::Refused) -> VmError {
        VmError::WrongState {
            op: r.op,
            state: r.state,
            hint: r.hint,
        }
    }
}

impl Vm {
    /// Loads the kernel and starts the guest.
    pub fn boot(&mut self) -> Result<(), VmError> {
        let kernel = self.config.kernel.clone().ok_or(VmError::NoKernel)?;
        let entry = pvh::load_kernel(self.ram.memory(), &kernel)?;
        pvh::write_boot_info(
            self.ram.memory(),
            self.ram.regions(),
            &self.config.cmdline,
            self.config.vcpus,
        )?;
        pvh::setup_boot_vcpu(&lock(&self.vcpus.fds[0]), entry)?;
        info!(kernel = %kernel.display(), entry = format!("{entry:#x}"), "booting");
        if let Step::To(next) = runstate::step(self.run_state, RunEvent::Boot)? {
            self.vcpus.control.resume();
            self.set_run_state(next, "boot");
        }
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The current runstate.
    pub fn run_state(&self) -> RunState {
        self.run_state
    }

    /// The pty path of a `pty` console.
    pub fn serial_pty(&self) -> Option<PathBuf> {
        self.console
            .as_ref()
            .and_then(|c| c.pty_path())
            .map(|p| p.to_path_buf())
    }

    /// Shared handle to the last migration's report (readable while a migration runs).
    pub fn last_migration(&self) -> Arc<Mutex<MigrationReport>> {
        self.last_migration.clone()
    }

    /// The migration mode the next migrate uses.
    pub fn mode(&self) -> MigrationMode {
        self.mode
    }

    /// Records a runstate the transition table allowed, and tells observers.
    pub(crate) fn set_run_state(&mut self, new: RunState, reason: &str) {
        let old = self.run_state;
        if old == new {
            return;
        }
        self.run_state = new;
        info!(%old, %new, reason, "runstate");
        crate::notify::status(&format!("{new} ({reason})"));
        self.events.send(VmEvent::RunState {
            old,
            new,
            reason: reason.to_string(),
        });
    }

    /// Parks every vCPU (the runstate is the caller's business).
    pub(crate) fn pause_vcpus(&self) -> Result<(), VmError> {
        Ok(self
            .vcpus
            .control
            .pause(self.vcpus.count(), PAUSE_TIMEOUT)?)
    }

    /// Stops the vCPUs.
    pub fn pause(&mut self) -> Result<RunState, VmError> {
        if let Step::To(next) = runstate::step(self.run_state, RunEvent::Pause)? {
            self.pause_vcpus()?;
            self.set_run_state(next, "api pause");
        }
        Ok(self.run_state)
    }

    /// Restarts the vCPUs (after a save: cancels it).
    pub fn resume(&mut self) -> Result<RunState, VmError> {
        let saved_suspended = self.saved_from == Some(SavedRunState::Suspended);
        let event = RunEvent::Resume { saved_suspended };
        if let Step::To(next) = runstate::step(self.run_state, event)? {
            let reason = match next {
                RunState::Running => {
                    self.vcpus.control.resume();
                    "api resume"
                }
                _ => "api resume after migration (guest suspended)",
            };
            self.set_run_state(next, reason);
        }
        Ok(self.run_state)
    }

    /// Wakes a guest that suspended itself.
    pub fn wakeup(&mut self) -> Result<RunState, VmError> {
        if let Step::To(next) = runstate::step(self.run_state, RunEvent::Wakeup)? {
            self.devices.pm().wake();
            self.vcpus.control.resume();
            self.set_run_state(next, "system wakeup");
        }
        Ok(self.run_state)
    }

    /// Stops the VM for good (quit or guest poweroff).
    pub fn shut_down(&mut self, reason: &str) {
        if let Ok(Step::To(next)) = runstate::step(self.run_state, RunEvent::Shutdown) {
            self.shut_down_after_save = self.run_state == RunState::PostMigrate;
            if let Err(e) = self.pause_vcpus() {
                warn!(error = %e, "vCPUs did not stop cleanly at shutdown");
            }
            self.set_run_state(next, reason);
        }
    }

    /// Handles what a vCPU thread reported. Returns true when vmmd should exit.
    pub fn handle_vcpu_event(&mut self, event: VcpuEvent) -> bool {
        match event {
            VcpuEvent::Guest(GuestRequest::Suspend) => {
                // The suspending vCPU already asked all vCPUs to stop; wait until they have.
                if let Err(e) = self.pause_vcpus() {
                    warn!(error = %e, "vCPUs did not stop for guest suspend");
                }
                if let Ok(Step::To(next)) = runstate::step(self.run_state, RunEvent::GuestSuspend) {
                    self.set_run_state(next, "guest suspend (S3)");
                }
                false
            }
            VcpuEvent::Guest(GuestRequest::PowerOff) => {
                self.shut_down("guest poweroff");
                true
            }
            VcpuEvent::Guest(GuestRequest::Reset(why)) => {
                self.shut_down(&format!("guest reset: {why}"));
                true
            }
            VcpuEvent::Failed { id, reason } => {
                self.shut_down(&format!("vCPU {id} failed: {reason}"));
                true
            }
        }
    }

    /// The exec arguments for cpr-exec.
    pub fn exec_args(&self) -> &[String] {
        &self.exec_args
    }

    /// Tells the VM which fd the API listens on, so cpr-exec can hand it over.
    pub fn set_api_listener_fd(&mut self, fd: RawFd) {
        self.api_listener_fd = Some(fd);
    }

    /// Why cpr-exec cannot run now (empty when it can).
    pub fn cpr_exec_blockers(&self) -> Vec<String> {
        let mut blockers = Vec::new();
        if self.api_listener_fd.is_none() {
            blockers.push("the API socket is not known to the CPR engine".to_string());
        }
        if let Some(v) = &self.vfio {
            blockers.extend(v.cpr_exec_blockers());
        }
        blockers
    }

    /// Why cpr-reboot cannot run now (empty when it can).
    pub fn cpr_reboot_blockers(&self) -> Vec<String> {
        let mut blockers = self.cpr_reboot_blockers_cleared_by_suspend();
        if self.config.memory.path.is_none() {
            blockers.push(
                "guest RAM is an anonymous memfd, which does not outlive the vmmd process: start vmmd \
                 with --memory size=...,path=FILE on /dev/shm, hugetlbfs or a DAX device"
                    .to_string(),
            );
        }
        blockers
    }

    /// The cpr-reboot blockers that suspending the guest (S3) clears.
    pub fn cpr_reboot_blockers_cleared_by_suspend(&self) -> Vec<String> {
        let mut blockers = Vec::new();
        if self.vfio.is_some() && self.run_state != RunState::Suspended {
            blockers.push(
                "VFIO devices keep DMA-ing into guest RAM and their IOMMU mappings do not survive \
                 a host reboot: suspend the guest first (cprctl reboot-prep --suspend, or \
                 system_suspend), then retry"
                    .to_string(),
            );
        }
        blockers
    }

    /// Whether the VM was shut down right after a completed save (a successor loads its state).
    pub fn shut_down_after_save(&self) -> bool {
        self.shut_down_after_save || self.run_state == RunState::PostMigrate
    }

    /// Whether VFIO devices are configured.
    pub fn has_vfio(&self) -> bool {
        self.vfio.is_some()
    }

    /// Stops the console and removes its socket (before the process exits and a successor binds it).
    pub fn close_console(&mut self) {
        drop(self.console.take());
    }

    /// Live updates this guest has been through.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Records the step an orchestrator reports.
    pub fn set_workflow_step(&mut self, step: String) {
        info!(%step, "workflow step");
        self.workflow_step = step;
    }

    /// The last step an orchestrator reported.
    pub fn workflow_step(&self) -> &str {
        &self.workflow_step
    }

    /// The live-update counters (this process's and its predecessors').
    pub fn metrics(&self) -> &VmMetrics {
        &self.metrics
    }

    /// The compensations vmmd ran itself during the last failed or rolled-back update.
    pub fn update_undone(&self) -> &[UndoneStep] {
        &self.update_undone
    }

    /// The last update step this process saw.
    pub fn update_status(&self) -> &UpdateStatus {
        &self.update_status
    }

    /// Keeps the inherited fds (under the numbers the hand-over names) until the guest runs again, so
    /// a rollback can pass them on.
    pub fn hold_for_rollback(&mut self, fds: Vec<(String, OwnedFd)>) {
        if let Some(ctx) = &mut self.inherited {
            ctx.held = fds;
        }
    }

    /// Whether this process was started by cpr-exec and has not loaded the state yet.
    pub fn awaiting_handover_load(&self) -> bool {
        self.inherited.is_some() && self.run_state == RunState::InMigrate
    }
}

/// Locks a mutex, recovering it if a thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
