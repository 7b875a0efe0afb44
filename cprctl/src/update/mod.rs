//! `cprctl update`: live-update vmmd in cpr-exec mode, as a typed workflow.
//!
//! Each [`Step`] runs in order and, when a later step fails, the steps already done are compensated
//! in reverse:
//!
//! | step | what | compensation |
//! | --- | --- | --- |
//! | `preflight` | vmmd reachable and in a state that can be updated, no cpr-exec blockers, NEW exists and is executable, NEW itself says it reads this state-format version, NEW's version | nothing changed |
//! | `set-mode` | migration mode `cpr-exec` with NEW's command line | the previous migration parameters are put back |
//! | `exec` | Migrate `file:STATE`: inside vmmd, pause, [invalidate VFIO DMA host addresses per container,] save state without RAM, hand fds over, `execve` NEW (same PID) | vmmd resumes the guest itself when anything fails before `execve` (re-mapping the VFIO containers it had invalidated: shown as `vfio-dma`); cprctl checks and resumes it if it was left paused |
//! | `wait-new-process` | Info on the inherited socket until the new process answers (or vmmd has rolled back) | a new binary that cannot load the state is rolled back by vmmd itself |
//! | `migrate-incoming` | only with `--load deferred`: MigrateIncoming `file:STATE` | as above; if cprctl dies before this step, vmmd's `--cpr-incoming-timeout` deadline rolls back |
//! | `verify` | same pid, generation + 1, NEW's version, the runstate from before | none: the update happened; the report says what did not match |
//!
//! `--all` runs the workflow for every vmmd whose API socket is `<socket-dir>/<name>.sock`, `--jobs`
//! at a time (default 1: a canary first), and starts no new one after a failure unless
//! `--keep-going`.
//!
//! With the default `--load at-start` the new vmmd starts with `--incoming file:STATE` and resumes the
//! guest by itself: a cprctl that dies at any point cannot leave the guest paused.

pub mod all;
mod command_line;
mod error;
mod report;
mod steps;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use self::all::{run_all, FleetUpdate, VmUpdate};
pub use self::command_line::{carried_flags, new_command_line, parse_version};
pub use self::error::UpdateError;
pub use self::report::{UpdateFailure, UpdateReport};
use crate::reboot::DEFAULT_SOCKET_DIR;
use crate::workflow::{micros, Engine, Guest, SessionError};
pub use crate::workflow::{NoProgress, Progress, ProgressEvent, StderrProgress, StepRecord};

/// How long one connection attempt or Info call may take while the new process starts.
const POLL_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between Info polls while waiting for the new process.
const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// How the new vmmd is told to load the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Load {
    /// `--incoming file:STATE`: the new vmmd loads the state and resumes the guest as it starts
    /// (smallest pause; nothing depends on cprctl after the exec).
    AtStart,
    /// `--incoming defer`: cprctl sends migrate-incoming; vmmd rolls back if it does not come in
    /// time (`--incoming-deadline`).
    Deferred,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::AtStart => "at-start",
            Load::Deferred => "deferred",
        }
    }
}

/// Options of `cprctl update`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpdateArgs {
    /// The new vmmd binary.
    #[arg(long, value_name = "NEW")]
    pub binary: PathBuf,
    /// Where vmmd writes the state (default: `<api socket>.cpr-state`); not with `--all`.
    #[arg(long, value_name = "PATH", conflicts_with = "all")]
    pub state: Option<PathBuf>,
    /// Which VMs: `--all` and how.
    #[command(flatten)]
    pub fleet: AllArgs,
    /// Seconds to wait for the new process to answer after the exec.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub timeout: u64,
    /// How the new vmmd loads the state.
    #[arg(long, value_enum, default_value_t = Load::AtStart)]
    pub load: Load,
    /// `--load deferred`: seconds the new vmmd waits for migrate-incoming before rolling back.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub incoming_deadline: u64,
    /// Test hook: one more argument for the new vmmd (repeatable), e.g. `--new-arg=--fault-inject`.
    #[arg(
        long = "new-arg",
        hide = true,
        allow_hyphen_values = true,
        value_name = "ARG"
    )]
    pub new_args: Vec<String>,
    /// Test hook: SIGKILL cprctl itself at this point, as if it died there.
    #[arg(long, hide = true, value_enum, value_name = "POINT")]
    pub die_at: Option<DiePoint>,
}

impl UpdateArgs {
    /// Update to `binary` with the defaults.
    pub fn new(binary: PathBuf) -> Self {
        Self {
            binary,
            state: None,
            fleet: AllArgs::default(),
            timeout: 60,
            load: Load::AtStart,
            incoming_deadline: 10,
            new_args: Vec::new(),
            die_at: None,
        }
    }
}

/// `update --all`: every vmmd of a socket directory.
#[derive(Debug, Clone, clap::Args)]
pub struct AllArgs {
    /// Update every vmmd whose API socket is `<socket-dir>/<name>.sock` (instead of --socket).
    #[arg(long)]
    pub all: bool,
    /// `--all`: where the vmmd API sockets are.
    #[arg(long, default_value = DEFAULT_SOCKET_DIR, value_name = "DIR")]
    pub socket_dir: PathBuf,
    /// `--all`: how many VMs to update at a time.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: u16,
    /// `--all`: go on with the other VMs after one failed (default: start no new update).
    #[arg(long)]
    pub keep_going: bool,
}

impl Default for AllArgs {
    fn default() -> Self {
        Self {
            all: false,
            socket_dir: PathBuf::from(DEFAULT_SOCKET_DIR),
            jobs: 1,
            keep_going: false,
        }
    }
}

/// The workflow's steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Checks that change nothing.
    Preflight,
    /// Migration mode cpr-exec and NEW's command line.
    SetMode,
    /// Pause, save, exec (all inside vmmd's Migrate).
    Exec,
    /// The new process answers on the inherited socket.
    WaitNewProcess,
    /// `--load deferred` only: load the state into the new process.
    MigrateIncoming,
    /// Same pid, next generation, NEW's version, guest running.
    Verify,
}

impl Step {
    /// The step's name as printed.
    pub fn name(self) -> &'static str {
        match self {
            Step::Preflight => "preflight",
            Step::SetMode => "set-mode",
            Step::Exec => "exec",
            Step::WaitNewProcess => "wait-new-process",
            Step::MigrateIncoming => "migrate-incoming",
            Step::Verify => "verify",
        }
    }

    /// What the step does, for progress lines.
    pub fn what(self) -> &'static str {
        match self {
            Step::Preflight => "checking vmmd, blockers and the new binary",
            Step::SetMode => "setting migration mode cpr-exec",
            Step::Exec => "pause, save state, exec the new binary",
            Step::WaitNewProcess => "waiting for the new vmmd",
            Step::MigrateIncoming => "loading the state into the new vmmd",
            Step::Verify => "verifying pid, generation, version and runstate",
        }
    }

    fn steps(load: Load) -> Vec<Step> {
        let mut v = vec![
            Step::Preflight,
            Step::SetMode,
            Step::Exec,
            Step::WaitNewProcess,
        ];
        if load == Load::Deferred {
            v.push(Step::MigrateIncoming);
        }
        v.push(Step::Verify);
        v
    }
}

/// Test hook points where `--die-at` kills cprctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiePoint {
    /// After preflight.
    AfterPreflight,
    /// After set-mode.
    AfterSetMode,
    /// Right after sending Migrate, before its answer.
    DuringExec,
    /// After the exec, before waiting for the new process.
    AfterExec,
    /// After the new process answered (before migrate-incoming with `--load deferred`).
    AfterWaitNewProcess,
    /// After migrate-incoming (`--load deferred`).
    AfterMigrateIncoming,
}

impl crate::workflow::Step for Step {
    fn name(self) -> &'static str {
        Step::name(self)
    }

    fn what(self) -> &'static str {
        Step::what(self)
    }
}

/// Runs `cprctl update` against the vmmd on `socket`.
pub async fn run(
    socket: &Path,
    args: &UpdateArgs,
    progress: &mut dyn Progress,
) -> Result<UpdateReport, UpdateFailure> {
    let started = Instant::now();
    let mut engine = Engine::new(Step::steps(args.load), progress);
    let mut wf = steps::Update::new(socket, args);
    let result = engine.run(&mut wf).await;
    match result {
        Ok(()) => {
            let mut report = wf.into_report();
            report.ok = true;
            report.outcome = crate::workflow::Outcome::Updated;
            report.steps = engine.take_records();
            report.total_micros = micros(started.elapsed());
            Ok(report)
        }
        Err(failed) => {
            let error = failed.error;
            wf.note_where_the_guest_is().await;
            let mut report = wf.into_report();
            let guest = if matches!(error, UpdateError::Session(SessionError::Unreachable(_)))
                && report.pid == 0
            {
                Guest::Unreached
            } else if report.run_state_after == Some(report.run_state_before) {
                Guest::AsBefore
            } else {
                Guest::NotRestored
            };
            report.outcome = error.outcome(guest);
            report.error = Some(error.to_string());
            report.steps = engine.take_records();
            report.total_micros = micros(started.elapsed());
            Err(UpdateFailure {
                error,
                report: Box::new(report),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_depend_on_how_the_state_is_loaded() {
        let names = |l| {
            Step::steps(l)
                .into_iter()
                .map(Step::name)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(Load::AtStart),
            [
                "preflight",
                "set-mode",
                "exec",
                "wait-new-process",
                "verify"
            ]
        );
        assert_eq!(
            names(Load::Deferred),
            [
                "preflight",
                "set-mode",
                "exec",
                "wait-new-process",
                "migrate-incoming",
                "verify"
            ]
        );
    }
}
