//! `cprctl update --all`: the update workflow for every vmmd of a socket directory, `--jobs` at a
//! time; after the first failure no new update starts unless `--keep-going`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::{run, UpdateArgs, UpdateError, UpdateReport};
use crate::output::{format_micros, Render};
use crate::reboot::ProgressEvent as VmEvent;
use crate::workflow::fleet::{self, FleetResult, NotRun};
use crate::workflow::{self, eprint_json, micros, Guest, Outcome, StepStatus};

/// What `update --all` did to one VM.
#[derive(Debug, Clone, Serialize)]
pub struct VmUpdate {
    /// The VM's name (its socket's file stem).
    pub vm: String,
    /// Its API socket.
    pub socket: String,
    /// Whether it runs the new binary, verified.
    pub ok: bool,
    /// The update's outcome: `updated`, `refused`, `failed`, `rolled-back`, `unverified`,
    /// `unknown`, or `not-started` (an earlier VM failed and `--keep-going` was not given).
    pub outcome: Outcome,
    /// The exit status `cprctl update` would have for this VM alone.
    pub exit_code: u8,
    /// The pause vmmd measured, milliseconds.
    pub pause_ms: Option<f64>,
    /// vmmd's update generation at the end (`null` when it was not asked).
    pub generation: Option<u64>,
    /// Why it is not updated.
    pub error: Option<String>,
    /// The update's full report (`null` when it was not started).
    pub report: Option<Box<UpdateReport>>,
}

impl VmUpdate {
    fn of(socket: &Path, report: UpdateReport) -> Self {
        let reached = report.pid != 0;
        Self {
            vm: crate::reboot::socket_name(socket),
            socket: socket.display().to_string(),
            ok: report.ok,
            outcome: report.outcome,
            exit_code: report.outcome.exit_code(),
            pause_ms: report.vmmd_pause_micros.map(|us| us as f64 / 1000.0),
            generation: report
                .generation_after
                .or(reached.then_some(report.generation_before)),
            error: report.error.clone(),
            report: Some(Box::new(report)),
        }
    }

    fn not_run(socket: &Path, outcome: Outcome, error: String) -> Self {
        Self {
            vm: crate::reboot::socket_name(socket),
            socket: socket.display().to_string(),
            ok: false,
            outcome,
            exit_code: outcome.exit_code(),
            pause_ms: None,
            generation: None,
            error: Some(error),
            report: None,
        }
    }
}

impl FleetResult for VmUpdate {
    fn failed(&self) -> bool {
        !self.ok
    }
}

/// The counts of an `update --all`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// VMs found.
    pub vms: usize,
    /// Updated and verified.
    pub updated: usize,
    /// Tried and not updated.
    pub failed: usize,
    /// Not tried (an earlier VM failed).
    pub not_started: usize,
}

/// What `update --all` did.
#[derive(Debug, Clone, Serialize)]
pub struct FleetUpdate {
    /// Whether every VM found was updated.
    pub ok: bool,
    /// The new binary.
    pub binary: String,
    /// Where the sockets were found.
    pub socket_dir: String,
    /// Concurrency limit.
    pub jobs: u16,
    /// Whether later VMs were updated after a failure.
    pub keep_going: bool,
    /// The counts.
    pub totals: Totals,
    /// Wall time of the whole run, microseconds.
    pub total_micros: u64,
    /// Per VM, by name.
    pub vms: Vec<VmUpdate>,
}

impl FleetUpdate {
    /// The exit status: 0 when every VM was updated, otherwise the worst of the VMs' (1 refused,
    /// failed, rolled back or not started with the guest as before; 3 a vmmd unreachable; 4 a
    /// guest not as before).
    pub fn exit_code(&self) -> u8 {
        self.vms.iter().map(|v| v.exit_code).max().unwrap_or(0)
    }

    /// One line naming the VMs that were not updated, for stderr.
    pub fn failure_summary(&self) -> String {
        let failed: Vec<String> = self
            .vms
            .iter()
            .filter(|v| !v.ok && v.outcome != Outcome::NotStarted)
            .map(|v| {
                format!(
                    "{} {} ({})",
                    v.vm,
                    v.outcome.name(),
                    v.error.as_deref().unwrap_or("")
                )
            })
            .collect();
        let mut s = format!(
            "update --all: {} of {} VMs not updated: {}",
            self.totals.failed,
            self.totals.vms,
            failed.join("; ")
        );
        if self.totals.not_started > 0 {
            let _ = write!(
                s,
                "; {} not started (--keep-going updates them despite a failure)",
                self.totals.not_started
            );
        }
        s
    }
}

impl Render for FleetUpdate {
    fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "update --all to {}: {} VMs in {}: {} updated, {} failed, {} not started in {} ({} at a time)",
            self.binary,
            self.totals.vms,
            self.socket_dir,
            self.totals.updated,
            self.totals.failed,
            self.totals.not_started,
            format_micros(self.total_micros),
            self.jobs
        );
        let width = self
            .vms
            .iter()
            .map(|v| v.vm.len())
            .max()
            .unwrap_or(0)
            .max(2);
        let _ = writeln!(
            s,
            "{:width$}  {:11}  {:>12}  {:10}  ERROR",
            "VM", "RESULT", "PAUSE", "GENERATION"
        );
        for v in &self.vms {
            let pause = v
                .report
                .as_ref()
                .and_then(|r| r.vmmd_pause_micros)
                .map_or_else(|| "-".to_owned(), format_micros);
            let generation = v
                .generation
                .map_or_else(|| "-".to_owned(), |g| g.to_string());
            let line = format!(
                "{:width$}  {:11}  {:>12}  {:10}  {}",
                v.vm,
                v.outcome.name(),
                pause,
                generation,
                v.error.as_deref().unwrap_or("")
            );
            let _ = writeln!(s, "{}", line.trim_end());
        }
        s
    }
}

/// Why `update --all` could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot list the vmmd sockets in {}: {source}; give --socket-dir", dir.display())]
pub struct DiscoverError {
    /// The directory.
    pub dir: PathBuf,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

/// Progress of one VM's update: its step events, named after the VM.
struct VmProgress {
    vm: String,
    json: bool,
}

impl workflow::Progress for VmProgress {
    fn event(&mut self, e: &workflow::ProgressEvent) {
        let mut event = e.clone();
        if event.status == StepStatus::Started && event.detail.is_none() {
            event.detail = Some(event.what.to_owned());
        }
        let e = VmEvent {
            workflow: "update",
            vm: self.vm.clone(),
            event,
        };
        if self.json {
            eprint_json(&e);
        } else {
            eprintln!("{}", e.human());
        }
    }
}

/// `cprctl update --all`: progress on stderr (JSON lines with `json`).
pub async fn run_all(args: &UpdateArgs, json: bool) -> Result<FleetUpdate, DiscoverError> {
    let started = Instant::now();
    let dir = &args.fleet.socket_dir;
    let sockets = fleet::discover(dir).map_err(|source| DiscoverError {
        dir: dir.clone(),
        source,
    })?;
    if !json {
        eprintln!(
            "cprctl update --all: {} VMs in {}, {} at a time{}",
            sockets.len(),
            dir.display(),
            args.fleet.jobs,
            if args.fleet.keep_going {
                ", going on after a failure"
            } else {
                ", stopping at the first failure"
            }
        );
    }
    let shared = Arc::new(args.clone());
    let mut vms = fleet::run_parallel(
        sockets,
        args.fleet.jobs,
        !args.fleet.keep_going,
        |socket: PathBuf| {
            let a = Arc::clone(&shared);
            async move {
                let mut progress = VmProgress {
                    vm: crate::reboot::socket_name(&socket),
                    json,
                };
                match run(&socket, &a, &mut progress).await {
                    Ok(report) => VmUpdate::of(&socket, report),
                    Err(failure) => VmUpdate::of(&socket, *failure.report),
                }
            }
        },
        |socket, why| match why {
            NotRun::NotStarted => VmUpdate::not_run(
                socket,
                Outcome::NotStarted,
                "not started: an earlier VM failed".to_owned(),
            ),
            NotRun::Lost => VmUpdate::not_run(
                socket,
                Outcome::Unknown(Guest::NotRestored),
                UpdateError::Verify(
                    "cprctl lost this VM's update task (it panicked or was cancelled); check \
                     `cprctl status`"
                        .to_owned(),
                )
                .to_string(),
            ),
        },
    )
    .await;
    if let Some(first) = vms
        .iter()
        .find(|v| !v.ok && v.outcome != Outcome::NotStarted)
        .map(|v| v.vm.clone())
    {
        for v in vms.iter_mut().filter(|v| v.outcome == Outcome::NotStarted) {
            v.error = Some(format!(
                "not started: {first} failed first (--keep-going goes on)"
            ));
        }
    }
    let totals = Totals {
        vms: vms.len(),
        updated: vms.iter().filter(|v| v.ok).count(),
        not_started: vms
            .iter()
            .filter(|v| v.outcome == Outcome::NotStarted)
            .count(),
        failed: vms
            .iter()
            .filter(|v| !v.ok && v.outcome != Outcome::NotStarted)
            .count(),
    };
    Ok(FleetUpdate {
        ok: totals.updated == totals.vms,
        binary: args.binary.display().to_string(),
        socket_dir: dir.display().to_string(),
        jobs: args.fleet.jobs,
        keep_going: args.fleet.keep_going,
        totals,
        total_micros: micros(started.elapsed()),
        vms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, outcome: Outcome, generation: Option<u64>) -> VmUpdate {
        let mut v = VmUpdate::not_run(
            Path::new(&format!("/run/vmmd/{name}.sock")),
            outcome,
            String::new(),
        );
        v.ok = outcome.is_success();
        v.error = (!v.ok).then(|| format!("{name} broke"));
        v.generation = generation;
        v
    }

    fn fleet(vms: Vec<VmUpdate>) -> FleetUpdate {
        FleetUpdate {
            ok: false,
            binary: "/usr/bin/vmmd".into(),
            socket_dir: "/run/vmmd".into(),
            jobs: 1,
            keep_going: false,
            totals: Totals {
                vms: vms.len(),
                updated: 1,
                failed: 1,
                not_started: 1,
            },
            total_micros: 1500,
            vms,
        }
    }

    #[test]
    fn the_table_has_a_line_a_vm_and_the_worst_status_wins() {
        let f = fleet(vec![
            vm("vm-a", Outcome::Updated, Some(1)),
            vm("vm-b", Outcome::Refused(Guest::AsBefore), Some(0)),
            vm("vm-c", Outcome::NotStarted, None),
        ]);
        let text = f.human();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[1].starts_with("VM    RESULT"), "{text}");
        assert!(lines[2].starts_with("vm-a  updated"), "{text}");
        assert!(lines[3].contains("refused") && lines[3].ends_with("vm-b broke"));
        assert!(lines[4].starts_with("vm-c  not-started"), "{text}");
        assert_eq!(f.exit_code(), 1);
        assert!(f.failure_summary().contains("vm-b refused (vm-b broke)"));
        let v = serde_json::to_value(&f).expect("json");
        assert_eq!(v["vms"][2]["outcome"], "not-started", "{v}");
        assert_eq!(v["vms"][0]["generation"], 1, "{v}");
        assert_eq!(v["totals"]["not_started"], 1, "{v}");

        let f = fleet(vec![
            vm("vm-a", Outcome::Unknown(Guest::Unreached), None),
            vm("vm-b", Outcome::RolledBack(Guest::NotRestored), None),
        ]);
        assert_eq!(f.exit_code(), 4);
        assert_eq!(
            fleet(vec![vm("a", Outcome::Updated, Some(2))]).exit_code(),
            0
        );
    }
}
