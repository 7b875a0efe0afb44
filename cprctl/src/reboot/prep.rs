//! `reboot-prep`: save one guest for a host reboot, on the workflow engine.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use vmmd_proto::v1::{
    GetMigrationParametersRequest, InfoResponse, MigrateRequest, MigrationMode,
    MigrationParameters, MigrationStatus, QuitRequest, ResumeRequest, RunState,
    SystemWakeupRequest,
};

use super::marker::{write_durably, Marker, MarkerConfig, MARKER_FORMAT};
use super::{
    unix_micros, vm_progress, PrepArgs, Progress, RebootError, RebootWorkflow, Target, VmReport,
    POLL_INTERVAL,
};
use crate::client;
use crate::output::{format_micros, run_state_name};
use crate::workflow::session::run_state;
use crate::workflow::{
    micros, phase_views, Compensating, Engine, Failed, Guest, Outcome, Session, SessionError,
    StepOk, Undo, Workflow, PROBE_TIMEOUT,
};

/// What vmmd writes to a second console client before closing it.
const CONSOLE_BUSY: &[u8] = b"vmmd: console busy";

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

impl crate::workflow::Step for PrepStep {
    fn name(self) -> &'static str {
        PrepStep::name(self)
    }

    fn what(self) -> &'static str {
        PrepStep::what(self)
    }
}

/// What undoes a step of reboot-prep.
enum PrepUndo {
    /// `suspend`: wake the guest the workflow suspended.
    Wakeup,
    /// `set-mode`: the previous migration mode.
    RestoreMode(MigrationParameters),
    /// `save`: restart the guest vmmd stopped for the save.
    Restart,
    /// `marker`: remove the marker and the env file.
    RemoveMarker,
}

impl Undo for PrepUndo {
    fn name(&self) -> &'static str {
        match self {
            PrepUndo::Wakeup => PrepStep::Suspend.name(),
            PrepUndo::RestoreMode(_) => PrepStep::SetMode.name(),
            PrepUndo::Restart => PrepStep::Save.name(),
            PrepUndo::RemoveMarker => PrepStep::Marker.name(),
        }
    }
}

struct Prep<'a> {
    target: Target,
    session: Session,
    args: &'a PrepArgs,
    report: VmReport,
    before: Option<InfoResponse>,
    previous_params: Option<MigrationParameters>,
    suspended_by_us: bool,
    stopped_at_unix: u64,
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
    let mut progress = vm_progress(RebootWorkflow::Prep, &target, progress);
    let mut engine = Engine::new(steps, &mut progress);
    let mut wf = Prep {
        report: VmReport::new(RebootWorkflow::Prep, &target),
        session: Session::new(&target.socket),
        target,
        args,
        before: None,
        previous_params: None,
        suspended_by_us: false,
        stopped_at_unix: 0,
    };
    match engine.run(&mut wf).await {
        Ok(()) => {
            wf.report.ok = true;
            wf.report.outcome = Outcome::Prepared;
            wf.report.suspended = wf.suspended_by_us;
        }
        Err(Failed { step, error }) => {
            wf.note_where_the_guest_is().await;
            let r = &wf.report;
            let outcome = match step {
                PrepStep::Preflight if r.pid.is_none() => Outcome::Refused(Guest::Unreached),
                PrepStep::Preflight => Outcome::Refused(Guest::AsBefore),
                PrepStep::Quit if !matches!(error, RebootError::Injected(_)) => {
                    Outcome::Failed(Guest::NotRestored)
                }
                _ if r.run_state_after == r.run_state_before => {
                    Outcome::RolledBack(Guest::AsBefore)
                }
                _ => Outcome::Failed(Guest::NotRestored),
            };
            wf.report.outcome = outcome;
            wf.report.error = Some(error.to_string());
        }
    }
    wf.report.steps = engine.take_records();
    wf.report.total_micros = micros(started.elapsed());
    wf.report
}

impl Workflow for Prep<'_> {
    type Step = PrepStep;
    type Undo = PrepUndo;
    type Error = RebootError;

    async fn run_step(&mut self, step: PrepStep) -> Result<StepOk<PrepUndo>, RebootError> {
        if self.args.inject_failure == Some(step) {
            return Err(RebootError::Injected(step.name()));
        }
        match step {
            PrepStep::Preflight => self.preflight().await,
            PrepStep::Suspend => self.suspend().await,
            PrepStep::SetMode => self.set_mode().await,
            PrepStep::Save => self.save().await,
            PrepStep::Marker => self.marker().await,
            PrepStep::Quit => self.quit().await,
        }
    }

    async fn compensate(
        &mut self,
        undo: PrepUndo,
        _error: &RebootError,
        _c: &mut Compensating<'_, '_>,
    ) -> Option<String> {
        match undo {
            PrepUndo::RemoveMarker => Some(self.remove_marker()),
            PrepUndo::Restart => self.restart_if_postmigrate().await,
            PrepUndo::RestoreMode(prev) => Some(
                self.session
                    .restore_migration_parameters(MigrationParameters {
                        mode: prev.mode,
                        exec_args: Vec::new(),
                    })
                    .await,
            ),
            PrepUndo::Wakeup => self.wake_if_suspended().await,
        }
    }
}

impl Prep<'_> {
    /// Records where the guest is now.
    async fn note_where_the_guest_is(&mut self) {
        match self.session.info().await {
            Ok(now) => {
                self.report.run_state_after = Some(run_state_name(now.run_state));
                self.report.guest_running = Some(run_state(&now) == RunState::Running);
            }
            Err(_) => {
                self.report.run_state_after = None;
                self.report.guest_running = None;
            }
        }
    }

    async fn preflight(&mut self) -> Result<StepOk<PrepUndo>, RebootError> {
        let info = self.session.info().await?;
        self.report.pid = Some(info.pid);
        self.report.version = Some(info.version.clone());
        self.report.state_format_version = Some(info.state_format_version);
        self.report.run_state_before = Some(run_state_name(info.run_state));
        self.report.run_state_after = Some(run_state_name(info.run_state));
        self.before = Some(info.clone());
        if !matches!(
            run_state(&info),
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
        let mut vmm = self.session.connect().await?;
        self.previous_params = Some(
            vmm.get_migration_parameters(GetMigrationParametersRequest {})
                .await
                .map_err(|s| SessionError::rpc("get-migration-parameters", s))?
                .into_inner(),
        );
        Ok(StepOk::detail(format!(
            "vmmd {} (pid {}, {}), RAM {} ({} bytes), state -> {}",
            info.version,
            info.pid,
            run_state_name(info.run_state),
            ram.display(),
            meta.len(),
            self.target.state.display()
        )))
    }

    async fn suspend(&mut self) -> Result<StepOk<PrepUndo>, RebootError> {
        let before = self.before.clone().unwrap_or_default();
        if run_state(&before) == RunState::Suspended {
            return Ok(StepOk::detail("the guest is already suspended"));
        }
        if run_state(&before) == RunState::Paused {
            // A paused guest cannot act on a request; it is saved as it is.
            return Ok(StepOk::detail(
                "the guest is paused and cannot act on a suspend request; saving it paused",
            ));
        }
        let result = self.ask_and_wait_suspended(&before).await;
        if result.is_err() && self.suspended_by_us {
            // This step's own partial work: the guest may suspend after all.
            let woken = self.wake_if_suspended().await;
            tracing::info!(vm = %self.target.name, ?woken, "suspend failed; woke the guest if it had suspended");
        }
        Ok(StepOk::detail(result?).undo(PrepUndo::Wakeup))
    }

    /// Asks the guest to suspend and waits until it is.
    async fn ask_and_wait_suspended(
        &mut self,
        before: &InfoResponse,
    ) -> Result<String, RebootError> {
        let config = before.config.clone().unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(self.args.suspend_timeout);
        // Held until the guest is suspended: closing it early could lose the request.
        let mut _console = None;
        let how = if let Some(cmd) = &self.args.suspend_command {
            run_suspend_command(cmd, &self.target, &config.serial).await?;
            format!("`{cmd}`")
        } else {
            let Some(path) = console_socket(&config.serial) else {
                return Err(RebootError::NoSuspendChannel {
                    serial: config.serial.clone(),
                });
            };
            _console = Some(ask_console_to_suspend(&path).await?);
            format!("`s` on console {}", path.display())
        };
        self.suspended_by_us = true;
        loop {
            let now = self.session.info().await?;
            let last = run_state(&now);
            if last == RunState::Suspended {
                self.report.run_state_after = Some("suspended");
                return Ok(format!("asked with {how}; the guest is suspended"));
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

    async fn set_mode(&mut self) -> Result<StepOk<PrepUndo>, RebootError> {
        let mut vmm = self.session.connect().await?;
        vmm.set_migration_parameters(MigrationParameters {
            mode: MigrationMode::CprReboot as i32,
            exec_args: Vec::new(),
        })
        .await
        .map_err(|s| SessionError::rpc("set-migration-parameters", s))?;
        let done = StepOk::done(None);
        Ok(match self.previous_params.clone() {
            Some(prev) => done.undo(PrepUndo::RestoreMode(prev)),
            None => done,
        })
    }

    async fn save(&mut self) -> Result<StepOk<PrepUndo>, RebootError> {
        let result = self.save_state().await;
        if result.is_err() {
            // vmmd resumes the guest itself when the save fails; make sure it did.
            let restarted = self.restart_if_postmigrate().await;
            tracing::info!(vm = %self.target.name, ?restarted, "save failed; checked the guest runs on");
        }
        Ok(StepOk::detail(result?).undo(PrepUndo::Restart))
    }

    async fn save_state(&mut self) -> Result<String, RebootError> {
        let mut vmm = self.session.connect().await?;
        let uri = format!("file:{}", self.target.state.display());
        let m = vmm
            .migrate(MigrateRequest { uri })
            .await
            .map_err(|status| RebootError::SaveFailed {
                path: self.target.state.clone(),
                message: format!(
                    "{} ({})",
                    status.message(),
                    client::code_name(status.code())
                ),
            })?
            .into_inner();
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
        Ok(format!(
            "{} bytes of state, vCPUs stopped {}",
            m.state_bytes,
            format_micros(m.downtime_micros)
        ))
    }

    async fn marker(&mut self) -> Result<StepOk<PrepUndo>, RebootError> {
        let result = self.write_marker();
        if result.is_err() {
            // This step's own partial work: whichever of the two files got written.
            let removed = self.remove_marker();
            tracing::info!(vm = %self.target.name, %removed, "marker failed");
        }
        Ok(StepOk::detail(result?).undo(PrepUndo::RemoveMarker))
    }

    fn write_marker(&self) -> Result<String, RebootError> {
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
            host_kernel: host_kernel(),
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
        write_durably(&self.target.env(), b"VMMD_INCOMING=--incoming defer\n")?;
        write_durably(&self.target.marker(), &json)?;
        Ok(format!(
            "{} and {}",
            self.target.marker().display(),
            self.target.env().display()
        ))
    }

    async fn quit(&mut self) -> Result<StepOk<PrepUndo>, RebootError> {
        let pid = self.report.pid.unwrap_or(0);
        let mut vmm = self.session.connect().await?;
        // vmmd may exit before its answer arrives: what counts is that it is gone.
        let answer = vmm.quit(QuitRequest {}).await;
        if let Err(status) = &answer {
            if self.session.info().await.is_ok_and(|i| i.pid == pid) && process_alive(pid) {
                return Err(SessionError::rpc("quit", status.clone()).into());
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
        Ok(StepOk::detail(format!("vmmd pid {pid} exited")))
    }

    /// `marker`: removes the marker and the env file; what it did.
    fn remove_marker(&self) -> String {
        let mut errs = Vec::new();
        for p in [self.target.marker(), self.target.env()] {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    errs.push(format!("cannot remove {}: {e}", p.display()));
                }
            }
        }
        if errs.is_empty() {
            "marker and env file removed".to_owned()
        } else {
            errs.join("; ")
        }
    }

    /// `save`: restarts a guest left in `postmigrate`; `None` when it is not.
    async fn restart_if_postmigrate(&self) -> Option<String> {
        let now = self.session.info().await.ok()?;
        if run_state(&now) != RunState::Postmigrate {
            return None;
        }
        let r = match self.session.connect().await {
            Ok(mut vmm) => vmm
                .resume(ResumeRequest {})
                .await
                .map(|r| run_state_name(r.into_inner().run_state))
                .map_err(|s| s.message().to_owned()),
            Err(e) => Err(e.to_string()),
        };
        Some(match r {
            Ok(s) => format!("guest restarted ({s})"),
            Err(e) => format!("cannot restart the guest: {e}"),
        })
    }

    /// `suspend`: wakes a guest that is suspended; `None` when it is not.
    async fn wake_if_suspended(&self) -> Option<String> {
        let now = self.session.info().await.ok()?;
        if run_state(&now) != RunState::Suspended {
            return None;
        }
        let r = match self.session.connect().await {
            Ok(mut vmm) => vmm
                .system_wakeup(SystemWakeupRequest {})
                .await
                .map(|_| ())
                .map_err(|s| s.message().to_owned()),
            Err(e) => Err(e.to_string()),
        };
        Some(match r {
            Ok(()) => "guest woken up".to_owned(),
            Err(e) => format!("cannot wake the guest: {e}"),
        })
    }
}

/// The host kernel's release (empty when it cannot be read).
pub(super) fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The console socket of a guest whose serial backend is `socket=PATH`.
///
/// Text, because the API has only vmmd's `--serial` spelling (`VmConfig.serial`): a typed
/// `VmConfig.console_socket` field would replace this.
fn console_socket(serial: &str) -> Option<PathBuf> {
    serial.strip_prefix("socket=").map(PathBuf::from)
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

pub(super) fn process_alive(pid: u32) -> bool {
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
///
/// Text, because the console socket is a raw byte stream: vmmd's only way to say "busy" there is
/// this notice (an Info field naming the attached console client would replace it).
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
    let console = console_socket(serial).unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn only_a_socket_console_can_be_asked_to_suspend() {
        assert_eq!(
            console_socket("socket=/run/c.sock"),
            Some(PathBuf::from("/run/c.sock"))
        );
        assert_eq!(console_socket("pty"), None);
    }
}
