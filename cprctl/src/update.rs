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
//! With the default `--load at-start` the new vmmd starts with `--incoming file:STATE` and resumes the
//! guest by itself: a cprctl that dies at any point cannot leave the guest paused.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use tonic::Code;
use vmmd_proto::v1::{
    GetMigrationParametersRequest, InfoRequest, InfoResponse, MigrateIncomingRequest,
    MigrateRequest, MigrationInfo, MigrationMode, MigrationParameters, QueryMigrateRequest,
    ResumeRequest, RunState,
};

use crate::client::{self, code_name, Client, ClientError};
use crate::output::{format_micros, run_state_name, PhaseView, Render};
use crate::workflow::{micros, phase_views, probe, render_steps, ProbeError, StepLog};
pub use crate::workflow::{NoProgress, Progress, ProgressEvent, StderrProgress, StepRecord};

/// How long one connection attempt or Info call may take while the new process starts.
const POLL_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between Info polls while waiting for the new process.
const POLL_INTERVAL: Duration = Duration::from_millis(2);
/// vmmd flags that do not shape the VM but should stay as they were on the new process.
const CARRIED_FLAGS_WITH_VALUE: &[&str] = &[
    "--log-level",
    "--cpr-incoming-timeout",
    "--device",
    "--vfio-model",
    "--populate-after-load",
    "--cpr-exec-bridge",
];
/// Switches carried over to the new process.
const CARRIED_SWITCHES: &[&str] = &[
    "--log-json",
    "--only-cpr-capable",
    "--vfio-model-without-vaddr",
];

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
    /// Where vmmd writes the state (default: `<api socket>.cpr-state`).
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
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
            timeout: 60,
            load: Load::AtStart,
            incoming_deadline: 10,
            new_args: Vec::new(),
            die_at: None,
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

/// Why the update did not complete.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// vmmd could not be reached.
    #[error(transparent)]
    Unreachable(ClientError),
    /// vmmd returned an error to a request of the workflow.
    #[error(transparent)]
    Rpc(ClientError),
    /// The VM is in a state an update cannot start from.
    #[error(
        "vmmd is {run_state}: an update needs a running, paused or suspended guest; nothing was changed"
    )]
    NotUpdatable {
        /// The runstate.
        run_state: &'static str,
    },
    /// vmmd reports cpr-exec blockers.
    #[error("cpr-exec is blocked: {}; remove the blockers (see `cprctl status`) and retry; nothing was changed", blockers.join("; "))]
    Blocked {
        /// vmmd's blockers.
        blockers: Vec<String>,
    },
    /// NEW does not exist or cannot be inspected.
    #[error("new binary {}: {source}; give --binary the path of a vmmd build; nothing was changed", path.display())]
    BinaryMissing {
        /// NEW.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// NEW is not an executable regular file.
    #[error("new binary {} is not an executable regular file: chmod +x it or pick another; nothing was changed", path.display())]
    NotExecutable {
        /// NEW.
        path: PathBuf,
    },
    /// NEW could not be run to ask it something.
    #[error("cannot run `{command}`: {detail}; check that it is a working vmmd build; nothing was changed")]
    Probe {
        /// The command line.
        command: String,
        /// What happened.
        detail: String,
    },
    /// NEW says it cannot read the running vmmd's state format.
    #[error("new binary {} cannot read state format version {version} that the running vmmd writes ({answer}); use a build that reads it; nothing was changed", path.display())]
    StateVersionRefused {
        /// NEW.
        path: PathBuf,
        /// The running vmmd's format version.
        version: u32,
        /// What NEW printed.
        answer: String,
    },
    /// vmmd refused the update before pausing the guest.
    #[error("vmmd refused the update: {message} ({code}); nothing was paused, fix that and retry")]
    Refused {
        /// gRPC code name.
        code: &'static str,
        /// vmmd's message.
        message: String,
    },
    /// The update failed inside vmmd before the new binary took over.
    #[error("the update failed before the new binary took over: {reason}; vmmd resumed the guest on the old binary")]
    FailedBeforeExec {
        /// vmmd's update status.
        reason: String,
    },
    /// The new binary took over but could not carry the guest; vmmd went back to the old binary.
    #[error("the new binary could not take the guest over and vmmd rolled back to the previous binary: {reason}")]
    RolledBack {
        /// vmmd's reason.
        reason: String,
    },
    /// Nobody answered on the API socket after the exec.
    #[error("vmmd did not answer within {}s after the exec (last: {last}); check the vmmd log and `cprctl status`", timeout.as_secs())]
    NoAnswer {
        /// How long cprctl waited.
        timeout: Duration,
        /// The last error or status seen.
        last: String,
    },
    /// The update ran but the result is not what was asked for.
    #[error("the update ran but verification failed: {0}")]
    Verify(String),
}

/// What the update did and measured.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateReport {
    /// true when the update is verified.
    pub ok: bool,
    /// `updated`, `refused` (nothing changed), `failed` (failed before the exec; guest resumed),
    /// `rolled-back` (the new binary took over and failed; vmmd went back) or `unknown`.
    pub outcome: &'static str,
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
            "updated" => {
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
                    "update {outcome}: {}",
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
}

/// How the wait for the new process ended.
enum Arrival {
    /// The new binary runs the guest (or, deferred, waits for migrate-incoming).
    NewProcess(InfoResponse),
    /// vmmd went back to the old binary after the exec.
    RolledBack(InfoResponse),
    /// The old process is still there: the update failed before execve.
    Failed(InfoResponse),
}

/// The workflow's state.
struct Workflow<'a> {
    socket: PathBuf,
    args: &'a UpdateArgs,
    steps: Vec<Step>,
    log: StepLog<&'a mut dyn Progress>,
    started: Instant,
    report: UpdateReport,
    before: Option<InfoResponse>,
    previous_params: Option<MigrationParameters>,
    mode_set: bool,
    image_changed: bool,
}

/// Runs `cprctl update` against the vmmd on `socket`.
pub async fn run(
    socket: &Path,
    args: &UpdateArgs,
    progress: &mut dyn Progress,
) -> Result<UpdateReport, UpdateFailure> {
    let steps = Step::steps(args.load);
    let mut wf = Workflow {
        socket: socket.to_path_buf(),
        args,
        log: StepLog::new(
            steps.iter().map(|s| (s.name(), s.what())).collect(),
            progress,
        ),
        steps,
        started: Instant::now(),
        report: UpdateReport {
            ok: false,
            outcome: "unknown",
            error: None,
            binary: args.binary.display().to_string(),
            state_path: String::new(),
            load: args.load.name(),
            pid: 0,
            pid_after: None,
            old_version: String::new(),
            new_version: None,
            expected_version: None,
            old_executable: String::new(),
            new_executable: None,
            generation_before: 0,
            generation_after: None,
            run_state_before: "unknown",
            run_state_after: None,
            guest_running: None,
            update_status: None,
            vmmd_pause_micros: None,
            phases: Vec::new(),
            steps: Vec::new(),
            total_micros: 0,
        },
        before: None,
        previous_params: None,
        mode_set: false,
        image_changed: false,
    };
    match wf.execute().await {
        Ok(()) => {
            wf.report.ok = true;
            wf.report.outcome = "updated";
            wf.report.steps = std::mem::take(&mut wf.log.records);
            wf.report.total_micros = micros(wf.started.elapsed());
            Ok(wf.report)
        }
        Err(error) => {
            wf.compensate(&error).await;
            wf.report.outcome = match &error {
                UpdateError::Refused { .. }
                | UpdateError::NotUpdatable { .. }
                | UpdateError::Blocked { .. }
                | UpdateError::BinaryMissing { .. }
                | UpdateError::NotExecutable { .. }
                | UpdateError::Probe { .. }
                | UpdateError::StateVersionRefused { .. } => "refused",
                UpdateError::FailedBeforeExec { .. } => "failed",
                UpdateError::RolledBack { .. } => "rolled-back",
                UpdateError::Verify(_) => "unverified",
                UpdateError::Unreachable(_)
                | UpdateError::Rpc(_)
                | UpdateError::NoAnswer { .. } => "unknown",
            };
            wf.report.error = Some(error.to_string());
            wf.report.steps = std::mem::take(&mut wf.log.records);
            wf.report.total_micros = micros(wf.started.elapsed());
            Err(UpdateFailure {
                error,
                report: Box::new(wf.report),
            })
        }
    }
}

impl From<ProbeError> for UpdateError {
    fn from(e: ProbeError) -> Self {
        UpdateError::Probe {
            command: e.command,
            detail: e.detail,
        }
    }
}

impl Workflow<'_> {
    fn die_if(&self, point: DiePoint) {
        if self.args.die_at == Some(point) {
            tracing::warn!(?point, "test hook: cprctl kills itself");
            // Test hook: die as abruptly as a SIGKILL from outside would.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }

    async fn execute(&mut self) -> Result<(), UpdateError> {
        let steps = self.steps.clone();
        for step in steps {
            self.log.emit(step.name(), "started", 0, None);
            self.report_step(step, "started").await;
            let t = Instant::now();
            let result = match step {
                Step::Preflight => self.preflight().await,
                Step::SetMode => self.set_mode().await,
                Step::Exec => self.exec().await,
                Step::WaitNewProcess => self.wait_new_process().await,
                Step::MigrateIncoming => self.migrate_incoming().await,
                Step::Verify => self.verify().await,
            };
            self.log.finish(step.name(), t, result)?;
            self.report_step(step, "done").await;
            match step {
                Step::Preflight => self.die_if(DiePoint::AfterPreflight),
                Step::SetMode => self.die_if(DiePoint::AfterSetMode),
                Step::Exec => self.die_if(DiePoint::AfterExec),
                Step::WaitNewProcess => self.die_if(DiePoint::AfterWaitNewProcess),
                Step::MigrateIncoming => self.die_if(DiePoint::AfterMigrateIncoming),
                Step::Verify => {}
            }
        }
        Ok(())
    }

    /// Tells vmmd which step the workflow is in (best effort: vmmd may be mid-exec).
    async fn report_step(&self, step: Step, state: &str) {
        let request = vmmd_proto::v1::WorkflowStep {
            orchestrator: format!("cprctl update (pid {})", std::process::id()),
            step: format!("{}: {state}", step.name()),
        };
        let call = async {
            let mut vmm = client::connect(&self.socket).await.ok()?;
            vmm.set_workflow_step(request).await.ok()
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), call).await;
    }

    async fn connect(&self) -> Result<Client, UpdateError> {
        client::connect(&self.socket)
            .await
            .map_err(UpdateError::Unreachable)
    }

    fn before(&self) -> Result<&InfoResponse, UpdateError> {
        self.before.as_ref().ok_or_else(|| {
            UpdateError::Verify("internal: no Info from before the update".to_owned())
        })
    }

    fn state_path(&self, info: &InfoResponse) -> PathBuf {
        if let Some(p) = &self.args.state {
            return p.clone();
        }
        let api = info
            .config
            .as_ref()
            .map(|c| c.api_socket.clone())
            .filter(|s| !s.is_empty())
            .map_or_else(|| self.socket.clone(), PathBuf::from);
        let mut s = api.into_os_string();
        s.push(".cpr-state");
        PathBuf::from(s)
    }

    async fn preflight(&mut self) -> Result<Option<String>, UpdateError> {
        let mut vmm = self.connect().await?;
        let info = vmm
            .info(InfoRequest {})
            .await
            .map_err(|s| UpdateError::Rpc(ClientError::rpc("info", s)))?
            .into_inner();
        self.report.pid = info.pid;
        self.report.old_version = info.version.clone();
        self.report.old_executable = info.executable.clone();
        self.report.generation_before = info.update_generation;
        self.report.run_state_before = run_state_name(info.run_state);
        self.report.state_path = self.state_path(&info).display().to_string();
        let state = RunState::try_from(info.run_state).unwrap_or(RunState::Unspecified);
        self.before = Some(info.clone());
        if !matches!(
            state,
            RunState::Running | RunState::Paused | RunState::Suspended
        ) {
            return Err(UpdateError::NotUpdatable {
                run_state: run_state_name(info.run_state),
            });
        }
        if !info.cpr_exec_blockers.is_empty() {
            return Err(UpdateError::Blocked {
                blockers: info.cpr_exec_blockers.clone(),
            });
        }
        check_executable(&self.args.binary)?;
        let answer = probe(
            &self.args.binary,
            &[
                "--check-state-version".to_owned(),
                info.state_format_version.to_string(),
            ],
        )
        .await?;
        if !answer.success {
            return Err(UpdateError::StateVersionRefused {
                path: self.args.binary.clone(),
                version: info.state_format_version,
                answer: answer.text,
            });
        }
        let version = probe(&self.args.binary, &["--version".to_owned()]).await?;
        if !version.success {
            return Err(UpdateError::Probe {
                command: format!("{} --version", self.args.binary.display()),
                detail: format!("it failed: {}", version.text),
            });
        }
        let expected = parse_version(&version.text).ok_or_else(|| UpdateError::Probe {
            command: format!("{} --version", self.args.binary.display()),
            detail: format!("it printed no version: {:?}", version.text),
        })?;
        self.report.expected_version = Some(expected.clone());
        self.previous_params = Some(
            vmm.get_migration_parameters(GetMigrationParametersRequest {})
                .await
                .map_err(|s| UpdateError::Rpc(ClientError::rpc("get-migration-parameters", s)))?
                .into_inner(),
        );
        Ok(Some(format!(
            "vmmd {} (pid {}, {}) -> {} ({expected}), reads state format v{}",
            info.version,
            info.pid,
            run_state_name(info.run_state),
            self.args.binary.display(),
            info.state_format_version
        )))
    }

    fn exec_args(&self) -> Result<Vec<String>, UpdateError> {
        let info = self.before()?;
        let carried = carried_flags(&read_cmdline(info.pid));
        Ok(new_command_line(
            &self.args.binary,
            info,
            &PathBuf::from(&self.report.state_path),
            self.args.load,
            self.args.incoming_deadline,
            &carried,
            &self.args.new_args,
        ))
    }

    async fn set_mode(&mut self) -> Result<Option<String>, UpdateError> {
        let exec_args = self.exec_args()?;
        let mut vmm = self.connect().await?;
        let params = MigrationParameters {
            mode: MigrationMode::CprExec as i32,
            exec_args: exec_args.clone(),
        };
        vmm.set_migration_parameters(params)
            .await
            .map_err(|s| UpdateError::Rpc(ClientError::rpc("set-migration-parameters", s)))?;
        self.mode_set = true;
        Ok(Some(exec_args.join(" ")))
    }

    async fn exec(&mut self) -> Result<Option<String>, UpdateError> {
        let mut vmm = self.connect().await?;
        let uri = format!("file:{}", self.report.state_path);
        let call = tokio::spawn(async move { vmm.migrate(MigrateRequest { uri }).await });
        if self.args.die_at == Some(DiePoint::DuringExec) {
            // Let the request leave before dying.
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.die_if(DiePoint::DuringExec);
        }
        let answer = call.await.map_err(|e| {
            UpdateError::Rpc(ClientError::rpc(
                "migrate",
                tonic::Status::unknown(format!("request task failed: {e}")),
            ))
        })?;
        match answer {
            // The process that answered is the one that was asked: the exec did not happen.
            Ok(r) => Ok(Some(format!(
                "vmmd answered Migrate with {:?}; checking what runs now",
                r.into_inner().status
            ))),
            Err(status) if is_refusal(status.code()) => Err(UpdateError::Refused {
                code: code_name(status.code()),
                message: status.message().to_owned(),
            }),
            // Either the exec happened (the connection closed) or it failed after the pause:
            // the next step asks the process on the socket which.
            Err(status) => Ok(Some(format!(
                "Migrate ended with {} ({}); the closed connection of a replaced process looks \
                 like this too: asking the process on the socket",
                code_name(status.code()),
                status.message()
            ))),
        }
    }

    /// Polls Info on the inherited socket until the process there says what happened.
    ///
    /// `waiting_ok`: a new process still in `inmigrate` counts as arrived (deferred, before
    /// migrate-incoming); otherwise it is still loading.
    async fn arrival(&mut self, waiting_ok: bool) -> Result<Arrival, UpdateError> {
        let before = self.before()?.clone();
        let timeout = Duration::from_secs(self.args.timeout);
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            match tokio::time::timeout(POLL_CALL_TIMEOUT, info_once(&self.socket)).await {
                Ok(Ok(info)) => {
                    let status = info.update_status.as_str();
                    let inmigrate = info.run_state == RunState::Inmigrate as i32;
                    if status.starts_with("cpr-exec failed") {
                        return Ok(Arrival::Failed(info));
                    }
                    if status.starts_with("rolled back") && !inmigrate {
                        self.image_changed = true;
                        return Ok(Arrival::RolledBack(info));
                    }
                    if info.update_generation == before.update_generation + 1 {
                        self.image_changed = true;
                        // Deferred: the new process waits for migrate-incoming. At start: it is
                        // still loading.
                        if !inmigrate || waiting_ok {
                            return Ok(Arrival::NewProcess(info));
                        }
                    }
                    last = format!(
                        "{} generation {} status {:?}",
                        run_state_name(info.run_state),
                        info.update_generation,
                        info.update_status
                    );
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("no answer within {}s", POLL_CALL_TIMEOUT.as_secs()),
            }
            if Instant::now() >= deadline {
                return Err(UpdateError::NoAnswer { timeout, last });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn wait_new_process(&mut self) -> Result<Option<String>, UpdateError> {
        let waiting_ok = self.args.load == Load::Deferred;
        match self.arrival(waiting_ok).await? {
            Arrival::NewProcess(info) => Ok(Some(format!(
                "vmmd {} answers (pid {}, {}, generation {})",
                info.version,
                info.pid,
                run_state_name(info.run_state),
                info.update_generation
            ))),
            Arrival::RolledBack(info) => Err(UpdateError::RolledBack {
                reason: strip(&info.update_status, "rolled back to this binary: "),
            }),
            Arrival::Failed(info) => Err(UpdateError::FailedBeforeExec {
                reason: strip(&info.update_status, "cpr-exec failed: "),
            }),
        }
    }

    async fn migrate_incoming(&mut self) -> Result<Option<String>, UpdateError> {
        let mut vmm = self.connect().await?;
        let uri = format!("file:{}", self.report.state_path);
        let answer = vmm.migrate_incoming(MigrateIncomingRequest { uri }).await;
        if let Err(status) = answer {
            // A load failure makes vmmd roll back; find out where the guest is.
            return match self.arrival(false).await? {
                Arrival::RolledBack(info) => Err(UpdateError::RolledBack {
                    reason: strip(&info.update_status, "rolled back to this binary: "),
                }),
                _ => Err(UpdateError::Rpc(ClientError::rpc(
                    "migrate-incoming",
                    status,
                ))),
            };
        }
        Ok(None)
    }

    async fn verify(&mut self) -> Result<Option<String>, UpdateError> {
        let before = self.before()?.clone();
        // At start the new process resumes by itself; deferred, migrate-incoming returned after it.
        let info = match self.arrival(false).await? {
            Arrival::NewProcess(info) => info,
            Arrival::RolledBack(info) => {
                return Err(UpdateError::RolledBack {
                    reason: strip(&info.update_status, "rolled back to this binary: "),
                })
            }
            Arrival::Failed(info) => {
                return Err(UpdateError::FailedBeforeExec {
                    reason: strip(&info.update_status, "cpr-exec failed: "),
                })
            }
        };
        let mut vmm = self.connect().await?;
        let migration: MigrationInfo = vmm
            .query_migrate(QueryMigrateRequest {})
            .await
            .map_err(|s| UpdateError::Rpc(ClientError::rpc("query-migrate", s)))?
            .into_inner();
        self.note_after(&info);
        if migration.mode == MigrationMode::CprExec as i32 {
            self.report.vmmd_pause_micros = Some(migration.downtime_micros);
            self.report.phases = phase_views(&migration.phases);
        }
        let mut problems = Vec::new();
        if info.pid != before.pid {
            problems.push(format!("pid changed from {} to {}", before.pid, info.pid));
        }
        if info.update_generation != before.update_generation + 1 {
            problems.push(format!(
                "generation is {}, expected {}",
                info.update_generation,
                before.update_generation + 1
            ));
        }
        if self.report.expected_version.as_deref() != Some(info.version.as_str()) {
            problems.push(format!(
                "version is {}, but {} --version said {}",
                info.version,
                self.args.binary.display(),
                self.report.expected_version.as_deref().unwrap_or("?")
            ));
        }
        if info.run_state != before.run_state {
            problems.push(format!(
                "guest is {}, was {}",
                run_state_name(info.run_state),
                run_state_name(before.run_state)
            ));
        }
        if let (Ok(want), false) = (
            std::fs::canonicalize(&self.args.binary),
            info.executable.is_empty(),
        ) {
            if Path::new(&info.executable) != want {
                problems.push(format!(
                    "vmmd runs {}, not {}",
                    info.executable,
                    want.display()
                ));
            }
        }
        if migration.mode != MigrationMode::CprExec as i32 {
            problems.push("the new vmmd reports no cpr-exec migration".to_owned());
        }
        if !problems.is_empty() {
            return Err(UpdateError::Verify(problems.join("; ")));
        }
        Ok(Some(format!(
            "pid {}, generation {}, vmmd {}, {}, guest paused {}",
            info.pid,
            info.update_generation,
            info.version,
            run_state_name(info.run_state),
            format_micros(migration.downtime_micros)
        )))
    }

    fn note_after(&mut self, info: &InfoResponse) {
        self.report.pid_after = Some(info.pid);
        self.report.new_version = Some(info.version.clone());
        self.report.new_executable = Some(info.executable.clone());
        self.report.generation_after = Some(info.update_generation);
        self.report.run_state_after = Some(run_state_name(info.run_state));
        self.report.guest_running = Some(info.run_state == RunState::Running as i32);
        self.report.update_status = Some(info.update_status.clone()).filter(|s| !s.is_empty());
    }

    /// Undoes what the done steps changed, then records where the guest is.
    async fn compensate(&mut self, error: &UpdateError) {
        let Some(before) = self.before.clone() else {
            return;
        };
        // After an exec that failed or was rolled back, wait until a process answers again.
        if matches!(error, UpdateError::NoAnswer { .. } | UpdateError::Rpc(_)) && self.mode_set {
            if let Ok(Arrival::RolledBack(_) | Arrival::NewProcess(_)) = self.arrival(false).await {
                self.image_changed = true;
            }
        }
        // Exec: vmmd resumes the guest when the exec fails; make sure it did.
        let after = match tokio::time::timeout(POLL_CALL_TIMEOUT, info_once(&self.socket)).await {
            Ok(Ok(info)) => Some(info),
            _ => None,
        };
        if let Some(info) = &after {
            if before.run_state == RunState::Running as i32
                && info.run_state == RunState::Paused as i32
            {
                self.log.emit(
                    Step::Exec.name(),
                    "compensating",
                    0,
                    Some("resuming the guest".into()),
                );
                let t = Instant::now();
                let r = match self.connect().await {
                    Ok(mut vmm) => vmm
                        .resume(ResumeRequest {})
                        .await
                        .map(|_| ())
                        .map_err(|s| s.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let detail = match r {
                    Ok(()) => "the guest was left paused; resumed it".to_owned(),
                    Err(e) => format!("cannot resume the guest: {e}"),
                };
                self.log.compensated(Step::Exec.name(), t, detail);
            }
        }
        // VFIO: vmmd undid its DMA step itself (re-mapped the containers it had invalidated, or,
        // in a new process, invalidated what it had re-mapped before rolling back): show it.
        let text = error.to_string();
        if let Some(at) = text.find("VFIO DMA ") {
            let t = Instant::now();
            self.log.emit("vfio-dma", "compensating", 0, None);
            let detail = match text[at..].split_once("; ") {
                Some((failed, undo)) => format!("{failed}: vmmd says {undo}"),
                None => text[at..].to_owned(),
            };
            self.log.compensated("vfio-dma", t, detail);
        }
        // Set mode: put the previous parameters back, on the process that has them.
        if self.mode_set && !self.image_changed {
            if let Some(prev) = self.previous_params.clone() {
                self.log.emit(Step::SetMode.name(), "compensating", 0, None);
                let t = Instant::now();
                let r = match self.connect().await {
                    Ok(mut vmm) => vmm
                        .set_migration_parameters(prev.clone())
                        .await
                        .map(|_| ())
                        .map_err(|s| s.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let detail = match r {
                    Ok(()) => format!(
                        "migration mode back to {}",
                        crate::output::mode_name(prev.mode)
                    ),
                    Err(e) => format!("cannot restore the migration mode: {e}"),
                };
                self.log.compensated(Step::SetMode.name(), t, detail);
            }
        }
        // Where the guest is now.
        if let Ok(Ok(info)) = tokio::time::timeout(POLL_CALL_TIMEOUT, info_once(&self.socket)).await
        {
            self.note_after(&info);
        }
    }
}

/// One Info call on a fresh connection (the previous process's connections die with the exec).
async fn info_once(socket: &Path) -> Result<InfoResponse, ClientError> {
    let mut vmm = client::connect(socket).await?;
    vmm.info(InfoRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| ClientError::rpc("info", s))
}

/// Codes vmmd uses when it refuses an update before pausing anything (a state file that cannot be
/// created is NOT_FOUND or PERMISSION_DENIED, but only after the pause: not a refusal).
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::FailedPrecondition | Code::InvalidArgument | Code::Unimplemented
    )
}

fn strip(s: &str, prefix: &str) -> String {
    s.strip_prefix(prefix).unwrap_or(s).to_owned()
}

fn check_executable(path: &Path) -> Result<(), UpdateError> {
    let meta = std::fs::metadata(path).map_err(|source| UpdateError::BinaryMissing {
        path: path.to_path_buf(),
        source,
    })?;
    let executable =
        meta.is_file() && nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok();
    if !executable {
        return Err(UpdateError::NotExecutable {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// The version in `vmmd --version` output (`vmmd 0.1.0` → `0.1.0`).
pub fn parse_version(text: &str) -> Option<String> {
    text.lines()
        .next()?
        .split_whitespace()
        .last()
        .map(str::to_owned)
}

/// vmmd's command line, from /proc (empty when it cannot be read: another host or user).
fn read_cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The flags of a running vmmd's command line that the new one should keep (log settings, policy);
/// the VM-shaping ones come from Info instead.
pub fn carried_flags(cmdline: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = cmdline.iter().skip(1);
    while let Some(a) = it.next() {
        if CARRIED_SWITCHES.contains(&a.as_str()) {
            out.push(a.clone());
        } else if CARRIED_FLAGS_WITH_VALUE.contains(&a.as_str()) {
            if let Some(v) = it.next() {
                out.push(a.clone());
                out.push(v.clone());
            }
        } else if CARRIED_FLAGS_WITH_VALUE
            .iter()
            .any(|f| a.strip_prefix(f).is_some_and(|r| r.starts_with('=')))
        {
            out.push(a.clone());
        }
    }
    out
}

/// The new vmmd's argv: NEW, the VM as Info describes it, carried flags, and how to come in.
pub fn new_command_line(
    binary: &Path,
    info: &InfoResponse,
    state: &Path,
    load: Load,
    incoming_deadline: u64,
    carried: &[String],
    extra: &[String],
) -> Vec<String> {
    let mut argv = vec![binary.display().to_string()];
    let config = info.config.clone().unwrap_or_default();
    argv.extend(["--api-socket".to_owned(), config.api_socket.clone()]);
    if !config.kernel.is_empty() {
        argv.extend(["--kernel".to_owned(), config.kernel.clone()]);
    }
    if !config.cmdline.is_empty() {
        argv.extend(["--cmdline".to_owned(), config.cmdline.clone()]);
    }
    argv.extend(["--vcpus".to_owned(), config.vcpus.to_string()]);
    let mut memory = format!("size={}", config.memory_bytes);
    if !config.memory_path.is_empty() {
        let _ = write!(memory, ",path={}", config.memory_path);
    }
    argv.extend(["--memory".to_owned(), memory]);
    if !config.serial.is_empty() {
        argv.extend(["--serial".to_owned(), config.serial.clone()]);
    }
    let mut carried = carried.to_vec();
    if load == Load::Deferred {
        // This update's deadline replaces the running vmmd's.
        let mut keep = Vec::new();
        let mut it = carried.iter();
        while let Some(a) = it.next() {
            if a == "--cpr-incoming-timeout" {
                it.next();
            } else if !a.starts_with("--cpr-incoming-timeout=") {
                keep.push(a.clone());
            }
        }
        carried = keep;
    }
    argv.extend(carried);
    match load {
        Load::AtStart => {
            argv.extend(["--incoming".to_owned(), format!("file:{}", state.display())]);
        }
        Load::Deferred => {
            argv.extend([
                "--incoming".to_owned(),
                "defer".to_owned(),
                "--cpr-incoming-timeout".to_owned(),
                incoming_deadline.to_string(),
            ]);
        }
    }
    argv.extend(extra.iter().cloned());
    argv
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmmd_proto::v1::VmConfig;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    fn info() -> InfoResponse {
        InfoResponse {
            run_state: RunState::Running as i32,
            version: "0.1.0".into(),
            pid: 42,
            config: Some(VmConfig {
                vcpus: 2,
                memory_bytes: 256 << 20,
                memory_path: String::new(),
                kernel: "/k".into(),
                serial: "socket=/run/c.sock".into(),
                api_socket: "/run/api.sock".into(),
                ..VmConfig::default()
            }),
            state_format_version: 1,
            ..InfoResponse::default()
        }
    }

    #[test]
    fn new_command_line_rebuilds_the_vm_and_comes_in_from_the_state() {
        let argv = new_command_line(
            Path::new("/new/vmmd"),
            &info(),
            Path::new("/run/api.sock.cpr-state"),
            Load::AtStart,
            10,
            &s(&["--log-level", "debug"]),
            &[],
        );
        assert_eq!(
            argv,
            s(&[
                "/new/vmmd",
                "--api-socket",
                "/run/api.sock",
                "--kernel",
                "/k",
                "--vcpus",
                "2",
                "--memory",
                "size=268435456",
                "--serial",
                "socket=/run/c.sock",
                "--log-level",
                "debug",
                "--incoming",
                "file:/run/api.sock.cpr-state",
            ])
        );
        let mut file_backed = info();
        if let Some(c) = file_backed.config.as_mut() {
            c.memory_path = "/dev/shm/vm.ram".into();
        }
        let argv = new_command_line(
            Path::new("/new/vmmd"),
            &file_backed,
            Path::new("/st"),
            Load::Deferred,
            7,
            &s(&["--cpr-incoming-timeout", "30"]),
            &s(&["--fault-inject", "fail-load"]),
        );
        assert!(
            argv.contains(&"size=268435456,path=/dev/shm/vm.ram".to_owned()),
            "{argv:?}"
        );
        let tail = &argv[argv.len() - 6..];
        assert_eq!(
            tail,
            s(&[
                "--incoming",
                "defer",
                "--cpr-incoming-timeout",
                "7",
                "--fault-inject",
                "fail-load"
            ])
        );
        assert_eq!(
            argv.iter()
                .filter(|a| *a == "--cpr-incoming-timeout")
                .count(),
            1,
            "the update's deadline replaces the old one: {argv:?}"
        );
    }

    #[test]
    fn only_policy_and_log_flags_are_carried() {
        let cmd = s(&[
            "vmmd",
            "--api-socket",
            "/a",
            "--log-level=debug",
            "--log-json",
            "--incoming",
            "file:/x",
            "--fault-inject",
            "crash-during-load",
            "--only-cpr-capable",
            "--cpr-incoming-timeout",
            "5",
        ]);
        assert_eq!(
            carried_flags(&cmd),
            s(&[
                "--log-level=debug",
                "--log-json",
                "--only-cpr-capable",
                "--cpr-incoming-timeout",
                "5"
            ])
        );
        assert!(carried_flags(&[]).is_empty());
    }

    #[test]
    fn version_is_the_last_word_of_the_first_line() {
        assert_eq!(parse_version("vmmd 0.1.0\n"), Some("0.1.0".into()));
        assert_eq!(parse_version("vmmd 0.1.0+alt"), Some("0.1.0+alt".into()));
        assert_eq!(parse_version(""), None);
    }

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

    #[tokio::test]
    async fn missing_or_non_executable_binaries_are_refused_with_the_path() {
        let err = check_executable(Path::new("/nonexistent/vmmd")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/vmmd"), "{err}");
        assert!(err.to_string().contains("nothing was changed"), "{err}");
        let dir = std::env::temp_dir().join(format!("cprctl-upd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("plain");
        std::fs::write(&file, b"x").expect("write");
        let err = check_executable(&file).expect_err("not executable");
        assert!(matches!(err, UpdateError::NotExecutable { .. }), "{err}");
        let err = check_executable(&dir).expect_err("a directory");
        assert!(matches!(err, UpdateError::NotExecutable { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn progress_lines_name_the_step() {
        let e = ProgressEvent {
            step: Step::Exec.name(),
            what: Step::Exec.what(),
            index: 3,
            of: 5,
            status: "done",
            micros: 1500,
            detail: None,
        };
        assert_eq!(e.human(), "[3/5] exec done (1.500 ms)");
        let v = serde_json::to_value(&e).expect("json");
        assert_eq!(v["step"], "exec");
        assert_eq!(v["status"], "done");
        assert_eq!(
            serde_json::to_string(&e).expect("json"),
            r#"{"step":"exec","index":3,"of":5,"status":"done","micros":1500,"detail":null}"#
        );
        let started = ProgressEvent {
            status: "started",
            micros: 0,
            ..e
        };
        assert_eq!(
            started.human(),
            "[3/5] exec: pause, save state, exec the new binary ..."
        );
    }
}
