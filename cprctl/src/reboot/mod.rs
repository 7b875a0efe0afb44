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

mod all;
mod error;
mod marker;
mod prep;
mod report;
mod resume;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use self::all::{discover, prep_all, resume_all};
pub use self::error::RebootError;
pub use self::marker::{read_state_version, Marker, MarkerConfig};
pub use self::prep::{prep, PrepStep};
pub use self::report::{FleetReport, RebootWorkflow, VmReport};
pub use self::resume::{resume, ResumeStep};
use crate::workflow::{self, eprint_json, micros, StepStatus};

/// Default directory of the vmmd API sockets (`vmmd@NAME` serves `/run/vmmd/NAME.sock`).
pub const DEFAULT_SOCKET_DIR: &str = "/run/vmmd";
/// Default directory of the cpr-reboot state files and markers.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmmd/cpr";
/// Pause between polls.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

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

pub(crate) fn socket_name(socket: &Path) -> String {
    socket
        .file_stem()
        .map_or_else(|| "vm".to_owned(), |s| s.to_string_lossy().into_owned())
}

pub(super) fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
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
        if self.event.status == StepStatus::Started {
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
        let mut event = e.clone();
        // A VM's step says what it does as it starts.
        if event.status == StepStatus::Started && event.detail.is_none() {
            event.detail = Some(event.what.to_owned());
        }
        self.progress.event(&ProgressEvent {
            workflow: self.workflow,
            vm: self.vm.clone(),
            event,
        });
    }
}

/// Progress of one VM's workflow reporting to `progress`.
fn vm_progress(workflow: RebootWorkflow, target: &Target, progress: Progress) -> VmProgress {
    VmProgress {
        workflow: workflow.name(),
        vm: target.name.clone(),
        progress,
    }
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, micros)
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
    fn progress_lines_name_vm_and_step() {
        let e = ProgressEvent {
            workflow: "reboot-prep",
            vm: "vm1".into(),
            event: workflow::ProgressEvent {
                step: "save",
                what: "pause, fsync guest RAM, save state",
                index: 4,
                of: 5,
                status: StepStatus::Done,
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
