//! Why a live update (cpr-exec) failed, and what was undone.

use cpr_common::state::StateFileError;

use super::bridge::BridgeError;
use super::exec::process::CprExecError;
use crate::state::handover::{HandoverError, UndoneStep};
use crate::vfio::dma::DmaStepError;
use crate::vm::VmError;

impl CprError {
    /// The compensations vmmd ran itself that this failure reports (for `Info.update_undone`).
    pub fn undone(&self) -> Vec<UndoneStep> {
        match self {
            CprError::VfioDma { step, source } => vec![UndoneStep::vfio_dma(step, source)],
            _ => Vec::new(),
        }
    }
}

/// Why a cpr-exec step failed. Before `execve` succeeds, every step's compensation has run when this
/// is returned and the guest runs on this binary.
#[derive(Debug, thiserror::Error)]
pub enum CprError {
    /// A VM operation (pause, save) failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The state file cannot be created or written.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The new binary, its arguments, the fds or the exec.
    #[error(transparent)]
    Exec(#[from] CprExecError),
    /// Taking the guest over from the cpr-exec bridge failed.
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    /// The cpr-exec bridge could not be set up; nothing was handed over.
    #[error("cannot set up the cpr-exec bridge: {0}; the guest runs on this binary (or update with --cpr-exec-bridge false)")]
    BridgeSetup(String),
    /// The hand-over cannot be written or read.
    #[error(transparent)]
    Handover(#[from] HandoverError),
    /// cpr-exec is blocked by the configuration.
    #[error("cpr-exec is blocked: {0}")]
    Blocked(String),
    /// A VFIO DMA step of a live update failed (and was undone as far as the message says).
    #[error("VFIO DMA {step}: {source}")]
    VfioDma {
        /// Which step.
        step: &'static str,
        /// The failed call and its compensation.
        #[source]
        source: DmaStepError,
    },
    /// This process was not started by cpr-exec, or is itself a rollback: there is nothing to roll
    /// back to.
    #[error("no previous binary to roll back to")]
    NoRollbackTarget,
}
