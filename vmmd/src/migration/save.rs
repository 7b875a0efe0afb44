//! Normal-mode save: pause, write vCPU/VM/device state and all of guest RAM, stop in `postmigrate`.

use std::path::Path;
use std::time::Instant;

use cpr_common::state::StateWriter;
use cpr_common::MigrationMode;
use tracing::warn;

use super::{guest_bytes, MigrationError, PROGRESS_EVERY, RAM_CHUNK};
use crate::console::ConsoleState;
use crate::state::SavedRunState;
use crate::vm::{runstate, MigrationReport, MigrationStatus, PhaseClock, RunEvent, Step, Vm};

impl Vm {
    /// Normal and cpr-reboot saves: pause, save in the current mode, stop in `postmigrate`. On
    /// failure the guest runs on in the runstate it had.
    pub(crate) fn save_and_stop(
        &mut self,
        uri: &str,
        path: &Path,
        saved: SavedRunState,
    ) -> Result<MigrationReport, MigrationError> {
        let mut report = self.start_report(uri, false);
        let mut clock = PhaseClock::new();
        self.report_progress(MigrationStatus::Active, "pause", 0, 0, false);
        let was_running = saved == SavedRunState::Running;
        let result = (|| {
            if was_running {
                self.pause_vcpus()?;
            }
            clock.lap("pause");
            let paused_at = Instant::now();
            let r = match self.mode {
                MigrationMode::CprReboot => {
                    self.save_for_reboot(path, saved, &mut clock, &mut report)
                }
                _ => self.save_to(path, saved, &mut clock, &mut report),
            };
            report.downtime = paused_at.elapsed() + clock.phases[0].1;
            r
        })();
        match &result {
            Ok(()) => {
                self.saved_from = Some(saved);
                let reason = match self.mode {
                    MigrationMode::CprReboot => "cpr-reboot state saved",
                    _ => "migration completed",
                };
                if let Ok(Step::To(next)) = runstate::step(self.run_state, RunEvent::Saved) {
                    self.set_run_state(next, reason);
                }
            }
            Err(e) => {
                warn!(error = %e, mode = %self.mode, "save failed; the guest carries on here");
                if was_running {
                    self.vcpus.control.resume();
                }
            }
        }
        let report = self.finish_report(report, clock, &result);
        result.map(|()| report)
    }

    pub(super) fn save_to(
        &self,
        path: &Path,
        run_state: SavedRunState,
        clock: &mut PhaseClock,
        report: &mut MigrationReport,
    ) -> Result<(), MigrationError> {
        let meta = self.encode_state(run_state, ConsoleState::default(), report)?;
        clock.lap("save-state");
        let total = self.ram.size();
        let mut writer = StateWriter::create(path, &meta, total)?;
        let mut done = 0u64;
        for (_, host, len) in self.ram.host_slices() {
            for off in (0..len).step_by(RAM_CHUNK) {
                let n = RAM_CHUNK.min(len - off);
                // SAFETY: `host..host+len` is a live mapping owned by `self.ram`, and every vCPU is
                // parked, so nothing writes guest RAM while this slice exists.
                let chunk = unsafe { guest_bytes(host.add(off), n) };
                writer.write_ram(chunk)?;
                done += n as u64;
                if done.is_multiple_of(PROGRESS_EVERY) {
                    self.report_progress(MigrationStatus::Active, "save-ram", done, total, false);
                }
            }
        }
        report.ram_bytes = done;
        clock.lap("save-ram");
        writer.finish()?;
        clock.lap("sync");
        Ok(())
    }
}
