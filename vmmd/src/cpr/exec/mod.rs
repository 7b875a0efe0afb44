//! cpr-exec: replace the vmmd binary under the running guest, same PID, guest RAM never copied.
//!
//! [`Vm::cpr_exec`] checks everything it can while the guest runs, then takes one of two paths:
//!
//! - [`bridged`] (the default): the guest keeps running in `CLONE_VM` continuations of this process
//!   across the `execve`; the new process takes it over when its VM is built.
//! - [`classic`] (with VFIO devices, or `--cpr-exec-bridge false`): the guest stays paused from the
//!   save to the new process's load.
//!
//! Each path is a list of steps; every step that changes something pushes its compensation onto a
//! [`Compensations`] stack, and a failure before `execve` succeeds runs the stack backwards: the
//! guest runs on this binary as before, and the API says what failed. After a successful exec the
//! new process owns the update (`super::incoming`): it loads, or rolls back to this binary.

pub mod bridged;
pub mod classic;
pub mod process;

use std::path::Path;

use tracing::warn;

use super::CprError;
use crate::console::{Console, StoppedConsole};
use crate::state::SavedRunState;
use crate::vm::{MigrationReport, PhaseClock, UpdateOutcome, UpdateStatus, Vm, VmError};

/// Undoes one step of an update that did not reach its `execve`.
pub(crate) enum Compensation {
    /// The vCPUs were paused: resume them.
    ResumeVcpus,
    /// The VFIO DMA host addresses were invalidated: make them valid again.
    RestoreVfioAddresses,
    /// The console was stopped and its fds handed over: serve again with what it had.
    ResumeConsole(StoppedConsole),
    /// The console loop moved into the bridge: bring it back.
    ConsoleFromBridge,
    /// The vCPU loops moved into the bridge: park them there and bring them back.
    VcpusFromBridge,
    /// The address-space keeper was started: let it exit.
    ReleaseKeeper(process::AddressSpaceKeeper),
}

/// An undo action on a `T`.
pub(crate) trait Compensate<T> {
    /// Undoes the step.
    fn run(self, target: &mut T) -> Result<(), CprError>;
}

/// The compensations of the steps done so far, run last-first.
pub(crate) struct Compensations<C = Compensation>(Vec<C>);

impl<C> Default for Compensations<C> {
    fn default() -> Self {
        Compensations(Vec::new())
    }
}

impl<C> Compensations<C> {
    /// Records the compensation of a step that just succeeded.
    pub(crate) fn push(&mut self, c: C) {
        self.0.push(c);
    }

    /// Undoes every step, last first. A compensation that fails is logged and the rest still run;
    /// the first such failure is returned (it replaces the update's error: the operator must know
    /// the guest is not quite as before).
    pub(crate) fn unwind<T>(self, target: &mut T) -> Option<CprError>
    where
        C: Compensate<T>,
    {
        let mut first = None;
        for c in self.0.into_iter().rev() {
            if let Err(e) = c.run(target) {
                warn!(error = %e, "a cpr-exec compensation failed");
                first.get_or_insert(e);
            }
        }
        first
    }
}

impl Compensate<Vm> for Compensation {
    fn run(self, vm: &mut Vm) -> Result<(), CprError> {
        match self {
            Compensation::ResumeVcpus => vm.vcpus.control.resume(),
            Compensation::RestoreVfioAddresses => {
                if let Some(v) = vm.vfio.as_mut().filter(|v| v.is_invalid()) {
                    v.cancel_invalidation().map_err(|undo| CprError::VfioDma {
                        step: "restore-vaddr after a failed exec",
                        source: crate::vfio::dma::DmaStepError {
                            failed: undo,
                            undo: None,
                        },
                    })?;
                }
            }
            Compensation::ResumeConsole(h) => {
                vm.console = Some(Console::resume(h).map_err(VmError::from)?);
            }
            Compensation::ConsoleFromBridge => {
                if let Some(c) = &vm.console {
                    c.reattach_from_bridge(bridged::BRIDGE_MOVE_TIMEOUT);
                }
            }
            Compensation::VcpusFromBridge => {
                let count = vm.vcpus.count();
                let back = vm
                    .vcpus
                    .control
                    .pause(count, crate::vm::PAUSE_TIMEOUT)
                    .and_then(|()| {
                        vm.vcpus
                            .control
                            .reattach(count, bridged::BRIDGE_MOVE_TIMEOUT)
                    });
                if let Err(e) = back {
                    warn!(error = %e, "cannot take the vCPUs back from the bridge");
                }
            }
            Compensation::ReleaseKeeper(k) => k.release(),
        }
        Ok(())
    }
}

impl Vm {
    /// cpr-exec to the binary of the exec arguments, keeping the state at `path`. Returns only
    /// when the update failed before `execve` succeeded; the guest then runs on, as before.
    pub(crate) fn cpr_exec(
        &mut self,
        uri: &str,
        path: &Path,
        saved: SavedRunState,
    ) -> Result<MigrationReport, CprError> {
        self.update_status = UpdateStatus::InProgress("preflight");
        self.update_undone.clear();
        // The running binary is opened for a rollback now, not inside the pause.
        let previous = match self
            .cpr_exec_preflight(path)
            .and_then(|()| process::open_self().map_err(CprError::from))
        {
            Ok(fd) => fd,
            Err(e) => {
                self.update_status =
                    UpdateStatus::Failed(format!("refused before pausing the guest: {e}"));
                self.metrics.record(UpdateOutcome::Refused, None);
                return Err(e);
            }
        };
        let mut report = self.start_report(uri, false);
        let mut clock = PhaseClock::new();
        // VFIO DMA must be invalidated with the guest stopped for the whole exec: no bridge then.
        let err = if self.config.cpr_exec_bridge && self.vfio.is_none() {
            self.exec_bridged(path, saved, &previous, &mut clock)
        } else {
            self.exec_classic(path, saved, previous, &mut clock, &mut report)
        };
        Err(self.update_failed(err, report, clock))
    }

    /// Everything that can be checked before the guest is paused: the new binary and its arguments,
    /// blockers, and that the state file can be created.
    fn cpr_exec_preflight(&self, path: &Path) -> Result<(), CprError> {
        process::preflight(&self.exec_args)?;
        if let Some(blocker) = self.cpr_exec_blockers().into_iter().next() {
            return Err(CprError::Blocked(blocker));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| cpr_common::state::StateFileError::Io {
                path: path.to_path_buf(),
                op: "create",
                source,
            })?;
        Ok(())
    }

    /// The epilogue of an update that failed before the exec (its compensations have run).
    fn update_failed(
        &mut self,
        err: CprError,
        mut report: MigrationReport,
        clock: PhaseClock,
    ) -> CprError {
        warn!(error = %err, "cpr-exec failed; the guest carries on with this binary");
        crate::notify::ready(&format!("running; live update failed: {err}"));
        self.update_status = UpdateStatus::Failed(err.to_string());
        self.update_undone = err.undone();
        self.metrics.record(UpdateOutcome::Failed, None);
        report.downtime = std::time::Duration::ZERO;
        let result = Err(err);
        self.finish_report(report, clock, &result);
        match result {
            Err(e) => e,
            Ok(()) => CprError::Vm(VmError::Internal("a failed update reported success")),
        }
    }

    /// Sets the migration mode and, for cpr-exec, the new binary's command line (which must make it
    /// incoming).
    pub fn set_mode(
        &mut self,
        mode: cpr_common::MigrationMode,
        exec_args: Vec<String>,
    ) -> Result<(cpr_common::MigrationMode, Vec<String>), CprError> {
        if !exec_args.is_empty() {
            if process::incoming_arg(&exec_args).is_none() {
                return Err(process::CprExecError::NotIncoming.into());
            }
            self.exec_args = exec_args;
        }
        self.mode = mode;
        Ok((self.mode, self.exec_args.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step's undo that records itself, and fails when told to.
    struct Recorded(&'static str, bool);

    impl Compensate<Vec<&'static str>> for Recorded {
        fn run(self, log: &mut Vec<&'static str>) -> Result<(), CprError> {
            log.push(self.0);
            match self.1 {
                true => Err(CprError::BridgeSetup(self.0.to_string())),
                false => Ok(()),
            }
        }
    }

    #[test]
    fn compensations_run_last_first() {
        let mut c = Compensations::default();
        for step in ["pause", "invalidate", "console"] {
            c.push(Recorded(step, false));
        }
        let mut log = Vec::new();
        assert!(c.unwind(&mut log).is_none());
        assert_eq!(log, ["console", "invalidate", "pause"]);
    }

    #[test]
    fn a_failing_compensation_does_not_stop_the_others_and_is_reported() {
        let mut c = Compensations::default();
        c.push(Recorded("pause", false));
        c.push(Recorded("invalidate", true));
        c.push(Recorded("console", true));
        let mut log = Vec::new();
        let err = c.unwind(&mut log).expect("a compensation failed");
        assert_eq!(log, ["console", "invalidate", "pause"]);
        // The first to fail (the last step's) is the one reported.
        assert!(err.to_string().contains("console"), "{err}");
    }

    #[test]
    fn nothing_done_nothing_undone() {
        let mut log = Vec::new();
        assert!(Compensations::<Recorded>::default()
            .unwind(&mut log)
            .is_none());
        assert!(log.is_empty());
    }
}
