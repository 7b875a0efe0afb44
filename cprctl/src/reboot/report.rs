//! What `reboot-prep` and `reboot-resume` report, for one VM and for `--all`.

use std::fmt::Write as _;

use serde::{Serialize, Serializer};

use super::Target;
use crate::output::{format_micros, PhaseView, Render};
use crate::workflow::{render_steps, Guest, Outcome, StepRecord};

/// Which reboot workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootWorkflow {
    /// `reboot-prep`.
    Prep,
    /// `reboot-resume`.
    Resume,
}

impl RebootWorkflow {
    /// The command's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Prep => "reboot-prep",
            Self::Resume => "reboot-resume",
        }
    }
}

impl Serialize for RebootWorkflow {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl std::fmt::Display for RebootWorkflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What one VM's reboot-prep or reboot-resume did.
#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    /// `reboot-prep` or `reboot-resume`.
    pub workflow: RebootWorkflow,
    /// The VM's name.
    pub name: String,
    /// true when the workflow completed.
    pub ok: bool,
    /// prep: `prepared`, `refused` (nothing changed), `rolled-back` (guest back as before),
    /// `failed` (see error; guest not as before). resume: `resumed`, `refused` (nothing changed,
    /// retry after fixing), `failed`, `skipped` (`--all`: no marker for this vmmd).
    pub outcome: Outcome,
    /// The error, when not ok.
    pub error: Option<String>,
    /// vmmd's API socket.
    pub socket: String,
    /// The state file.
    pub state_path: String,
    /// The marker file.
    pub marker_path: String,
    /// vmmd's pid.
    pub pid: Option<u32>,
    /// vmmd's version.
    pub version: Option<String>,
    /// State-file format version.
    pub state_format_version: Option<u32>,
    /// Runstate when the workflow started.
    pub run_state_before: Option<&'static str>,
    /// Runstate at the end (`null` when vmmd is gone, e.g. after a completed prep).
    pub run_state_after: Option<&'static str>,
    /// Whether the guest is running at the end.
    pub guest_running: Option<bool>,
    /// prep: whether the guest was suspended by the workflow (and is still, or was woken on rollback).
    pub suspended: bool,
    /// The time vmmd had the vCPUs stopped while saving (prep) or the load took (resume), microseconds.
    pub vmmd_micros: Option<u64>,
    /// vmmd's phases.
    pub phases: Vec<PhaseView>,
    /// resume: from the end of the save before the reboot to the guest running again (unix clocks),
    /// i.e. the guest-visible blackout including the reboot.
    pub guest_stopped_micros: Option<u64>,
    /// The steps as they went.
    pub steps: Vec<StepRecord>,
    /// Start to end of the workflow, microseconds.
    pub total_micros: u64,
}

impl VmReport {
    /// A report of `workflow` for `target` that has not got anywhere yet.
    pub(super) fn new(workflow: RebootWorkflow, target: &Target) -> Self {
        Self {
            workflow,
            name: target.name.clone(),
            ok: false,
            outcome: Outcome::Failed(Guest::NotRestored),
            error: None,
            socket: target.socket.display().to_string(),
            state_path: target.state.display().to_string(),
            marker_path: target.marker().display().to_string(),
            pid: None,
            version: None,
            state_format_version: None,
            run_state_before: None,
            run_state_after: None,
            guest_running: None,
            suspended: false,
            vmmd_micros: None,
            phases: Vec::new(),
            guest_stopped_micros: None,
            steps: Vec::new(),
            total_micros: 0,
        }
    }

    /// Whether the guest is as it was before the workflow (refused or rolled back).
    pub fn guest_as_before(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Refused(_) | Outcome::RolledBack(_) | Outcome::Skipped
        )
    }

    fn human_into(&self, s: &mut String) {
        let headline = match (self.workflow, self.outcome) {
            (RebootWorkflow::Prep, Outcome::Prepared) => format!(
                "{}: prepared: state saved to {}, vmmd stopped; after the reboot start vmmd with \
                 --incoming defer and run reboot-resume",
                self.name, self.state_path
            ),
            (RebootWorkflow::Resume, Outcome::Resumed) => format!(
                "{}: resumed from {} ({})",
                self.name,
                self.state_path,
                self.run_state_after.unwrap_or("?")
            ),
            (_, Outcome::Skipped) => format!(
                "{}: skipped: {}",
                self.name,
                self.error.as_deref().unwrap_or("")
            ),
            (_, outcome) => format!(
                "{}: {} {}: {}",
                self.name,
                self.workflow,
                outcome.name(),
                self.error.as_deref().unwrap_or("")
            ),
        };
        let _ = writeln!(s, "{headline}");
        if let Some(us) = self.vmmd_micros {
            let what = if self.workflow == RebootWorkflow::Prep {
                "vCPUs stopped for the save"
            } else {
                "load (vmmd)"
            };
            let _ = writeln!(s, "  {what}: {}", format_micros(us));
        }
        if let Some(us) = self.guest_stopped_micros {
            let _ = writeln!(
                s,
                "  guest stopped since the save (incl. reboot): {}",
                format_micros(us)
            );
        }
        for p in &self.phases {
            let _ = writeln!(s, "  phase {:14} {}", p.name, format_micros(p.micros));
        }
        render_steps(s, &self.steps);
        if !self.ok && self.outcome != Outcome::Skipped {
            let guest = match (self.run_state_after, self.run_state_before) {
                (Some(after), Some(before)) if after == before => {
                    format!("{after}, as before")
                }
                (Some(after), Some(before)) => format!("{after} (was {before}): check it"),
                (Some(after), None) => after.to_owned(),
                (None, _) => "unknown (vmmd does not answer)".to_owned(),
            };
            let _ = writeln!(s, "  guest: {guest}");
        }
        let _ = writeln!(s, "  total: {}", format_micros(self.total_micros));
    }
}

impl Render for VmReport {
    fn human(&self) -> String {
        let mut s = String::new();
        self.human_into(&mut s);
        s
    }
}

/// What `--all` did.
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    /// `reboot-prep` or `reboot-resume`.
    pub workflow: RebootWorkflow,
    /// Whether every VM succeeded (or was skipped).
    pub ok: bool,
    /// VMs found.
    pub vms: usize,
    /// VMs that succeeded.
    pub succeeded: usize,
    /// VMs that failed.
    pub failed: usize,
    /// VMs skipped.
    pub skipped: usize,
    /// Concurrency limit.
    pub jobs: u16,
    /// Wall time of the whole run, microseconds.
    pub total_micros: u64,
    /// Per VM, by name.
    pub reports: Vec<VmReport>,
}

impl Render for FleetReport {
    fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} --all: {} VMs, {} ok, {} failed, {} skipped in {} (at most {} at a time)",
            self.workflow,
            self.vms,
            self.succeeded,
            self.failed,
            self.skipped,
            format_micros(self.total_micros),
            self.jobs
        );
        for r in &self.reports {
            r.human_into(&mut s);
        }
        s
    }
}
