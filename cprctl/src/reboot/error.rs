//! Why a reboot workflow did not complete.

use std::path::PathBuf;

use crate::workflow::{ProbeError, SessionError};

/// Why a reboot workflow did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RebootError {
    /// vmmd could not be reached, or did not answer a request of the workflow.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The guest is in a runstate reboot-prep cannot start from.
    #[error("vmmd is {run_state}: reboot-prep needs a running, paused or suspended guest")]
    NotPreparable {
        /// The runstate.
        run_state: &'static str,
    },
    /// vmmd reports cpr-reboot blockers.
    #[error("cpr-reboot is blocked: {}", blockers.join("; "))]
    Blocked {
        /// vmmd's blockers.
        blockers: Vec<String>,
    },
    /// The RAM file vmmd reports is not there.
    #[error("guest RAM file {}: {source}; the guest's RAM must be in a file that survives the reboot", path.display())]
    RamFile {
        /// The RAM file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The state file cannot be written.
    #[error("cannot write the state file {}: {detail}; create the directory or pick a writable --state/--state-dir", path.display())]
    StateNotWritable {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A marker of an earlier, unresumed prep is in the way.
    #[error("{} is there from an earlier reboot-prep that was not resumed: run reboot-resume for it, or remove it (and {}) if that guest is gone", marker.display(), state.display())]
    MarkerExists {
        /// The marker.
        marker: PathBuf,
        /// Its state file.
        state: PathBuf,
    },
    /// There is no way to ask the guest to suspend.
    #[error("cannot ask the guest to suspend: its serial console is {serial:?}, not `socket=PATH`; give --suspend-command CMD (e.g. a guest-agent call) instead")]
    NoSuspendChannel {
        /// The serial backend.
        serial: String,
    },
    /// The console could not be used to ask the guest to suspend.
    #[error("cannot ask the guest to suspend on console {}: {detail}", path.display())]
    Console {
        /// The console socket.
        path: PathBuf,
        /// What happened.
        detail: String,
    },
    /// The suspend command failed.
    #[error("suspend command `{command}` failed: {detail}")]
    SuspendCommand {
        /// The command.
        command: String,
        /// What happened.
        detail: String,
    },
    /// The guest did not suspend in time.
    #[error("the guest did not reach `suspended` within {secs}s (it is {run_state}); does it honour the suspend request? raise --suspend-timeout or prep without --suspend")]
    SuspendTimeout {
        /// The timeout.
        secs: u64,
        /// The runstate seen last.
        run_state: &'static str,
    },
    /// vmmd could not save the state.
    #[error("vmmd could not save the state to {}: {message}", path.display())]
    SaveFailed {
        /// The state file.
        path: PathBuf,
        /// vmmd's message.
        message: String,
    },
    /// The marker or env file could not be written, read or retired.
    #[error("{op} {}: {source}", path.display())]
    MarkerIo {
        /// What was done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A test hook failed a step on purpose.
    #[error("injected failure before step {0} (test hook)")]
    Injected(&'static str),
    /// vmmd did not exit after Quit.
    #[error("vmmd (pid {pid}) did not exit within {secs}s of Quit; the state is saved and the guest is stopped: kill it (SIGKILL) before the reboot")]
    QuitTimeout {
        /// vmmd's pid.
        pid: u32,
        /// The timeout.
        secs: u64,
    },
    /// No marker for this state file.
    #[error("no reboot marker {}: {source}; was `cprctl reboot-prep` run for this VM with this --state?", path.display())]
    MarkerMissing {
        /// The marker.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The marker cannot be parsed.
    #[error("reboot marker {} is not valid: {detail}", path.display())]
    MarkerInvalid {
        /// The marker.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The state file is missing or unreadable.
    #[error("state file {}: {detail}; it is written by reboot-prep and must survive the reboot", path.display())]
    StateFile {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The state file's header does not decode.
    #[error("{source}; it is written by reboot-prep and must survive the reboot")]
    StateHeader {
        /// The decoder's error (it names the file).
        #[source]
        source: cpr_common::state::StateFileError,
    },
    /// vmmd is not waiting for an incoming migration.
    #[error("vmmd is {run_state}, not inmigrate: start it with the VM's configuration and `--incoming defer` (the vmmd@ unit adds it while {} exists)", env.display())]
    NotIncoming {
        /// The runstate.
        run_state: &'static str,
        /// The env file the unit reads.
        env: PathBuf,
    },
    /// The waiting vmmd does not run the saved VM's configuration.
    #[error("the waiting vmmd does not match the saved guest: {0}; restart it with the VM's configuration and `--incoming defer`")]
    ConfigMismatch(String),
    /// The waiting vmmd's binary cannot read the state.
    #[error("vmmd {} cannot read state format version {version} of {} ({answer}); start a vmmd build that reads it and retry", executable.display(), state.display())]
    StateVersionRefused {
        /// The waiting vmmd's binary.
        executable: PathBuf,
        /// The state file.
        state: PathBuf,
        /// The state file's format version.
        version: u32,
        /// What the binary printed.
        answer: String,
    },
    /// The binary could not be asked.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// vmmd could not load the state.
    #[error("vmmd could not load {}: {message}", path.display())]
    LoadFailed {
        /// The state file.
        path: PathBuf,
        /// vmmd's message.
        message: String,
    },
    /// The guest is not in the runstate it had before the prep.
    #[error("after the load the guest is {run_state}, expected {expected}")]
    NotResumed {
        /// The runstate.
        run_state: &'static str,
        /// What it should be.
        expected: String,
    },
    /// `--all`: the socket directory cannot be listed.
    #[error("cannot list the vmmd sockets in {}: {source}; give --socket-dir", dir.display())]
    Discover {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `--all`: a marker without a vmmd.
    #[error("a guest was saved for {name} ({}) but no vmmd serves {}: start vmmd@{name} (it comes up with --incoming defer)", marker.display(), socket.display())]
    NoVmmd {
        /// The VM's name.
        name: String,
        /// Its marker.
        marker: PathBuf,
        /// The socket expected.
        socket: PathBuf,
    },
    /// The workflow task died.
    #[error("internal: the workflow task for {name} failed: {detail}")]
    Task {
        /// The VM.
        name: String,
        /// What happened.
        detail: String,
    },
}
