//! Why `cprctl update` did not complete.

use std::path::PathBuf;
use std::time::Duration;

use crate::workflow::{Guest, Outcome, ProbeError, SessionError};

/// Why the update did not complete.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// vmmd could not be reached, or did not answer a request of the workflow.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The VM is in a state an update cannot start from.
    #[error(
        "vmmd is {run_state}: an update needs a running, paused or suspended guest; nothing was changed"
    )]
    NotUpdatable {
        /// The runstate.
        run_state: &'static str,
    },
    /// vmmd reports cpr-exec blockers.
    #[error("cpr-exec is blocked: {}; remove the blockers (see `cprctl status`) and retry; nothing was changed", blockers.join("; "))]
    Blocked {
        /// vmmd's blockers.
        blockers: Vec<String>,
    },
    /// NEW does not exist or cannot be inspected.
    #[error("new binary {}: {source}; give --binary the path of a vmmd build; nothing was changed", path.display())]
    BinaryMissing {
        /// NEW.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// NEW is not an executable regular file.
    #[error("new binary {} is not an executable regular file: chmod +x it or pick another; nothing was changed", path.display())]
    NotExecutable {
        /// NEW.
        path: PathBuf,
    },
    /// NEW could not be run to ask it something.
    #[error("{source}; check that it is a working vmmd build; nothing was changed")]
    Probe {
        /// What went wrong.
        #[source]
        source: ProbeError,
    },
    /// NEW says it cannot read the running vmmd's state format.
    #[error("new binary {} cannot read state format version {version} that the running vmmd writes ({answer}); use a build that reads it; nothing was changed", path.display())]
    StateVersionRefused {
        /// NEW.
        path: PathBuf,
        /// The running vmmd's format version.
        version: u32,
        /// What NEW printed.
        answer: String,
    },
    /// vmmd refused the update before pausing the guest.
    #[error("vmmd refused the update: {message} ({code}); nothing was paused, fix that and retry")]
    Refused {
        /// gRPC code name.
        code: &'static str,
        /// vmmd's message.
        message: String,
    },
    /// The update failed inside vmmd before the new binary took over.
    #[error("the update failed before the new binary took over: {reason}; vmmd resumed the guest on the old binary")]
    FailedBeforeExec {
        /// vmmd's `update_detail`: the error.
        reason: String,
    },
    /// The new binary took over but could not carry the guest; vmmd went back to the old binary.
    #[error("the new binary could not take the guest over and vmmd rolled back to the previous binary: {reason}")]
    RolledBack {
        /// vmmd's `update_detail`: why.
        reason: String,
    },
    /// Nobody answered on the API socket after the exec.
    #[error("vmmd did not answer within {}s after the exec (last: {last}); check the vmmd log and `cprctl status`", timeout.as_secs())]
    NoAnswer {
        /// How long cprctl waited.
        timeout: Duration,
        /// The last error or status seen.
        last: String,
    },
    /// The update ran but the result is not what was asked for.
    #[error("the update ran but verification failed: {0}")]
    Verify(String),
}

impl From<ProbeError> for UpdateError {
    fn from(source: ProbeError) -> Self {
        UpdateError::Probe { source }
    }
}

impl UpdateError {
    /// The report's outcome for this error, with the guest where it is.
    pub fn outcome(&self, guest: Guest) -> Outcome {
        match self {
            UpdateError::Refused { .. }
            | UpdateError::NotUpdatable { .. }
            | UpdateError::Blocked { .. }
            | UpdateError::BinaryMissing { .. }
            | UpdateError::NotExecutable { .. }
            | UpdateError::Probe { .. }
            | UpdateError::StateVersionRefused { .. } => Outcome::Refused(guest),
            UpdateError::FailedBeforeExec { .. } => Outcome::Failed(guest),
            UpdateError::RolledBack { .. } => Outcome::RolledBack(guest),
            UpdateError::Verify(_) => Outcome::Unverified(guest),
            UpdateError::Session(_) | UpdateError::NoAnswer { .. } => Outcome::Unknown(guest),
        }
    }

    /// vmmd's own account of a failure it undid (its `update_detail`), when there is one.
    pub fn vmmd_reason(&self) -> Option<&str> {
        match self {
            UpdateError::FailedBeforeExec { reason } | UpdateError::RolledBack { reason } => {
                Some(reason)
            }
            _ => None,
        }
    }
}
