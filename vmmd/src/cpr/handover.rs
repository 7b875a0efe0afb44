//! The one hand-over builder: what every exec (classic, bridged) hands the next process, and the
//! exec that carries it.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use tracing::info;

use super::exec::process::{self, PreservedFds};
use super::CprError;
use crate::state::handover::{fd_names, CprHandover};
use crate::sys::fd::monotonic_ns;
use crate::vm::{Vm, VERSION};

/// A [`CprHandover`] under construction.
pub(crate) struct HandoverBuilder(CprHandover);

impl Vm {
    /// The hand-over both exec paths start from: guest RAM, the running binary (for a rollback), the
    /// API listener, the rollback command line, this version and the next generation.
    pub(crate) fn handover(
        &self,
        state_path: &Path,
        paused_at_ns: u64,
        previous: &OwnedFd,
    ) -> HandoverBuilder {
        let mut fds = vec![
            (fd_names::RAM.to_string(), self.ram.raw_fd()),
            (fd_names::PREVIOUS_BINARY.to_string(), previous.as_raw_fd()),
        ];
        if let Some(fd) = self.api_listener_fd {
            fds.push((fd_names::API_LISTENER.to_string(), fd));
        }
        let argv: Vec<String> = std::env::args().collect();
        HandoverBuilder(CprHandover {
            fds,
            state_path: state_path.to_path_buf(),
            paused_at_ns,
            exec_at_ns: 0,
            phases: Vec::new(),
            rollback_argv: process::with_incoming_file(&argv, state_path),
            console_pty_path: self
                .console
                .as_ref()
                .and_then(|c| c.pty_path().map(Into::into)),
            from_version: VERSION.to_string(),
            generation: self.generation + 1,
            rollback_reason: None,
            address_space_keeper: None,
            vfio_model_containers: Vec::new(),
            update_metrics: self.metrics.counters().clone(),
            rollback_undone: Vec::new(),
            legacy: None,
        })
    }

    /// Writes `handover` to a memfd, lets its fds survive the exec, and execs the new binary.
    /// Returns only on failure, with the fds back to close-on-exec.
    pub(crate) fn exec_with_handover(&self, handover: &CprHandover, what: &str) -> CprError {
        let memfd = match handover.to_memfd() {
            Ok(m) => m,
            Err(e) => return e.into(),
        };
        let mut fds = handover.fds.clone();
        fds.push(("cpr-handover".into(), memfd.as_raw_fd()));
        let mut preserved = PreservedFds::new(fds);
        if let Err(e) = preserved.clear_cloexec() {
            return e.into();
        }
        info!(binary = %self.exec_args[0], generation = handover.generation, "{what}");
        crate::notify::reloading(&format!("live update: exec {}", self.exec_args[0]));
        let err = process::exec(&self.exec_args, None, memfd.as_raw_fd());
        preserved.restore_cloexec();
        err.into()
    }
}

impl HandoverBuilder {
    /// Adds named fds.
    pub(crate) fn fds(mut self, fds: impl IntoIterator<Item = (String, RawFd)>) -> Self {
        self.0.fds.extend(fds);
        self
    }

    /// The phases the old process timed inside the pause.
    pub(crate) fn phases(mut self, phases: &[(String, Duration)]) -> Self {
        self.0.phases = phases
            .iter()
            .map(|(n, d)| (n.clone(), d.as_micros() as u64))
            .collect();
        self
    }

    /// The console's pty path (a pty console stops before the classic exec).
    pub(crate) fn console_pty(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.0.console_pty_path = path;
        self
    }

    /// The pid of the address-space keeper the next process reaps.
    pub(crate) fn keeper(mut self, pid: Option<libc::pid_t>) -> Self {
        self.0.address_space_keeper = pid;
        self
    }

    /// The VFIO model's container ids (test hook).
    pub(crate) fn vfio_model_containers(mut self, ids: Vec<u32>) -> Self {
        self.0.vfio_model_containers = ids;
        self
    }

    /// The hand-over, stamped with the exec time.
    pub(crate) fn build(self) -> CprHandover {
        CprHandover {
            exec_at_ns: monotonic_ns(),
            ..self.0
        }
    }
}
