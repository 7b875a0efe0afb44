//! `--all`: a reboot workflow for every vmmd in `--socket-dir`, at most `--jobs` at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::{
    prep, resume, FleetReport, PrepArgs, Progress, RebootError, RebootWorkflow, ResumeArgs, Target,
    VmReport,
};
use crate::workflow::fleet::{self, FleetResult};
use crate::workflow::{micros, Guest, Outcome};

/// The vmmd API sockets `<dir>/<name>.sock`, sorted by name.
pub fn discover(dir: &Path) -> Result<Vec<PathBuf>, RebootError> {
    fleet::discover(dir).map_err(|source| RebootError::Discover {
        dir: dir.to_path_buf(),
        source,
    })
}

/// Markers in `state_dir` (`<name>.state.marker.json`): their names.
fn marked_names(state_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".state.marker.json"))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

fn fleet_report(
    workflow: RebootWorkflow,
    jobs: u16,
    started: Instant,
    reports: Vec<VmReport>,
) -> FleetReport {
    let succeeded = reports.iter().filter(|r| r.ok).count();
    let skipped = reports
        .iter()
        .filter(|r| r.outcome == Outcome::Skipped)
        .count();
    let failed = reports.len() - succeeded - skipped;
    FleetReport {
        workflow,
        ok: failed == 0,
        vms: reports.len(),
        succeeded,
        failed,
        skipped,
        jobs,
        total_micros: micros(started.elapsed()),
        reports,
    }
}

impl FleetResult for VmReport {
    fn failed(&self) -> bool {
        !self.ok && self.outcome != Outcome::Skipped
    }
}

async fn run_parallel<F, Fut>(
    workflow: RebootWorkflow,
    targets: Vec<Target>,
    jobs: u16,
    f: F,
) -> Vec<VmReport>
where
    F: Fn(Target) -> Fut,
    Fut: std::future::Future<Output = VmReport> + Send + 'static,
{
    // Every VM is tried: a reboot goes ahead for the others whatever one of them does.
    fleet::run_parallel(targets, jobs, false, f, |t, _| {
        let mut rep = VmReport::new(workflow, t);
        rep.error = Some(
            RebootError::Task {
                name: t.name.clone(),
                detail: "it panicked or was cancelled".to_owned(),
            }
            .to_string(),
        );
        rep
    })
    .await
}

/// `reboot-prep --all`.
pub async fn prep_all(args: &PrepArgs, progress: Progress) -> Result<FleetReport, RebootError> {
    let started = Instant::now();
    let targets: Vec<Target> = discover(&args.fleet.socket_dir)?
        .iter()
        .map(|s| Target::new(s, None, &args.fleet.state_dir))
        .collect();
    let shared = Arc::new(args.clone());
    let reports = run_parallel(RebootWorkflow::Prep, targets, args.fleet.jobs, |t| {
        let a = Arc::clone(&shared);
        async move { prep(t, &a, progress).await }
    })
    .await;
    Ok(fleet_report(
        RebootWorkflow::Prep,
        args.fleet.jobs,
        started,
        reports,
    ))
}

/// `reboot-resume --all`: every vmmd with a marker; markers without a vmmd fail, vmmds without a
/// marker are skipped.
pub async fn resume_all(args: &ResumeArgs, progress: Progress) -> Result<FleetReport, RebootError> {
    let started = Instant::now();
    let sockets = discover(&args.fleet.socket_dir)?;
    let mut targets = Vec::new();
    let mut reports = Vec::new();
    for s in &sockets {
        let t = Target::new(s, None, &args.fleet.state_dir);
        if t.marker().exists() {
            targets.push(t);
        } else {
            let mut r = VmReport::new(RebootWorkflow::Resume, &t);
            r.outcome = Outcome::Skipped;
            r.error = Some(format!("no reboot marker {}", t.marker().display()));
            reports.push(r);
        }
    }
    for name in marked_names(&args.fleet.state_dir) {
        let socket = args.fleet.socket_dir.join(format!("{name}.sock"));
        if !sockets.contains(&socket) {
            let t = Target::new(&socket, None, &args.fleet.state_dir);
            let mut r = VmReport::new(RebootWorkflow::Resume, &t);
            r.outcome = Outcome::Refused(Guest::AsBefore);
            r.error = Some(
                RebootError::NoVmmd {
                    name: name.clone(),
                    marker: t.marker(),
                    socket,
                }
                .to_string(),
            );
            reports.push(r);
        }
    }
    let shared = Arc::new(args.clone());
    let done = run_parallel(RebootWorkflow::Resume, targets, args.fleet.jobs, |t| {
        let a = Arc::clone(&shared);
        async move { resume(t, &a, progress).await }
    })
    .await;
    reports.extend(done);
    reports.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(fleet_report(
        RebootWorkflow::Resume,
        args.fleet.jobs,
        started,
        reports,
    ))
}
