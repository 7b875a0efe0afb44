//! Why a save or a load failed.

use std::path::PathBuf;

use cpr_common::state::StateFileError;
use cpr_common::{MigrationMode, UriError};

use crate::cpr::CprError;
use crate::state::handover::UndoneStep;
use crate::vfio::dma::DmaStepError;
use crate::vm::VmError;

impl MigrationError {
    /// The compensations vmmd ran itself that this failure reports (for `Info.update_undone`).
    pub fn undone(&self) -> Vec<UndoneStep> {
        match self {
            MigrationError::Cpr(e) => e.undone(),
            MigrationError::VfioDma { step, source } => vec![UndoneStep::vfio_dma(step, source)],
            _ => Vec::new(),
        }
    }
}

/// Why a migration (save, load, cpr-reboot, or cpr-exec through [`CprError`]) failed. On a save the
/// guest runs on in the runstate it had; on a load the VM stays `inmigrate` for another try.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The live update failed.
    #[error(transparent)]
    Cpr(#[from] CprError),
    /// A bad migration URI.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// The state file cannot be written or read.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The state file is for a different VM shape.
    #[error("state file {path} does not fit this VM: {detail}")]
    Incompatible {
        /// The file.
        path: PathBuf,
        /// What differs and what to do.
        detail: String,
    },
    /// The mode is blocked by the configuration.
    #[error("{mode} is blocked: {blocker}")]
    Blocked {
        /// The mode.
        mode: MigrationMode,
        /// What blocks it and what to configure.
        blocker: String,
    },
    /// Injected by a test (`--fault-inject`).
    #[error("injected fault: {0}")]
    Injected(&'static str),
    /// Re-establishing the VFIO DMA host addresses after a cpr-exec load failed.
    #[error("VFIO DMA {step}: {source}")]
    VfioDma {
        /// Which step.
        step: &'static str,
        /// The failed call and its compensation.
        #[source]
        source: DmaStepError,
    },
}
