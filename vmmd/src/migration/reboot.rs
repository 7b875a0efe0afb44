//! cpr-reboot: guest RAM stays in its file (shared memory, hugetlbfs, DAX) across a host reboot; the
//! state without RAM is fsync'd next to it, and a vmmd started after the reboot loads both.

use std::path::Path;
use std::time::Duration;

use cpr_common::state::{write_state_without_ram, StateFileError};
use cpr_common::MigrationMode;
use tracing::warn;

use super::{MigrationError, UNMAP_CHUNK};
use crate::console::ConsoleState;
use crate::state::SavedRunState;
use crate::vm::{MigrationReport, PhaseClock, Vm};

impl Vm {
    /// cpr-reboot: pause, flush guest RAM to its file, save state without RAM (fsync) and stop in
    /// `postmigrate`; a vmmd started after the host reboot maps the same RAM file and loads the state.
    /// On failure the guest runs on.
    pub(crate) fn cpr_reboot(
        &mut self,
        uri: &str,
        path: &Path,
        saved: SavedRunState,
    ) -> Result<MigrationReport, MigrationError> {
        if let Some(blocker) = self.cpr_reboot_blockers().into_iter().next() {
            return Err(MigrationError::Blocked {
                mode: MigrationMode::CprReboot,
                blocker,
            });
        }
        // As for cpr-exec: unmap the guest RAM the guest touched while it still runs, so that
        // tearing down this process's page tables does not lengthen the stop.
        if let Err(e) = self
            .ram
            .drop_host_mappings(UNMAP_CHUNK, Duration::from_micros(500))
        {
            warn!(error = %e, "cannot drop guest RAM mappings before the save");
        }
        self.save_and_stop(uri, path, saved)
    }

    /// The cpr-reboot save, vCPUs paused: guest RAM flushed to its file, then the state without RAM
    /// (fsync'd: it must survive the reboot).
    pub(super) fn save_for_reboot(
        &self,
        path: &Path,
        saved: SavedRunState,
        clock: &mut PhaseClock,
        report: &mut MigrationReport,
    ) -> Result<(), MigrationError> {
        let meta = self.encode_state(saved, ConsoleState::default(), report)?;
        clock.lap("save-state");
        self.ram.sync().map_err(|source| {
            MigrationError::StateFile(StateFileError::Io {
                path: self.ram.path().map(|p| p.to_path_buf()).unwrap_or_default(),
                op: "fsync guest RAM",
                source,
            })
        })?;
        clock.lap("sync-ram");
        write_state_without_ram(path, &meta, true)?;
        clock.lap("sync");
        Ok(())
    }
}
