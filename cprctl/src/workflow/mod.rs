//! The one workflow engine of cprctl's typed workflows (`update`, `reboot-prep`,
//! `reboot-resume`, each also with `--all` where it exists):
//!
//! - [`engine`]: steps run in order, compensations on a stack, undone in reverse on failure;
//! - [`session`]: the connection to vmmd (connect, Info, timeouts) every workflow uses;
//! - [`error`]: the error core the workflows' errors wrap;
//! - [`fleet`]: one workflow for every vmmd of a socket directory (`--all`), `--jobs` at a time;
//! - [`outcome`]: how a workflow ended, and its exit status;
//! - [`progress`]: the step records of a report and the progress events;
//! - [`probe`]: asking a vmmd binary something.

pub mod engine;
pub mod error;
pub mod fleet;
pub mod outcome;
pub mod probe;
pub mod progress;
pub mod session;

use vmmd_proto::v1::Phase;

use crate::output::PhaseView;

pub use engine::{Compensating, Engine, Failed, Step, StepOk, Undo, Workflow};
pub use error::SessionError;
pub use outcome::{Guest, Outcome};
pub use probe::{probe, ProbeAnswer, ProbeError, PROBE_TIMEOUT};
pub use progress::{
    eprint_json, micros, render_steps, NoProgress, Progress, ProgressEvent, StderrProgress,
    StepLog, StepRecord, StepStatus,
};
pub use session::Session;

/// vmmd's migration phases as reports show them.
pub fn phase_views(phases: &[Phase]) -> Vec<PhaseView> {
    phases
        .iter()
        .map(|p| PhaseView {
            name: p.name.clone(),
            micros: p.micros,
        })
        .collect()
}
