//! Moving the guest out of this process and back in: normal save/restore (RAM in the state file),
//! cpr-reboot (RAM stays in its file across a host reboot), and the dispatch of cpr-exec to
//! `crate::cpr`. One entry point each way: [`Vm::migrate`] and [`Vm::migrate_incoming`].

pub mod error;
mod load;
mod reboot;
mod save;

use cpr_common::{MigrationMode, MigrationUri};

pub use error::MigrationError;

use crate::vm::{runstate, MigrationReport, PhaseClock, RunEvent, Vm};

/// Guest RAM moved per read or write of the state file.
const RAM_CHUNK: usize = 8 << 20;
/// A progress event every this many bytes.
const PROGRESS_EVERY: u64 = 64 << 20;
/// Guest RAM populated per step after a load (see `GuestRam::populate_in_background`).
pub(crate) const POPULATE_CHUNK: usize = 32 << 20;
/// Guest RAM unmapped per step before the guest leaves (see `GuestRam::drop_host_mappings`).
pub(crate) const UNMAP_CHUNK: usize = 16 << 20;

impl Vm {
    /// Saves the VM to `uri` in the current mode. Normal and cpr-reboot end in `postmigrate`;
    /// cpr-exec returns only when the update failed before `execve`. On failure the guest runs on in
    /// the runstate it had.
    pub fn migrate(&mut self, uri: &str) -> Result<MigrationReport, MigrationError> {
        let target: MigrationUri = uri.parse()?;
        runstate::step(self.run_state, RunEvent::Migrate).map_err(crate::vm::VmError::from)?;
        let Some(saved) = self.run_state.saved() else {
            return Err(
                crate::vm::VmError::Internal("the runstate table let a migrate through").into(),
            );
        };
        let MigrationUri::File(path) = target;
        match self.mode {
            MigrationMode::Normal => self.save_and_stop(uri, &path, saved),
            MigrationMode::CprExec => Ok(self.cpr_exec(uri, &path, saved)?),
            MigrationMode::CprReboot => self.cpr_reboot(uri, &path, saved),
        }
    }

    /// Loads the VM from `uri`. Only from `inmigrate`; every check on the file is done before any
    /// vCPU or device state is set, and on failure the VM stays `inmigrate` for another try.
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<MigrationReport, MigrationError> {
        let source: MigrationUri = uri.parse()?;
        runstate::step(self.run_state, RunEvent::MigrateIncoming)
            .map_err(crate::vm::VmError::from)?;
        let MigrationUri::File(path) = source;
        let mut report = self.start_report(uri, true);
        let mut clock = PhaseClock::new();
        let result = self.load_from(&path, &mut clock, &mut report);
        let report = self.finish_report(report, clock, &result);
        result.map(|()| report)
    }
}

/// # Safety
/// `ptr..ptr+len` must be a live mapping nobody writes while the slice exists.
unsafe fn guest_bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// # Safety
/// `ptr..ptr+len` must be a live mapping nobody else reads or writes while the slice exists.
unsafe fn guest_bytes_mut<'a>(ptr: *mut u8, len: usize) -> &'a mut [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts_mut(ptr, len) }
}
