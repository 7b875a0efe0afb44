//! What the typed workflows (`update`, `reboot-prep`, `reboot-resume`) share: the step log (time
//! each step, record it, report progress as text or JSON lines), the report's step table, and
//! asking a vmmd binary something.

use std::fmt::{Display, Write as _};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use vmmd_proto::v1::Phase;

use crate::output::{format_micros, PhaseView};

/// How long asking a vmmd binary something (`--check-state-version`, `--version`) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Microseconds of `d`, saturating.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One step as it went.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// The step's name.
    pub step: &'static str,
    /// `done`, `skipped`, `failed` or `compensated`.
    pub status: &'static str,
    /// Wall time of the step (or of its compensation).
    pub micros: u64,
    /// What happened, when there is something to say.
    pub detail: Option<String>,
}

/// Appends the step table of a human report: one line a step, indented by two.
pub fn render_steps(s: &mut String, steps: &[StepRecord]) {
    for st in steps {
        let _ = write!(
            s,
            "  {:16}  {:11}  {}",
            st.step,
            st.status,
            format_micros(st.micros)
        );
        if let Some(d) = &st.detail {
            let _ = write!(s, "  {d}");
        }
        s.push('\n');
    }
}

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

/// A progress event: a step started, ended, failed or was compensated.
#[derive(Debug, Clone, Serialize)]
pub struct ProgressEvent {
    /// The step's name.
    pub step: &'static str,
    /// What the step does (for human lines; not in JSON).
    #[serde(skip)]
    pub what: &'static str,
    /// Its number (1-based) and the number of steps.
    pub index: usize,
    /// Number of steps in this workflow.
    pub of: usize,
    /// `started`, `done`, `skipped`, `failed`, `compensating` or `compensated`.
    pub status: &'static str,
    /// Microseconds since the step started (0 when it starts).
    pub micros: u64,
    /// What happened, when there is something to say.
    pub detail: Option<String>,
}

impl ProgressEvent {
    /// `[index/of] step` and, unless it is `started`, ` status (time)`.
    pub fn head(&self) -> String {
        let mut s = format!("[{}/{}] {}", self.index, self.of, self.step);
        if self.status != "started" {
            let _ = write!(s, " {} ({})", self.status, format_micros(self.micros));
        }
        s
    }

    /// One human line: `[index/of] step: what ...` when it starts, then
    /// `[index/of] step status (time): detail`.
    pub fn human(&self) -> String {
        let mut s = self.head();
        if self.status == "started" {
            let _ = write!(s, ": {} ...", self.what);
        } else if let Some(d) = &self.detail {
            let _ = write!(s, ": {d}");
        }
        s
    }
}

/// Where progress goes.
pub trait Progress {
    /// Called for every step event.
    fn event(&mut self, e: &ProgressEvent);
}

impl<P: Progress + ?Sized> Progress for &mut P {
    fn event(&mut self, e: &ProgressEvent) {
        (**self).event(e);
    }
}

/// Discards progress.
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&mut self, _: &ProgressEvent) {}
}

/// Prints progress on stderr: human lines, or JSON lines with `json`.
pub struct StderrProgress {
    /// JSON lines instead of text.
    pub json: bool,
    /// Prefix of human lines, e.g. `cprctl update: `.
    pub prefix: String,
}

impl Progress for StderrProgress {
    fn event(&mut self, e: &ProgressEvent) {
        if self.json {
            eprint_json(e);
        } else {
            eprintln!("{}{}", self.prefix, e.human());
        }
    }
}

/// Prints `value` as one JSON line on stderr.
pub fn eprint_json(value: &impl Serialize) {
    if let Ok(line) = serde_json::to_string(value) {
        eprintln!("{line}");
    }
}

/// The steps of one workflow run as they go: records them and reports progress.
pub struct StepLog<P> {
    /// The steps (name, what it does), in order.
    steps: Vec<(&'static str, &'static str)>,
    /// The steps as they went, compensations included.
    pub records: Vec<StepRecord>,
    progress: P,
}

impl<P: Progress> StepLog<P> {
    /// A log of `steps` (name, what it does), in the order they run.
    pub fn new(steps: Vec<(&'static str, &'static str)>, progress: P) -> Self {
        Self {
            steps,
            records: Vec::new(),
            progress,
        }
    }

    /// Reports a progress event for `step` without recording it.
    pub fn emit(
        &mut self,
        step: &'static str,
        status: &'static str,
        us: u64,
        detail: Option<String>,
    ) {
        let (index, what) = self
            .steps
            .iter()
            .enumerate()
            .find(|(_, (name, _))| *name == step)
            .map_or((0, ""), |(i, (_, what))| (i + 1, *what));
        let e = ProgressEvent {
            step,
            what,
            index,
            of: self.steps.len(),
            status,
            micros: us,
            detail,
        };
        self.progress.event(&e);
    }

    /// Records `step` and reports it.
    pub fn record(
        &mut self,
        step: &'static str,
        status: &'static str,
        us: u64,
        detail: Option<String>,
    ) {
        self.emit(step, status, us, detail.clone());
        self.records.push(StepRecord {
            step,
            status,
            micros: us,
            detail,
        });
    }

    /// Records how `step`, started at `started`, ended: `done` with its detail, or `failed` with
    /// the error, which is handed back.
    pub fn finish<E: Display>(
        &mut self,
        step: &'static str,
        started: Instant,
        result: Result<Option<String>, E>,
    ) -> Result<(), E> {
        let us = micros(started.elapsed());
        match result {
            Ok(detail) => {
                self.record(step, "done", us, detail);
                Ok(())
            }
            Err(e) => {
                self.record(step, "failed", us, Some(e.to_string()));
                Err(e)
            }
        }
    }

    /// Records the compensation of `step`, started at `started`.
    pub fn compensated(&mut self, step: &'static str, started: Instant, detail: String) {
        self.record(step, "compensated", micros(started.elapsed()), Some(detail));
    }
}

/// Why a vmmd binary could not be asked something.
#[derive(Debug, thiserror::Error)]
#[error("cannot run `{command}`: {detail}")]
pub struct ProbeError {
    /// The command line.
    pub command: String,
    /// What happened.
    pub detail: String,
}

/// What a vmmd binary answered.
#[derive(Debug)]
pub struct ProbeAnswer {
    /// Whether it exited successfully.
    pub success: bool,
    /// Its stdout and stderr, trimmed, joined by `; `.
    pub text: String,
}

/// Runs `binary args...` with [`PROBE_TIMEOUT`]; its exit status and output.
pub async fn probe(binary: &Path, args: &[String]) -> Result<ProbeAnswer, ProbeError> {
    let command = format!("{} {}", binary.display(), args.join(" "));
    let failed = |detail: String| ProbeError {
        command: command.clone(),
        detail,
    };
    let out = tokio::process::Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(PROBE_TIMEOUT, out)
        .await
        .map_err(|_| failed(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())))?
        .map_err(|e| failed(e.to_string()))?;
    let mut text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if !err.is_empty() {
        if !text.is_empty() {
            text.push_str("; ");
        }
        text.push_str(&err);
    }
    Ok(ProbeAnswer {
        success: out.status.success(),
        text,
    })
}
