//! `cprctl reboot-prep` and `cprctl reboot-resume`: carry guests across a host (kexec) reboot in
//! cpr-reboot mode, as typed workflows.
//!
//! Guest RAM lives in a file that outlives the reboot (`--memory size=..,path=` on /dev/shm, a DAX
//! device or hugetlbfs). `reboot-prep` saves the vCPU/device state (no RAM) next to it and stops
//! vmmd; after the reboot a fresh vmmd started with the same configuration and `--incoming defer`
//! maps the same RAM file, and `reboot-resume` loads the state and lets the guest run on.
//!
//! `reboot-prep` steps, each undone in reverse when a later one fails:
//!
//! | step | what | compensation |
//! | --- | --- | --- |
//! | `preflight` | vmmd reachable, guest running/paused/suspended, no cpr-reboot blockers, RAM file present, state directory writable, no unresumed marker | nothing changed |
//! | `suspend` | only with `--suspend`/`--suspend-command`: ask the guest to enter S3, wait for `suspended` | system-wakeup |
//! | `set-mode` | migration mode `cpr-reboot` | the previous migration parameters |
//! | `save` | Migrate `file:STATE`: vmmd pauses, fsyncs the RAM file, writes the state (fsync), VM `postmigrate` | resume the guest (vmmd resumes it itself when the save fails) |
//! | `marker` | `STATE.marker.json` (what ran, how, when) and `STATE.env` (`VMMD_INCOMING=--incoming defer` for the systemd unit) | both removed |
//! | `quit` | Quit: vmmd exits, the guest is stopped. **Point of no return.** | none |
//!
//! `reboot-resume` steps: `preflight` (marker and state file present, vmmd in `inmigrate` with the
//! saved configuration, its binary reads the state's format version), `migrate-incoming`, `wakeup`
//! (when the guest comes back `suspended`), `verify` (the runstate the guest had before the prep;
//! the marker is renamed to `STATE.resumed.json` and the env file removed). Nothing before
//! `migrate-incoming` changes anything, so a failed resume can be retried once the cause is fixed.
//!
//! `--all` runs the workflow for every vmmd whose API socket is `<socket-dir>/<name>.sock`, with
//! the state in `<state-dir>/<name>.state`, at most `--jobs` at a time.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmmd_proto::v1::{
    GetMigrationParametersRequest, InfoRequest, InfoResponse, MigrateIncomingRequest,
    MigrateRequest, MigrationMode, MigrationParameters, MigrationStatus, QuitRequest,
    ResumeRequest, RunState, SystemWakeupRequest,
};

use crate::client::{self, Client, ClientError};
use crate::output::{format_micros, run_state_name, PhaseView, Render};
use crate::workflow::{
    self, eprint_json, micros, phase_views, probe, render_steps, ProbeError, StepLog, StepRecord,
    PROBE_TIMEOUT,
};

/// Default directory of the vmmd API sockets (`vmmd@NAME` serves `/run/vmmd/NAME.sock`).
pub const DEFAULT_SOCKET_DIR: &str = "/run/vmmd";
/// Default directory of the cpr-reboot state files and markers.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmmd/cpr";
/// How long one Info/connect may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between polls.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// What vmmd writes to a second console client before closing it.
const CONSOLE_BUSY: &[u8] = b"vmmd: console busy";
/// Format of the marker file.
const MARKER_FORMAT: u32 = 1;

/// Where the VMs are, for `--all` (and the default state path of a single VM).
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// Act on every vmmd whose API socket is `<socket-dir>/<name>.sock`.
    #[arg(long)]
    pub all: bool,
    /// `--all`: where the vmmd API sockets are.
    #[arg(long, default_value = DEFAULT_SOCKET_DIR, value_name = "DIR")]
    pub socket_dir: PathBuf,
    /// Where state files go: `<state-dir>/<name>.state` (and the default of `--state`).
    #[arg(long, default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// `--all`: how many VMs at a time.
    #[arg(long, default_value_t = 4, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: u16,
}

/// Options of `cprctl reboot-prep`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrepArgs {
    /// The state file (default `<state-dir>/<socket name>.state`); not with `--all`.
    #[arg(long, value_name = "FILE", conflicts_with = "all")]
    pub state: Option<PathBuf>,
    /// Where the VMs are.
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Ask the guest to suspend (S3) before saving; the test guest is asked on its console socket.
    #[arg(long)]
    pub suspend: bool,
    /// Ask the guest to suspend by running this shell command instead of using the console (e.g. a
    /// guest-agent call); $VMMD_SOCKET, $VMMD_NAME and $VMMD_CONSOLE are set. Implies --suspend.
    #[arg(long, value_name = "CMD")]
    pub suspend_command: Option<String>,
    /// Seconds to wait for the guest to reach `suspended`.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub suspend_timeout: u64,
    /// Seconds to wait for vmmd to exit after Quit.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub quit_timeout: u64,
    /// Test hook: fail this step before it runs, to exercise the rollback.
    #[arg(long, hide = true, value_enum, value_name = "STEP")]
    pub inject_failure: Option<PrepStep>,
}

impl PrepArgs {
    fn wants_suspend(&self) -> bool {
        self.suspend || self.suspend_command.is_some()
    }
}

/// Options of `cprctl reboot-resume`.
#[derive(Debug, Clone, clap::Args)]
pub struct ResumeArgs {
    /// The state file written by reboot-prep (default `<state-dir>/<socket name>.state`); not with `--all`.
    #[arg(long, value_name = "FILE", conflicts_with = "all")]
    pub state: Option<PathBuf>,
    /// Where the VMs are.
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Seconds to wait for the guest to run after the load.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub timeout: u64,
}

/// `reboot-prep` steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PrepStep {
    /// Checks that change nothing.
    Preflight,
    /// The guest enters S3.
    Suspend,
    /// Migration mode cpr-reboot.
    SetMode,
    /// Migrate file:STATE (VM stops).
    Save,
    /// Marker and env file next to the state.
    Marker,
    /// vmmd exits.
    Quit,
}

impl PrepStep {
    /// Name as printed.
    pub fn name(self) -> &'static str {
        match self {
            Self::Preflight => "preflight",
            Self::Suspend => "suspend",
            Self::SetMode => "set-mode",
            Self::Save => "save",
            Self::Marker => "marker",
            Self::Quit => "quit",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::Preflight => "checking vmmd, blockers, RAM file and state directory",
            Self::Suspend => "asking the guest to suspend (S3)",
            Self::SetMode => "setting migration mode cpr-reboot",
            Self::Save => "pause, fsync guest RAM, save state",
            Self::Marker => "writing the resume marker",
            Self::Quit => "stopping vmmd (point of no return)",
        }
    }
}

/// `reboot-resume` steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResumeStep {
    /// Checks that change nothing.
    Preflight,
    /// MigrateIncoming file:STATE.
    MigrateIncoming,
    /// SystemWakeup of a suspended guest.
    Wakeup,
    /// The guest runs; the marker is retired.
    Verify,
}

impl ResumeStep {
    /// Name as printed.
    pub fn name(self) -> &'static str {
        match self {
            Self::Preflight => "preflight",
            Self::MigrateIncoming => "migrate-incoming",
            Self::Wakeup => "wakeup",
            Self::Verify => "verify",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::Preflight => "checking the marker, the state file and the waiting vmmd",
            Self::MigrateIncoming => "loading the state into vmmd",
            Self::Wakeup => "waking the suspended guest",
            Self::Verify => "verifying the guest runs; retiring the marker",
        }
    }
}

/// Why a reboot workflow did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RebootError {
    /// vmmd could not be reached.
    #[error(transparent)]
    Unreachable(ClientError),
    /// vmmd returned an error to a request of the workflow.
    #[error(transparent)]
    Rpc(ClientError),
    /// The guest is in a runstate reboot-prep cannot start from.
    #[error("vmmd is {run_state}: reboot-prep needs a running, paused or suspended guest")]
    NotPreparable {
        /// The runstate.
        run_state: &'static str,
    },
    /// vmmd reports cpr-reboot blockers.
    #[error("cpr-reboot is blocked: {}", blockers.join("; "))]
    Blocked {
        /// vmmd's blockers.
        blockers: Vec<String>,
    },
    /// The RAM file vmmd reports is not there.
    #[error("guest RAM file {}: {source}; the guest's RAM must be in a file that survives the reboot", path.display())]
    RamFile {
        /// The RAM file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The state file cannot be written.
    #[error("cannot write the state file {}: {detail}; create the directory or pick a writable --state/--state-dir", path.display())]
    StateNotWritable {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A marker of an earlier, unresumed prep is in the way.
    #[error("{} is there from an earlier reboot-prep that was not resumed: run reboot-resume for it, or remove it (and {}) if that guest is gone", marker.display(), state.display())]
    MarkerExists {
        /// The marker.
        marker: PathBuf,
        /// Its state file.
        state: PathBuf,
    },
    /// There is no way to ask the guest to suspend.
    #[error("cannot ask the guest to suspend: its serial console is {serial:?}, not `socket=PATH`; give --suspend-command CMD (e.g. a guest-agent call) instead")]
    NoSuspendChannel {
        /// The serial backend.
        serial: String,
    },
    /// The console could not be used to ask the guest to suspend.
    #[error("cannot ask the guest to suspend on console {}: {detail}", path.display())]
    Console {
        /// The console socket.
        path: PathBuf,
        /// What happened.
        detail: String,
    },
    /// The suspend command failed.
    #[error("suspend command `{command}` failed: {detail}")]
    SuspendCommand {
        /// The command.
        command: String,
        /// What happened.
        detail: String,
    },
    /// The guest did not suspend in time.
    #[error("the guest did not reach `suspended` within {secs}s (it is {run_state}); does it honour the suspend request? raise --suspend-timeout or prep without --suspend")]
    SuspendTimeout {
        /// The timeout.
        secs: u64,
        /// The runstate seen last.
        run_state: &'static str,
    },
    /// vmmd could not save the state.
    #[error("vmmd could not save the state to {}: {message}", path.display())]
    SaveFailed {
        /// The state file.
        path: PathBuf,
        /// vmmd's message.
        message: String,
    },
    /// The marker or env file could not be written, read or retired.
    #[error("{op} {}: {source}", path.display())]
    MarkerIo {
        /// What was done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A test hook failed a step on purpose.
    #[error("injected failure before step {0} (test hook)")]
    Injected(&'static str),
    /// vmmd did not exit after Quit.
    #[error("vmmd (pid {pid}) did not exit within {secs}s of Quit; the state is saved and the guest is stopped: kill it (SIGKILL) before the reboot")]
    QuitTimeout {
        /// vmmd's pid.
        pid: u32,
        /// The timeout.
        secs: u64,
    },
    /// No marker for this state file.
    #[error("no reboot marker {}: {source}; was `cprctl reboot-prep` run for this VM with this --state?", path.display())]
    MarkerMissing {
        /// The marker.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The marker cannot be parsed.
    #[error("reboot marker {} is not valid: {detail}", path.display())]
    MarkerInvalid {
        /// The marker.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The state file is missing or unreadable.
    #[error("state file {}: {detail}; it is written by reboot-prep and must survive the reboot", path.display())]
    StateFile {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// vmmd is not waiting for an incoming migration.
    #[error("vmmd is {run_state}, not inmigrate: start it with the VM's configuration and `--incoming defer` (the vmmd@ unit adds it while {} exists)", env.display())]
    NotIncoming {
        /// The runstate.
        run_state: &'static str,
        /// The env file the unit reads.
        env: PathBuf,
    },
    /// The waiting vmmd does not run the saved VM's configuration.
    #[error("the waiting vmmd does not match the saved guest: {0}; restart it with the VM's configuration and `--incoming defer`")]
    ConfigMismatch(String),
    /// The waiting vmmd's binary cannot read the state.
    #[error("vmmd {} cannot read state format version {version} of {} ({answer}); start a vmmd build that reads it and retry", executable.display(), state.display())]
    StateVersionRefused {
        /// The waiting vmmd's binary.
        executable: PathBuf,
        /// The state file.
        state: PathBuf,
        /// The state file's format version.
        version: u32,
        /// What the binary printed.
        answer: String,
    },
    /// The binary could not be asked.
    #[error("cannot run `{command}`: {detail}")]
    Probe {
        /// The command line.
        command: String,
        /// What happened.
        detail: String,
    },
    /// vmmd could not load the state.
    #[error("vmmd could not load {}: {message}", path.display())]
    LoadFailed {
        /// The state file.
        path: PathBuf,
        /// vmmd's message.
        message: String,
    },
    /// The guest is not in the runstate it had before the prep.
    #[error("after the load the guest is {run_state}, expected {expected}")]
    NotResumed {
        /// The runstate.
        run_state: &'static str,
        /// What it should be.
        expected: String,
    },
    /// `--all`: the socket directory cannot be listed.
    #[error("cannot list the vmmd sockets in {}: {source}; give --socket-dir", dir.display())]
    Discover {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `--all`: a marker without a vmmd.
    #[error("a guest was saved for {name} ({}) but no vmmd serves {}: start vmmd@{name} (it comes up with --incoming defer)", marker.display(), socket.display())]
    NoVmmd {
        /// The VM's name.
        name: String,
        /// Its marker.
        marker: PathBuf,
        /// The socket expected.
        socket: PathBuf,
    },
    /// The workflow task died.
    #[error("internal: the workflow task for {name} failed: {detail}")]
    Task {
        /// The VM.
        name: String,
        /// What happened.
        detail: String,
    },
}

/// One VM to act on.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its name (the socket's file stem).
    pub name: String,
    /// Its API socket.
    pub socket: PathBuf,
    /// Its state file.
    pub state: PathBuf,
}

impl Target {
    /// The target for `socket`, with `state` or `<state_dir>/<socket stem>.state`.
    pub fn new(socket: &Path, state: Option<&Path>, state_dir: &Path) -> Self {
        let name = socket_name(socket);
        let state = state.map_or_else(
            || state_dir.join(format!("{name}.state")),
            Path::to_path_buf,
        );
        Self {
            name,
            socket: socket.to_path_buf(),
            state,
        }
    }

    /// The marker next to the state file.
    pub fn marker(&self) -> PathBuf {
        suffixed(&self.state, ".marker.json")
    }

    /// The environment file for the systemd unit next to the state file.
    pub fn env(&self) -> PathBuf {
        suffixed(&self.state, ".env")
    }

    /// Where the marker goes once resumed.
    pub fn resumed_marker(&self) -> PathBuf {
        suffixed(&self.state, ".resumed.json")
    }
}

fn socket_name(socket: &Path) -> String {
    socket
        .file_stem()
        .map_or_else(|| "vm".to_owned(), |s| s.to_string_lossy().into_owned())
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// What reboot-prep leaves next to the state file so the next boot knows what to resume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Marker {
    /// Marker format, 1.
    pub format: u32,
    /// The VM's name.
    pub name: String,
    /// vmmd's API socket.
    pub socket: String,
    /// The state file.
    pub state: String,
    /// When the marker was written (unix microseconds).
    pub created_unix_micros: u64,
    /// When the save completed: the guest is stopped from here (unix microseconds).
    pub guest_stopped_unix_micros: u64,
    /// The vmmd that saved the guest.
    pub vmmd_version: String,
    /// Its binary.
    pub vmmd_executable: String,
    /// Its pid.
    pub vmmd_pid: u32,
    /// The state-file format version it wrote.
    pub state_format_version: u32,
    /// The host kernel before the reboot.
    pub host_kernel: String,
    /// The guest's runstate before reboot-prep.
    pub run_state_before: String,
    /// The runstate saved in the state file.
    pub run_state_saved: String,
    /// Whether reboot-prep suspended the guest (reboot-resume wakes it).
    pub suspended_by_prep: bool,
    /// The VM's configuration as vmmd reported it.
    pub config: MarkerConfig,
}

/// The VM configuration in a [`Marker`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MarkerConfig {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub memory_bytes: u64,
    /// The RAM file.
    pub memory_path: String,
    /// Guest kernel.
    pub kernel: String,
    /// Kernel command line.
    pub cmdline: String,
    /// Serial backend.
    pub serial: String,
    /// API socket.
    pub api_socket: String,
}

impl Marker {
    /// Reads and parses a marker.
    pub fn read(path: &Path) -> Result<Self, RebootError> {
        let text = std::fs::read_to_string(path).map_err(|source| RebootError::MarkerMissing {
            path: path.to_path_buf(),
            source,
        })?;
        let marker: Marker =
            serde_json::from_str(&text).map_err(|e| RebootError::MarkerInvalid {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        if marker.format != MARKER_FORMAT {
            return Err(RebootError::MarkerInvalid {
                path: path.to_path_buf(),
                detail: format!(
                    "format {}, this cprctl reads {MARKER_FORMAT}",
                    marker.format
                ),
            });
        }
        Ok(marker)
    }
}

/// A progress event of one VM's workflow.
#[derive(Debug, Clone, Serialize)]
pub struct ProgressEvent {
    /// `reboot-prep` or `reboot-resume`.
    pub workflow: &'static str,
    /// The VM.
    pub vm: String,
    /// The step's event.
    #[serde(flatten)]
    pub event: workflow::ProgressEvent,
}

impl ProgressEvent {
    /// One human line.
    pub fn human(&self) -> String {
        let mut s = format!(
            "cprctl {} {}: {}",
            self.workflow,
            self.vm,
            self.event.head()
        );
        if self.event.status == "started" {
            s.push_str(" ...");
        }
        if let Some(d) = &self.event.detail {
            let _ = write!(s, ": {d}");
        }
        s
    }
}

/// Where progress goes: stderr as text or JSON lines, or nowhere.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// Discard.
    Quiet,
    /// Human lines on stderr.
    Text,
    /// JSON lines on stderr.
    Json,
}

impl Progress {
    fn event(self, e: &ProgressEvent) {
        match self {
            Self::Quiet => {}
            Self::Text => eprintln!("{}", e.human()),
            Self::Json => eprint_json(e),
        }
    }
}

/// Progress of one VM's workflow: its steps' events, named after the workflow and the VM.
struct VmProgress {
    workflow: &'static str,
    vm: String,
    progress: Progress,
}

impl workflow::Progress for VmProgress {
    fn event(&mut self, e: &workflow::ProgressEvent) {
        self.progress.event(&ProgressEvent {
            workflow: self.workflow,
            vm: self.vm.clone(),
            event: e.clone(),
        });
    }
}

/// What one VM's reboot-prep or reboot-resume did.
#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    /// `reboot-prep` or `reboot-resume`.
    pub workflow: &'static str,
    /// The VM's name.
    pub name: String,
    /// true when the workflow completed.
    pub ok: bool,
    /// prep: `prepared`, `refused` (nothing changed), `rolled-back` (guest back as before),
    /// `failed` (see error; guest not as before). resume: `resumed`, `refused` (nothing changed,
    /// retry after fixing), `failed`, `skipped` (`--all`: no marker for this vmmd).
    pub outcome: &'static str,
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
    fn new(workflow: &'static str, target: &Target) -> Self {
        Self {
            workflow,
            name: target.name.clone(),
            ok: false,
            outcome: "failed",
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
        matches!(self.outcome, "refused" | "rolled-back" | "skipped")
    }

    fn human_into(&self, s: &mut String) {
        let headline = match (self.workflow, self.outcome) {
            ("reboot-prep", "prepared") => format!(
                "{}: prepared: state saved to {}, vmmd stopped; after the reboot start vmmd with \
                 --incoming defer and run reboot-resume",
                self.name, self.state_path
            ),
            ("reboot-resume", "resumed") => format!(
                "{}: resumed from {} ({})",
                self.name,
                self.state_path,
                self.run_state_after.unwrap_or("?")
            ),
            (_, "skipped") => format!(
                "{}: skipped: {}",
                self.name,
                self.error.as_deref().unwrap_or("")
            ),
            (_, outcome) => format!(
                "{}: {} {outcome}: {}",
                self.name,
                self.workflow,
                self.error.as_deref().unwrap_or("")
            ),
        };
        let _ = writeln!(s, "{headline}");
        if let Some(us) = self.vmmd_micros {
            let what = if self.workflow == "reboot-prep" {
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
        if !self.ok && self.outcome != "skipped" {
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
    pub workflow: &'static str,
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

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, micros)
}

fn state_of(info: &InfoResponse) -> RunState {
    RunState::try_from(info.run_state).unwrap_or(RunState::Unspecified)
}

async fn connect(socket: &Path) -> Result<Client, RebootError> {
    match tokio::time::timeout(CALL_TIMEOUT, client::connect(socket)).await {
        Ok(r) => r.map_err(RebootError::Unreachable),
        Err(_) => Err(RebootError::Rpc(ClientError::rpc(
            "connect",
            tonic::Status::deadline_exceeded(format!(
                "no connection within {}s",
                CALL_TIMEOUT.as_secs()
            )),
        ))),
    }
}

async fn info(socket: &Path) -> Result<InfoResponse, RebootError> {
    let mut vmm = connect(socket).await?;
    match tokio::time::timeout(CALL_TIMEOUT, vmm.info(InfoRequest {})).await {
        Ok(r) => r
            .map(tonic::Response::into_inner)
            .map_err(|s| RebootError::Rpc(ClientError::rpc("info", s))),
        Err(_) => Err(RebootError::Rpc(ClientError::rpc(
            "info",
            tonic::Status::deadline_exceeded("no answer"),
        ))),
    }
}

/// The step log of one VM's workflow.
type Steps = StepLog<VmProgress>;

/// The step log of `workflow` for `target`, reporting to `progress`.
fn steps_of(
    workflow: &'static str,
    target: &Target,
    steps: Vec<(&'static str, &'static str)>,
    progress: Progress,
) -> Steps {
    StepLog::new(
        steps,
        VmProgress {
            workflow,
            vm: target.name.clone(),
            progress,
        },
    )
}

impl From<ProbeError> for RebootError {
    fn from(e: ProbeError) -> Self {
        RebootError::Probe {
            command: e.command,
            detail: e.detail,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// reboot-prep

struct Prep<'a> {
    target: Target,
    args: &'a PrepArgs,
    steps: Steps,
    report: VmReport,
    before: Option<InfoResponse>,
    previous_params: Option<MigrationParameters>,
    suspended_by_us: bool,
    mode_set: bool,
    saved: bool,
    stopped_at_unix: u64,
    marker_written: bool,
}

/// Runs reboot-prep for one VM.
pub async fn prep(target: Target, args: &PrepArgs, progress: Progress) -> VmReport {
    let mut steps = vec![PrepStep::Preflight];
    if args.wants_suspend() {
        steps.push(PrepStep::Suspend);
    }
    steps.extend([
        PrepStep::SetMode,
        PrepStep::Save,
        PrepStep::Marker,
        PrepStep::Quit,
    ]);
    let started = Instant::now();
    let mut wf = Prep {
        report: VmReport::new("reboot-prep", &target),
        steps: steps_of(
            "reboot-prep",
            &target,
            steps.iter().map(|s| (s.name(), s.what())).collect(),
            progress,
        ),
        target,
        args,
        before: None,
        previous_params: None,
        suspended_by_us: false,
        mode_set: false,
        saved: false,
        stopped_at_unix: 0,
        marker_written: false,
    };
    let mut result = Ok(());
    for step in steps {
        wf.steps
            .emit(step.name(), "started", 0, Some(step.what().to_owned()));
        let t = Instant::now();
        let r = if args.inject_failure == Some(step) {
            Err(RebootError::Injected(step.name()))
        } else {
            match step {
                PrepStep::Preflight => wf.preflight().await,
                PrepStep::Suspend => wf.suspend().await,
                PrepStep::SetMode => wf.set_mode().await,
                PrepStep::Save => wf.save().await,
                PrepStep::Marker => wf.marker().await,
                PrepStep::Quit => wf.quit().await,
            }
        };
        if let Err(e) = wf.steps.finish(step.name(), t, r) {
            result = Err((step, e));
            break;
        }
    }
    match result {
        Ok(()) => {
            wf.report.ok = true;
            wf.report.outcome = "prepared";
            wf.report.suspended = wf.suspended_by_us;
        }
        Err((step, e)) => {
            wf.compensate().await;
            wf.report.outcome = match step {
                PrepStep::Preflight => "refused",
                PrepStep::Quit if !matches!(e, RebootError::Injected(_)) => "failed",
                _ if wf.report.run_state_after == wf.report.run_state_before => "rolled-back",
                _ => "failed",
            };
            wf.report.error = Some(e.to_string());
        }
    }
    wf.report.steps = std::mem::take(&mut wf.steps.records);
    wf.report.total_micros = micros(started.elapsed());
    wf.report
}

impl Prep<'_> {
    async fn preflight(&mut self) -> Result<Option<String>, RebootError> {
        let info = info(&self.target.socket).await?;
        self.report.pid = Some(info.pid);
        self.report.version = Some(info.version.clone());
        self.report.state_format_version = Some(info.state_format_version);
        self.report.run_state_before = Some(run_state_name(info.run_state));
        self.report.run_state_after = Some(run_state_name(info.run_state));
        self.before = Some(info.clone());
        if !matches!(
            state_of(&info),
            RunState::Running | RunState::Paused | RunState::Suspended
        ) {
            return Err(RebootError::NotPreparable {
                run_state: run_state_name(info.run_state),
            });
        }
        // Blockers that suspending clears are checked again by vmmd after the suspend step.
        let blockers: Vec<String> = info
            .cpr_reboot_blockers
            .iter()
            .filter(|b| {
                !(self.args.wants_suspend()
                    && info.cpr_reboot_blockers_cleared_by_suspend.contains(b))
            })
            .cloned()
            .collect();
        if !blockers.is_empty() {
            return Err(RebootError::Blocked { blockers });
        }
        let config = info.config.clone().unwrap_or_default();
        let ram = PathBuf::from(&config.memory_path);
        let meta = std::fs::metadata(&ram).map_err(|source| RebootError::RamFile {
            path: ram.clone(),
            source,
        })?;
        check_state_writable(&self.target.state)?;
        let marker = self.target.marker();
        if marker.exists() {
            return Err(RebootError::MarkerExists {
                marker,
                state: self.target.state.clone(),
            });
        }
        let mut vmm = connect(&self.target.socket).await?;
        self.previous_params = Some(
            vmm.get_migration_parameters(GetMigrationParametersRequest {})
                .await
                .map_err(|s| RebootError::Rpc(ClientError::rpc("get-migration-parameters", s)))?
                .into_inner(),
        );
        Ok(Some(format!(
            "vmmd {} (pid {}, {}), RAM {} ({} bytes), state -> {}",
            info.version,
            info.pid,
            run_state_name(info.run_state),
            ram.display(),
            meta.len(),
            self.target.state.display()
        )))
    }

    async fn suspend(&mut self) -> Result<Option<String>, RebootError> {
        let before = self.before.clone().unwrap_or_default();
        if state_of(&before) == RunState::Suspended {
            return Ok(Some("the guest is already suspended".to_owned()));
        }
        if state_of(&before) == RunState::Paused {
            // A paused guest cannot act on a request; it is saved as it is.
            return Ok(Some(
                "the guest is paused and cannot act on a suspend request; saving it paused"
                    .to_owned(),
            ));
        }
        let config = before.config.clone().unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(self.args.suspend_timeout);
        // Held until the guest is suspended: closing it early could lose the request.
        let mut _console = None;
        let how = if let Some(cmd) = &self.args.suspend_command {
            run_suspend_command(cmd, &self.target, &config.serial).await?;
            format!("`{cmd}`")
        } else {
            let Some(path) = config.serial.strip_prefix("socket=").map(PathBuf::from) else {
                return Err(RebootError::NoSuspendChannel {
                    serial: config.serial.clone(),
                });
            };
            _console = Some(ask_console_to_suspend(&path).await?);
            format!("`s` on console {}", path.display())
        };
        self.suspended_by_us = true;
        loop {
            let now = info(&self.target.socket).await?;
            let last = state_of(&now);
            if last == RunState::Suspended {
                self.report.run_state_after = Some("suspended");
                return Ok(Some(format!("asked with {how}; the guest is suspended")));
            }
            if Instant::now() >= deadline {
                return Err(RebootError::SuspendTimeout {
                    secs: self.args.suspend_timeout,
                    run_state: run_state_name(last as i32),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn set_mode(&mut self) -> Result<Option<String>, RebootError> {
        let mut vmm = connect(&self.target.socket).await?;
        vmm.set_migration_parameters(MigrationParameters {
            mode: MigrationMode::CprReboot as i32,
            exec_args: Vec::new(),
        })
        .await
        .map_err(|s| RebootError::Rpc(ClientError::rpc("set-migration-parameters", s)))?;
        self.mode_set = true;
        Ok(None)
    }

    async fn save(&mut self) -> Result<Option<String>, RebootError> {
        let mut vmm = connect(&self.target.socket).await?;
        let uri = format!("file:{}", self.target.state.display());
        let answer = vmm.migrate(MigrateRequest { uri }).await;
        let m = match answer {
            Ok(r) => r.into_inner(),
            Err(status) => {
                // vmmd resumes the guest itself when the save fails; the compensation checks.
                self.saved = true;
                return Err(RebootError::SaveFailed {
                    path: self.target.state.clone(),
                    message: format!(
                        "{} ({})",
                        status.message(),
                        client::code_name(status.code())
                    ),
                });
            }
        };
        self.saved = true;
        if m.status != MigrationStatus::Completed as i32 {
            return Err(RebootError::SaveFailed {
                path: self.target.state.clone(),
                message: if m.error.is_empty() {
                    "the migration did not complete".to_owned()
                } else {
                    m.error
                },
            });
        }
        self.stopped_at_unix = unix_micros();
        self.report.vmmd_micros = Some(m.downtime_micros);
        self.report.phases = phase_views(&m.phases);
        self.report.run_state_after = Some("postmigrate");
        Ok(Some(format!(
            "{} bytes of state, vCPUs stopped {}",
            m.state_bytes,
            format_micros(m.downtime_micros)
        )))
    }

    async fn marker(&mut self) -> Result<Option<String>, RebootError> {
        let before = self.before.clone().unwrap_or_default();
        let config = before.config.clone().unwrap_or_default();
        let saved = if self.suspended_by_us {
            "suspended"
        } else {
            run_state_name(before.run_state)
        };
        let marker = Marker {
            format: MARKER_FORMAT,
            name: self.target.name.clone(),
            socket: self.target.socket.display().to_string(),
            state: self.target.state.display().to_string(),
            created_unix_micros: unix_micros(),
            guest_stopped_unix_micros: self.stopped_at_unix,
            vmmd_version: before.version.clone(),
            vmmd_executable: before.executable.clone(),
            vmmd_pid: before.pid,
            state_format_version: before.state_format_version,
            host_kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            run_state_before: run_state_name(before.run_state).to_owned(),
            run_state_saved: saved.to_owned(),
            suspended_by_prep: self.suspended_by_us,
            config: MarkerConfig {
                vcpus: config.vcpus,
                memory_bytes: config.memory_bytes,
                memory_path: config.memory_path.clone(),
                kernel: config.kernel.clone(),
                cmdline: config.cmdline.clone(),
                serial: config.serial.clone(),
                api_socket: config.api_socket.clone(),
            },
        };
        let json = serde_json::to_vec_pretty(&marker).map_err(|e| RebootError::MarkerIo {
            op: "cannot encode the marker",
            path: self.target.marker(),
            source: std::io::Error::other(e),
        })?;
        self.marker_written = true;
        write_durably(&self.target.env(), b"VMMD_INCOMING=--incoming defer\n")?;
        write_durably(&self.target.marker(), &json)?;
        Ok(Some(format!(
            "{} and {}",
            self.target.marker().display(),
            self.target.env().display()
        )))
    }

    async fn quit(&mut self) -> Result<Option<String>, RebootError> {
        let pid = self.report.pid.unwrap_or(0);
        let mut vmm = connect(&self.target.socket).await?;
        // vmmd may exit before its answer arrives: what counts is that it is gone.
        let answer = vmm.quit(QuitRequest {}).await;
        if let Err(status) = &answer {
            if info(&self.target.socket).await.is_ok_and(|i| i.pid == pid) && process_alive(pid) {
                return Err(RebootError::Rpc(ClientError::rpc("quit", status.clone())));
            }
        }
        self.report.run_state_after = None;
        let deadline = Instant::now() + Duration::from_secs(self.args.quit_timeout);
        while process_alive(pid) {
            if Instant::now() >= deadline {
                return Err(RebootError::QuitTimeout {
                    pid,
                    secs: self.args.quit_timeout,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Ok(Some(format!("vmmd pid {pid} exited")))
    }

    /// Undoes the done steps in reverse and records where the guest is.
    async fn compensate(&mut self) {
        if self.marker_written {
            let t = Instant::now();
            let mut errs = Vec::new();
            for p in [self.target.marker(), self.target.env()] {
                if let Err(e) = std::fs::remove_file(&p) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        errs.push(format!("cannot remove {}: {e}", p.display()));
                    }
                }
            }
            let detail = if errs.is_empty() {
                "marker and env file removed".to_owned()
            } else {
                errs.join("; ")
            };
            self.steps.compensated(PrepStep::Marker.name(), t, detail);
        }
        if self.saved {
            if let Ok(now) = info(&self.target.socket).await {
                if state_of(&now) == RunState::Postmigrate {
                    let t = Instant::now();
                    let r = self.call_resume().await;
                    let detail = match r {
                        Ok(s) => format!("guest restarted ({s})"),
                        Err(e) => format!("cannot restart the guest: {e}"),
                    };
                    self.steps.compensated(PrepStep::Save.name(), t, detail);
                }
            }
        }
        if self.mode_set {
            if let Some(prev) = self.previous_params.clone() {
                let t = Instant::now();
                let r = match connect(&self.target.socket).await {
                    Ok(mut vmm) => vmm
                        .set_migration_parameters(MigrationParameters {
                            mode: prev.mode,
                            exec_args: Vec::new(),
                        })
                        .await
                        .map(|_| ())
                        .map_err(|s| s.message().to_owned()),
                    Err(e) => Err(e.to_string()),
                };
                let detail = match r {
                    Ok(()) => format!(
                        "migration mode back to {}",
                        crate::output::mode_name(prev.mode)
                    ),
                    Err(e) => format!("cannot restore the migration mode: {e}"),
                };
                self.steps.compensated(PrepStep::SetMode.name(), t, detail);
            }
        }
        if self.suspended_by_us {
            if let Ok(now) = info(&self.target.socket).await {
                if state_of(&now) == RunState::Suspended {
                    let t = Instant::now();
                    let r = match connect(&self.target.socket).await {
                        Ok(mut vmm) => vmm
                            .system_wakeup(SystemWakeupRequest {})
                            .await
                            .map(|_| ())
                            .map_err(|s| s.message().to_owned()),
                        Err(e) => Err(e.to_string()),
                    };
                    let detail = match r {
                        Ok(()) => "guest woken up".to_owned(),
                        Err(e) => format!("cannot wake the guest: {e}"),
                    };
                    self.steps.compensated(PrepStep::Suspend.name(), t, detail);
                }
            }
        }
        match info(&self.target.socket).await {
            Ok(now) => {
                self.report.run_state_after = Some(run_state_name(now.run_state));
                self.report.guest_running = Some(state_of(&now) == RunState::Running);
            }
            Err(_) => {
                self.report.run_state_after = None;
                self.report.guest_running = None;
            }
        }
    }

    async fn call_resume(&self) -> Result<&'static str, String> {
        let mut vmm = connect(&self.target.socket)
            .await
            .map_err(|e| e.to_string())?;
        vmm.resume(ResumeRequest {})
            .await
            .map(|r| run_state_name(r.into_inner().run_state))
            .map_err(|s| s.message().to_owned())
    }
}

/// Checks that `state` can be created: its directory exists and takes a new file, and `state`
/// itself, if there, is a regular file.
fn check_state_writable(state: &Path) -> Result<(), RebootError> {
    let bad = |detail: String| RebootError::StateNotWritable {
        path: state.to_path_buf(),
        detail,
    };
    if let Ok(meta) = std::fs::symlink_metadata(state) {
        if !meta.is_file() {
            return Err(bad("it exists and is not a regular file".to_owned()));
        }
    }
    let dir = match state.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = state
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let probe = dir.join(format!(".{name}.cprctl-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(bad(format!(
            "cannot create a file in {}: {e}",
            dir.display()
        ))),
    }
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename, then fsyncs the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), RebootError> {
    let io = |op, source| RebootError::MarkerIo {
        op,
        path: path.to_path_buf(),
        source,
    };
    let tmp = suffixed(path, ".tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("cannot create", e))?;
    f.write_all(bytes).map_err(|e| io("cannot write", e))?;
    f.sync_all().map_err(|e| io("cannot fsync", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io("cannot rename into place", e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // A zombie (exited, not yet reaped by its parent) is gone for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Connects to the console and sends the test guest's suspend command `s`.
async fn ask_console_to_suspend(
    path: &Path,
) -> Result<(std::os::unix::net::UnixStream, PathBuf), RebootError> {
    let console_err = |detail: String| RebootError::Console {
        path: path.to_path_buf(),
        detail,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| console_err(format!("cannot connect: {e}")))?;
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| console_err(e.to_string()))?;
    // A busy console answers at once; give it the chance before sending anything.
    if console_is_busy(&mut stream) {
        return Err(console_err(
            "another client is attached to it; detach it (or use --suspend-command) and retry"
                .to_owned(),
        ));
    }
    stream
        .write_all(b"s")
        .map_err(|e| console_err(format!("cannot send the suspend command: {e}")))?;
    Ok((stream, path.to_path_buf()))
}

/// Reads what is there (up to the read timeout); whether it is vmmd's busy notice.
fn console_is_busy(stream: &mut std::os::unix::net::UnixStream) -> bool {
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(n) => buf[..n].starts_with(CONSOLE_BUSY),
        Err(_) => false,
    }
}

async fn run_suspend_command(cmd: &str, target: &Target, serial: &str) -> Result<(), RebootError> {
    let err = |detail: String| RebootError::SuspendCommand {
        command: cmd.to_owned(),
        detail,
    };
    let console = serial.strip_prefix("socket=").unwrap_or("");
    let out = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("VMMD_SOCKET", &target.socket)
        .env("VMMD_NAME", &target.name)
        .env("VMMD_CONSOLE", console)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(PROBE_TIMEOUT * 6, out)
        .await
        .map_err(|_| err("no exit within 60 s".to_owned()))?
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// reboot-resume

struct Resume<'a> {
    target: Target,
    args: &'a ResumeArgs,
    steps: Steps,
    report: VmReport,
    marker: Option<Marker>,
}

/// Runs reboot-resume for one VM.
pub async fn resume(target: Target, args: &ResumeArgs, progress: Progress) -> VmReport {
    let steps = [
        ResumeStep::Preflight,
        ResumeStep::MigrateIncoming,
        ResumeStep::Wakeup,
        ResumeStep::Verify,
    ];
    let started = Instant::now();
    let mut wf = Resume {
        report: VmReport::new("reboot-resume", &target),
        steps: steps_of(
            "reboot-resume",
            &target,
            steps.iter().map(|s| (s.name(), s.what())).collect(),
            progress,
        ),
        target,
        args,
        marker: None,
    };
    let mut failed = None;
    for step in steps {
        wf.steps
            .emit(step.name(), "started", 0, Some(step.what().to_owned()));
        let t = Instant::now();
        let r = match step {
            ResumeStep::Preflight => wf.preflight().await,
            ResumeStep::MigrateIncoming => wf.migrate_incoming().await,
            ResumeStep::Wakeup => wf.wakeup().await,
            ResumeStep::Verify => wf.verify().await,
        };
        let r = match r {
            Ok(Some(detail)) if detail.starts_with("skipped: ") => {
                let us = micros(t.elapsed());
                wf.steps.record(step.name(), "skipped", us, Some(detail));
                Ok(())
            }
            r => wf.steps.finish(step.name(), t, r),
        };
        if let Err(e) = r {
            failed = Some((step, e));
            break;
        }
    }
    match failed {
        None => {
            wf.report.ok = true;
            wf.report.outcome = "resumed";
        }
        Some((step, e)) => {
            if let Ok(now) = info(&wf.target.socket).await {
                wf.report.run_state_after = Some(run_state_name(now.run_state));
                wf.report.guest_running = Some(state_of(&now) == RunState::Running);
            }
            // Nothing before migrate-incoming changes anything; a load that vmmd refused leaves it
            // waiting in inmigrate, so the resume can be retried.
            let retryable = step == ResumeStep::Preflight
                || (step == ResumeStep::MigrateIncoming
                    && wf.report.run_state_after == Some("inmigrate"));
            wf.report.outcome = if retryable { "refused" } else { "failed" };
            wf.report.error = Some(e.to_string());
        }
    }
    wf.report.steps = std::mem::take(&mut wf.steps.records);
    wf.report.total_micros = micros(started.elapsed());
    wf.report
}

impl Resume<'_> {
    async fn preflight(&mut self) -> Result<Option<String>, RebootError> {
        let marker = Marker::read(&self.target.marker())?;
        let version = read_state_version(&self.target.state)?;
        let info = info(&self.target.socket).await?;
        self.report.pid = Some(info.pid);
        self.report.version = Some(info.version.clone());
        self.report.state_format_version = Some(version);
        self.report.run_state_before = Some(run_state_name(info.run_state));
        self.report.run_state_after = Some(run_state_name(info.run_state));
        if state_of(&info) != RunState::Inmigrate {
            return Err(RebootError::NotIncoming {
                run_state: run_state_name(info.run_state),
                env: self.target.env(),
            });
        }
        let config = info.config.clone().unwrap_or_default();
        let mut mismatch = Vec::new();
        if config.vcpus != marker.config.vcpus {
            mismatch.push(format!(
                "{} vCPUs, the guest had {}",
                config.vcpus, marker.config.vcpus
            ));
        }
        if config.memory_bytes != marker.config.memory_bytes {
            mismatch.push(format!(
                "{} bytes of RAM, the guest had {}",
                config.memory_bytes, marker.config.memory_bytes
            ));
        }
        if config.memory_path != marker.config.memory_path {
            mismatch.push(format!(
                "RAM file {:?}, the guest's is {:?}",
                config.memory_path, marker.config.memory_path
            ));
        }
        if !mismatch.is_empty() {
            return Err(RebootError::ConfigMismatch(mismatch.join("; ")));
        }
        let executable = PathBuf::from(&info.executable);
        if !info.executable.is_empty() {
            let args = ["--check-state-version".to_owned(), version.to_string()];
            let answer = probe(&executable, &args).await?;
            if !answer.success {
                return Err(RebootError::StateVersionRefused {
                    executable,
                    state: self.target.state.clone(),
                    version,
                    answer: answer.text,
                });
            }
        }
        let detail = format!(
            "saved by vmmd {} on kernel {}, now vmmd {} (pid {}) on kernel {}, state format v{version}",
            marker.vmmd_version,
            marker.host_kernel,
            info.version,
            info.pid,
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        );
        self.marker = Some(marker);
        Ok(Some(detail))
    }

    async fn migrate_incoming(&mut self) -> Result<Option<String>, RebootError> {
        let mut vmm = connect(&self.target.socket).await?;
        let uri = format!("file:{}", self.target.state.display());
        let m = vmm
            .migrate_incoming(MigrateIncomingRequest { uri })
            .await
            .map_err(|s| RebootError::LoadFailed {
                path: self.target.state.clone(),
                message: format!("{} ({})", s.message(), client::code_name(s.code())),
            })?
            .into_inner();
        if m.status != MigrationStatus::Completed as i32 {
            return Err(RebootError::LoadFailed {
                path: self.target.state.clone(),
                message: if m.error.is_empty() {
                    "the migration did not complete".to_owned()
                } else {
                    m.error
                },
            });
        }
        self.report.vmmd_micros = Some(m.total_micros);
        self.report.phases = phase_views(&m.phases);
        let now = info(&self.target.socket).await?;
        self.report.run_state_after = Some(run_state_name(now.run_state));
        Ok(Some(format!(
            "{} bytes of state loaded, guest {}",
            m.state_bytes,
            run_state_name(now.run_state)
        )))
    }

    async fn wakeup(&mut self) -> Result<Option<String>, RebootError> {
        let now = info(&self.target.socket).await?;
        if state_of(&now) != RunState::Suspended {
            return Ok(Some(format!(
                "skipped: the guest is {}",
                run_state_name(now.run_state)
            )));
        }
        let mut vmm = connect(&self.target.socket).await?;
        let r = vmm
            .system_wakeup(SystemWakeupRequest {})
            .await
            .map_err(|s| RebootError::Rpc(ClientError::rpc("system-wakeup", s)))?
            .into_inner();
        self.report.suspended = true;
        self.report.run_state_after = Some(run_state_name(r.run_state));
        Ok(Some(format!("guest {}", run_state_name(r.run_state))))
    }

    async fn verify(&mut self) -> Result<Option<String>, RebootError> {
        let marker = self.marker.clone().unwrap_or_else(|| Marker {
            format: MARKER_FORMAT,
            name: String::new(),
            socket: String::new(),
            state: String::new(),
            created_unix_micros: 0,
            guest_stopped_unix_micros: 0,
            vmmd_version: String::new(),
            vmmd_executable: String::new(),
            vmmd_pid: 0,
            state_format_version: 0,
            host_kernel: String::new(),
            run_state_before: "running".to_owned(),
            run_state_saved: String::new(),
            suspended_by_prep: false,
            config: MarkerConfig::default(),
        });
        // A guest that was paused before the prep stays paused; everything else runs.
        let expected = if marker.run_state_before == "paused" {
            RunState::Paused
        } else {
            RunState::Running
        };
        let deadline = Instant::now() + Duration::from_secs(self.args.timeout);
        let now = loop {
            let now = info(&self.target.socket).await?;
            if state_of(&now) == expected || Instant::now() >= deadline {
                break now;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        let resumed_at = unix_micros();
        self.report.run_state_after = Some(run_state_name(now.run_state));
        self.report.guest_running = Some(state_of(&now) == RunState::Running);
        if state_of(&now) != expected {
            return Err(RebootError::NotResumed {
                run_state: run_state_name(now.run_state),
                expected: run_state_name(expected as i32).to_owned(),
            });
        }
        if marker.guest_stopped_unix_micros > 0 {
            self.report.guest_stopped_micros =
                Some(resumed_at.saturating_sub(marker.guest_stopped_unix_micros));
        }
        std::fs::rename(self.target.marker(), self.target.resumed_marker()).map_err(|source| {
            RebootError::MarkerIo {
                op: "the guest runs, but cannot retire the marker",
                path: self.target.marker(),
                source,
            }
        })?;
        if let Err(e) = std::fs::remove_file(self.target.env()) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(RebootError::MarkerIo {
                    op: "the guest runs, but cannot remove",
                    path: self.target.env(),
                    source: e,
                });
            }
        }
        Ok(Some(format!(
            "guest {} on vmmd pid {}; marker -> {}",
            run_state_name(now.run_state),
            now.pid,
            self.target.resumed_marker().display()
        )))
    }
}

/// The format version in a state file's header (bytes 8..12 after the magic `VMMDSTAT`).
pub fn read_state_version(path: &Path) -> Result<u32, RebootError> {
    let bad = |detail: String| RebootError::StateFile {
        path: path.to_path_buf(),
        detail,
    };
    let mut f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut head = [0u8; 12];
    f.read_exact(&mut head)
        .map_err(|e| bad(format!("cannot read its header: {e}")))?;
    if head[..8] != cpr_common::state::STATE_MAGIC {
        return Err(bad("it is not a vmmd state file (bad magic)".to_owned()));
    }
    Ok(u32::from_le_bytes([head[8], head[9], head[10], head[11]]))
}

// ---------------------------------------------------------------------------------------------
// --all

/// The vmmd API sockets `<dir>/<name>.sock`, sorted by name.
pub fn discover(dir: &Path) -> Result<Vec<PathBuf>, RebootError> {
    let entries = std::fs::read_dir(dir).map_err(|source| RebootError::Discover {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let is_sock = path.extension().is_some_and(|x| x == "sock");
        let is_socket = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_socket());
        if is_sock && is_socket {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
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
    workflow: &'static str,
    jobs: u16,
    started: Instant,
    reports: Vec<VmReport>,
) -> FleetReport {
    let succeeded = reports.iter().filter(|r| r.ok).count();
    let skipped = reports.iter().filter(|r| r.outcome == "skipped").count();
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

async fn run_parallel<F, Fut>(targets: Vec<Target>, jobs: u16, f: F) -> Vec<VmReport>
where
    F: Fn(Target) -> Fut,
    Fut: std::future::Future<Output = VmReport> + Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(usize::from(jobs)));
    let mut set = tokio::task::JoinSet::new();
    for (i, t) in targets.iter().cloned().enumerate() {
        let sem = Arc::clone(&sem);
        let fut = f(t);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            (i, fut.await)
        });
    }
    let mut out: Vec<Option<VmReport>> = vec![None; targets.len()];
    while let Some(r) = set.join_next().await {
        match r {
            Ok((i, report)) => {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(report);
                }
            }
            Err(e) => tracing::error!(error = %e, "a workflow task failed"),
        }
    }
    out.into_iter()
        .zip(targets)
        .map(|(r, t)| {
            r.unwrap_or_else(|| {
                let mut rep = VmReport::new("reboot", &t);
                rep.error = Some(
                    RebootError::Task {
                        name: t.name.clone(),
                        detail: "it panicked or was cancelled".to_owned(),
                    }
                    .to_string(),
                );
                rep
            })
        })
        .collect()
}

/// `reboot-prep --all`.
pub async fn prep_all(args: &PrepArgs, progress: Progress) -> Result<FleetReport, RebootError> {
    let started = Instant::now();
    let targets: Vec<Target> = discover(&args.fleet.socket_dir)?
        .iter()
        .map(|s| Target::new(s, None, &args.fleet.state_dir))
        .collect();
    let shared = Arc::new(args.clone());
    let reports = run_parallel(targets, args.fleet.jobs, |t| {
        let a = Arc::clone(&shared);
        async move { prep(t, &a, progress).await }
    })
    .await;
    Ok(fleet_report(
        "reboot-prep",
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
            let mut r = VmReport::new("reboot-resume", &t);
            r.outcome = "skipped";
            r.error = Some(format!("no reboot marker {}", t.marker().display()));
            reports.push(r);
        }
    }
    for name in marked_names(&args.fleet.state_dir) {
        let socket = args.fleet.socket_dir.join(format!("{name}.sock"));
        if !sockets.contains(&socket) {
            let t = Target::new(&socket, None, &args.fleet.state_dir);
            let mut r = VmReport::new("reboot-resume", &t);
            r.outcome = "refused";
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
    let done = run_parallel(targets, args.fleet.jobs, |t| {
        let a = Arc::clone(&shared);
        async move { resume(t, &a, progress).await }
    })
    .await;
    reports.extend(done);
    reports.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(fleet_report(
        "reboot-resume",
        args.fleet.jobs,
        started,
        reports,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_paths_derive_from_the_socket_name() {
        let t = Target::new(
            Path::new("/run/vmmd/vm1.sock"),
            None,
            Path::new("/var/lib/vmmd/cpr"),
        );
        assert_eq!(t.name, "vm1");
        assert_eq!(t.state, Path::new("/var/lib/vmmd/cpr/vm1.state"));
        assert_eq!(
            t.marker(),
            Path::new("/var/lib/vmmd/cpr/vm1.state.marker.json")
        );
        assert_eq!(t.env(), Path::new("/var/lib/vmmd/cpr/vm1.state.env"));
        let t = Target::new(
            Path::new("/x/a.sock"),
            Some(Path::new("/s/f")),
            Path::new("/d"),
        );
        assert_eq!(t.state, Path::new("/s/f"));
        assert_eq!(t.resumed_marker(), Path::new("/s/f.resumed.json"));
    }

    #[test]
    fn state_dir_checks_say_what_is_wrong() {
        let err = check_state_writable(Path::new("/nonexistent-cprctl/vm.state"))
            .expect_err("missing dir");
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent-cprctl"), "{msg}");
        assert!(msg.contains("--state"), "{msg}");
        let dir = std::env::temp_dir().join(format!("cprctl-reboot-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        check_state_writable(&dir.join("vm.state")).expect("writable");
        let err = check_state_writable(&dir.join("sub")).expect_err("a directory");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert_eq!(std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn markers_round_trip_and_bad_ones_are_named() {
        let dir = std::env::temp_dir().join(format!("cprctl-marker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let m = Marker {
            format: MARKER_FORMAT,
            name: "vm1".into(),
            socket: "/run/vmmd/vm1.sock".into(),
            state: "/s".into(),
            created_unix_micros: 2,
            guest_stopped_unix_micros: 1,
            vmmd_version: "0.1.0".into(),
            vmmd_executable: "/usr/local/bin/vmmd".into(),
            vmmd_pid: 7,
            state_format_version: 1,
            host_kernel: "6.1".into(),
            run_state_before: "running".into(),
            run_state_saved: "suspended".into(),
            suspended_by_prep: true,
            config: MarkerConfig::default(),
        };
        let p = dir.join("m.json");
        write_durably(&p, &serde_json::to_vec(&m).expect("json")).expect("write");
        assert_eq!(Marker::read(&p).expect("read"), m);
        std::fs::write(&p, b"{").expect("write");
        let err = Marker::read(&p).expect_err("bad json");
        assert!(err.to_string().contains("m.json"), "{err}");
        let err = Marker::read(&dir.join("none.json")).expect_err("missing");
        assert!(err.to_string().contains("reboot-prep"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn state_version_comes_from_the_header() {
        let dir = std::env::temp_dir().join(format!("cprctl-sv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let p = dir.join("s");
        let mut b = cpr_common::state::STATE_MAGIC.to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        std::fs::write(&p, &b).expect("write");
        assert_eq!(read_state_version(&p).expect("version"), 3);
        std::fs::write(&p, b"NOTSTATE0000").expect("write");
        assert!(read_state_version(&p)
            .expect_err("bad magic")
            .to_string()
            .contains("not a vmmd state file"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn progress_lines_name_vm_and_step() {
        let e = ProgressEvent {
            workflow: "reboot-prep",
            vm: "vm1".into(),
            event: workflow::ProgressEvent {
                step: "save",
                what: PrepStep::Save.what(),
                index: 4,
                of: 5,
                status: "done",
                micros: 2500,
                detail: None,
            },
        };
        assert_eq!(
            e.human(),
            "cprctl reboot-prep vm1: [4/5] save done (2.500 ms)"
        );
        assert_eq!(
            serde_json::to_string(&e).expect("json"),
            r#"{"workflow":"reboot-prep","vm":"vm1","step":"save","index":4,"of":5,"status":"done","micros":2500,"detail":null}"#
        );
    }
}
