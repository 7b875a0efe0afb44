//! What `cprctl update` reports.

use std::fmt::Write as _;

use serde::Serialize;

use super::UpdateError;
use crate::output::{format_micros, PhaseView, Render};
use crate::workflow::{render_steps, Outcome, StepRecord};

/// What the update did and measured.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateReport {
    /// true when the update is verified.
    pub ok: bool,
    /// `updated`, `refused` (nothing changed), `failed` (failed before the exec; guest resumed),
    /// `rolled-back` (the new binary took over and failed; vmmd went back) or `unknown`.
    pub outcome: Outcome,
    /// The error, when not ok.
    pub error: Option<String>,
    /// The new binary as given.
    pub binary: String,
    /// The state file.
    pub state_path: String,
    /// `at-start` or `deferred`.
    pub load: &'static str,
    /// vmmd's pid before the update.
    pub pid: u32,
    /// vmmd's pid afterwards, as Info reports it.
    pub pid_after: Option<u32>,
    /// Version before.
    pub old_version: String,
    /// Version running afterwards.
    pub new_version: Option<String>,
    /// What `NEW --version` printed.
    pub expected_version: Option<String>,
    /// Executable before.
    pub old_executable: String,
    /// Executable afterwards.
    pub new_executable: Option<String>,
    /// Update generation before.
    pub generation_before: u64,
    /// Update generation afterwards.
    pub generation_after: Option<u64>,
    /// Runstate before.
    pub run_state_before: &'static str,
    /// Runstate afterwards.
    pub run_state_after: Option<&'static str>,
    /// Whether the guest is running afterwards (checked, whatever the outcome).
    pub guest_running: Option<bool>,
    /// vmmd's update status afterwards.
    pub update_status: Option<String>,
    /// The pause vmmd measured (pause in the old process to resume in the new one), microseconds.
    pub vmmd_pause_micros: Option<u64>,
    /// vmmd's phases (pause, save-state, exec, startup, load-state, restore, resume).
    pub phases: Vec<PhaseView>,
    /// The workflow's steps as they went.
    pub steps: Vec<StepRecord>,
    /// Start of the workflow to the end of verify (or of the failure handling), microseconds.
    pub total_micros: u64,
}

impl Render for UpdateReport {
    fn human(&self) -> String {
        let mut s = String::new();
        match self.outcome {
            Outcome::Updated => {
                let _ = writeln!(
                    s,
                    "updated vmmd {} -> {} in place (pid {}, generation {} -> {})",
                    self.old_version,
                    self.new_version.as_deref().unwrap_or("?"),
                    self.pid,
                    self.generation_before,
                    self.generation_after.unwrap_or(0)
                );
            }
            outcome => {
                let _ = writeln!(
                    s,
                    "update {}: {}",
                    outcome.name(),
                    self.error.as_deref().unwrap_or("")
                );
            }
        }
        if let Some(pause) = self.vmmd_pause_micros {
            let _ = writeln!(s, "guest paused (vmmd):  {}", format_micros(pause));
        }
        if !self.phases.is_empty() {
            let _ = writeln!(s, "phases:");
            let width = self.phases.iter().map(|p| p.name.len()).max().unwrap_or(0);
            for p in &self.phases {
                let _ = writeln!(s, "  {:width$}  {}", p.name, format_micros(p.micros));
            }
        }
        let _ = writeln!(s, "steps:");
        render_steps(&mut s, &self.steps);
        let _ = writeln!(
            s,
            "update total:         {}",
            format_micros(self.total_micros)
        );
        let _ = writeln!(s, "new binary:           {}", self.binary);
        if let Some(exe) = &self.new_executable {
            let _ = writeln!(s, "running executable:   {exe}");
        }
        let _ = writeln!(s, "state file:           {}", self.state_path);
        match (self.run_state_after, self.guest_running) {
            (Some(state), Some(true)) => {
                let _ = writeln!(
                    s,
                    "guest:                {state} (vmmd pid {})",
                    self.pid_after.unwrap_or(self.pid)
                );
            }
            (Some(state), _) => {
                let _ = writeln!(
                    s,
                    "guest:                {state} (was {})",
                    self.run_state_before
                );
            }
            (None, _) => {
                let _ = writeln!(s, "guest:                unknown: vmmd did not answer; check `cprctl status` and the vmmd log");
            }
        }
        if let Some(status) = &self.update_status {
            let _ = writeln!(s, "vmmd update status:   {status}");
        }
        s
    }
}

/// A failed update: the error and the report (which says whether the guest is running).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct UpdateFailure {
    /// What went wrong.
    #[source]
    pub error: UpdateError,
    /// What was done and the guest's state afterwards.
    pub report: Box<UpdateReport>,
}

impl UpdateFailure {
    /// Whether the guest is back in the runstate it had before the update.
    pub fn guest_as_before(&self) -> bool {
        self.report.run_state_after == Some(self.report.run_state_before)
    }

    /// How the update ended (carries the exit status).
    pub fn outcome(&self) -> Outcome {
        self.report.outcome
    }
}
