//! The step log: each step's record for the report, and progress events as text or JSON lines.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::output::format_micros;

/// Microseconds of `d`, saturating.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What happened to a step, as reports and progress events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// The step begins (progress only).
    Started,
    /// The step completed.
    Done,
    /// The step had nothing to do.
    Skipped,
    /// The step failed.
    Failed,
    /// A compensation begins (progress only).
    Compensating,
    /// A compensation ran.
    Compensated,
}

impl StepStatus {
    /// The word, e.g. `done`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Done => "done",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
            Self::Compensating => "compensating",
            Self::Compensated => "compensated",
        }
    }
}

/// One step as it went.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// The step's name.
    pub step: &'static str,
    /// `done`, `skipped`, `failed` or `compensated`.
    pub status: StepStatus,
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
            st.status.name(),
            format_micros(st.micros)
        );
        if let Some(d) = &st.detail {
            let _ = write!(s, "  {d}");
        }
        s.push('\n');
    }
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
    pub status: StepStatus,
    /// Microseconds since the step started (0 when it starts).
    pub micros: u64,
    /// What happened, when there is something to say.
    pub detail: Option<String>,
}

impl ProgressEvent {
    /// `[index/of] step` and, unless it is `started`, ` status (time)`.
    pub fn head(&self) -> String {
        let mut s = format!("[{}/{}] {}", self.index, self.of, self.step);
        if self.status != StepStatus::Started {
            let _ = write!(
                s,
                " {} ({})",
                self.status.name(),
                format_micros(self.micros)
            );
        }
        s
    }

    /// One human line: `[index/of] step: what ...` when it starts, then
    /// `[index/of] step status (time): detail`.
    pub fn human(&self) -> String {
        let mut s = self.head();
        if self.status == StepStatus::Started {
            let _ = write!(s, ": {} ...", self.what);
        } else if let Some(d) = &self.detail {
            let _ = write!(s, ": {d}");
        }
        s
    }
}

/// Where progress goes. `Send`, so that a workflow can run on any worker (`--all`).
pub trait Progress: Send {
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
pub struct StepLog<'p> {
    /// The steps (name, what it does), in order.
    steps: Vec<(&'static str, &'static str)>,
    /// The steps as they went, compensations included.
    records: Vec<StepRecord>,
    progress: &'p mut dyn Progress,
}

impl<'p> StepLog<'p> {
    /// A log of `steps` (name, what it does), in the order they run.
    pub fn new(steps: Vec<(&'static str, &'static str)>, progress: &'p mut dyn Progress) -> Self {
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
        status: StepStatus,
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
        status: StepStatus,
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

    /// Records `step`, started at `started`, as `status`.
    pub fn finish(
        &mut self,
        step: &'static str,
        status: StepStatus,
        started: Instant,
        detail: Option<String>,
    ) {
        self.record(step, status, micros(started.elapsed()), detail);
    }

    /// The records so far.
    pub fn records(&self) -> &[StepRecord] {
        &self.records
    }

    /// The records, leaving the log empty.
    pub fn take_records(&mut self) -> Vec<StepRecord> {
        std::mem::take(&mut self.records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_name_the_step() {
        let e = ProgressEvent {
            step: "exec",
            what: "pause, save state, exec the new binary",
            index: 3,
            of: 5,
            status: StepStatus::Done,
            micros: 1500,
            detail: None,
        };
        assert_eq!(e.human(), "[3/5] exec done (1.500 ms)");
        assert_eq!(
            serde_json::to_string(&e).expect("json"),
            r#"{"step":"exec","index":3,"of":5,"status":"done","micros":1500,"detail":null}"#
        );
        let started = ProgressEvent {
            status: StepStatus::Started,
            micros: 0,
            ..e
        };
        assert_eq!(
            started.human(),
            "[3/5] exec: pause, save state, exec the new binary ..."
        );
    }

    #[test]
    fn the_step_table_has_one_line_a_step() {
        let mut s = String::new();
        render_steps(
            &mut s,
            &[StepRecord {
                step: "wakeup",
                status: StepStatus::Skipped,
                micros: 5,
                detail: Some("skipped: the guest is running".into()),
            }],
        );
        assert_eq!(
            s,
            "  wakeup            skipped      5 us  skipped: the guest is running\n"
        );
    }
}
