//! The update's steps and compensations, run by the workflow engine.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::Code;
use vmmd_proto::v1::{
    GetMigrationParametersRequest, InfoResponse, MigrateIncomingRequest, MigrateRequest,
    MigrationInfo, MigrationMode, MigrationParameters, QueryMigrateRequest, ResumeRequest,
    RunState, UndoneStep, UpdateState,
};

use super::command_line::{carried_flags, new_command_line, parse_version, read_cmdline};
use super::{
    DiePoint, Load, Step, UpdateArgs, UpdateError, UpdateReport, POLL_CALL_TIMEOUT, POLL_INTERVAL,
};
use crate::client::{code_name, Client};
use crate::output::{format_micros, run_state_name};
use crate::workflow::{
    phase_views, probe, Compensating, Outcome, ProbeError, Session, SessionError, StepOk, Undo,
    Workflow,
};

/// What undoes a step of the update.
pub(super) enum UpdateUndo {
    /// `set-mode`: the previous migration parameters, put back on the process that has them.
    RestoreMode(MigrationParameters),
    /// `exec`: vmmd resumes the guest when anything fails before `execve`; resume it if it was
    /// left paused.
    ResumeIfPaused,
    /// `exec`: vmmd undid its VFIO DMA step itself; shown as `vfio-dma` when it says so.
    VfioDma,
}

impl Undo for UpdateUndo {
    fn name(&self) -> &'static str {
        match self {
            UpdateUndo::RestoreMode(_) => Step::SetMode.name(),
            UpdateUndo::ResumeIfPaused => Step::Exec.name(),
            UpdateUndo::VfioDma => "vfio-dma",
        }
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

/// The update as it goes.
pub(super) struct Update<'a> {
    session: Session,
    args: &'a UpdateArgs,
    report: UpdateReport,
    before: Option<InfoResponse>,
    previous_params: Option<MigrationParameters>,
    mode_set: bool,
    image_changed: bool,
    /// What vmmd says it undid itself of a failed or rolled-back update (`Info.update_undone`).
    vmmd_undone: Vec<UndoneStep>,
}

impl<'a> Update<'a> {
    /// An update of the vmmd on `socket` as `args` say.
    pub(super) fn new(socket: &Path, args: &'a UpdateArgs) -> Self {
        Self {
            session: Session::new(socket).with_call_timeout(POLL_CALL_TIMEOUT),
            args,
            report: UpdateReport {
                ok: false,
                outcome: Outcome::Unknown(crate::workflow::Guest::NotRestored),
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
            vmmd_undone: Vec::new(),
        }
    }

    /// The report so far.
    pub(super) fn into_report(self) -> UpdateReport {
        self.report
    }

    /// After a failure: records where the guest is now (when vmmd answered before).
    pub(super) async fn note_where_the_guest_is(&mut self) {
        if self.before.is_none() {
            return;
        }
        if let Ok(info) = self.session.info().await {
            self.note_after(&info);
        }
    }

    fn die_if(&self, point: DiePoint) {
        if self.args.die_at == Some(point) {
            tracing::warn!(?point, "test hook: cprctl kills itself");
            // Test hook: die as abruptly as a SIGKILL from outside would.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Tells vmmd which step the workflow is in (best effort).
    async fn report_step(&self, step: Step, state: &str) {
        self.session
            .report_step(
                format!("cprctl update (pid {})", std::process::id()),
                format!("{}: {state}", step.name()),
            )
            .await;
    }

    async fn connect(&self) -> Result<Client, UpdateError> {
        Ok(self.session.connect().await?)
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
            .map_or_else(|| self.session.socket().to_path_buf(), PathBuf::from);
        let mut s = api.into_os_string();
        s.push(".cpr-state");
        PathBuf::from(s)
    }

    async fn preflight(&mut self) -> Result<StepOk<UpdateUndo>, UpdateError> {
        let info = self.session.info().await?;
        self.report.pid = info.pid;
        self.report.old_version = info.version.clone();
        self.report.old_executable = info.executable.clone();
        self.report.generation_before = info.update_generation;
        self.report.run_state_before = run_state_name(info.run_state);
        self.report.state_path = self.state_path(&info).display().to_string();
        let state = crate::workflow::session::run_state(&info);
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
        let version_probe = |detail: String| ProbeError {
            command: format!("{} --version", self.args.binary.display()),
            detail,
        };
        if !version.success {
            return Err(version_probe(format!("it failed: {}", version.text)).into());
        }
        let expected = parse_version(&version.text)
            .ok_or_else(|| version_probe(format!("it printed no version: {:?}", version.text)))?;
        self.report.expected_version = Some(expected.clone());
        let mut vmm = self.connect().await?;
        self.previous_params = Some(
            vmm.get_migration_parameters(GetMigrationParametersRequest {})
                .await
                .map_err(|s| SessionError::rpc("get-migration-parameters", s))?
                .into_inner(),
        );
        Ok(StepOk::detail(format!(
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

    async fn set_mode(&mut self) -> Result<StepOk<UpdateUndo>, UpdateError> {
        let exec_args = self.exec_args()?;
        let mut vmm = self.connect().await?;
        let params = MigrationParameters {
            mode: MigrationMode::CprExec as i32,
            exec_args: exec_args.clone(),
        };
        vmm.set_migration_parameters(params)
            .await
            .map_err(|s| SessionError::rpc("set-migration-parameters", s))?;
        self.mode_set = true;
        let done = StepOk::detail(exec_args.join(" "));
        Ok(match self.previous_params.clone() {
            Some(prev) => done.undo(UpdateUndo::RestoreMode(prev)),
            None => done,
        })
    }

    async fn exec(&mut self) -> Result<StepOk<UpdateUndo>, UpdateError> {
        let mut vmm = self.connect().await?;
        let uri = format!("file:{}", self.report.state_path);
        let call = tokio::spawn(async move { vmm.migrate(MigrateRequest { uri }).await });
        if self.args.die_at == Some(DiePoint::DuringExec) {
            // Let the request leave before dying.
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.die_if(DiePoint::DuringExec);
        }
        let answer = call.await.map_err(|e| {
            SessionError::rpc(
                "migrate",
                tonic::Status::unknown(format!("request task failed: {e}")),
            )
        })?;
        let detail = match answer {
            // The process that answered is the one that was asked: the exec did not happen.
            Ok(r) => format!(
                "vmmd answered Migrate with {:?}; checking what runs now",
                r.into_inner().status
            ),
            Err(status) if is_refusal(status.code()) => {
                return Err(UpdateError::Refused {
                    code: code_name(status.code()),
                    message: status.message().to_owned(),
                })
            }
            // Either the exec happened (the connection closed) or it failed after the pause:
            // the next step asks the process on the socket which. The transport's words are
            // for the debug log, not for the operator.
            Err(status) => {
                tracing::debug!(
                    code = code_name(status.code()),
                    message = status.message(),
                    "Migrate ended without an answer (an exec closes the connection)"
                );
                "the new binary was started; asking the process on the socket".to_owned()
            }
        };
        // Popped in reverse: first the guest is resumed if left paused, then vmmd's own VFIO
        // undo is shown.
        Ok(StepOk::detail(detail)
            .undo(UpdateUndo::VfioDma)
            .undo(UpdateUndo::ResumeIfPaused))
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
            match self.session.info().await {
                Ok(info) => {
                    let inmigrate = info.run_state == RunState::Inmigrate as i32;
                    match info.update_state() {
                        UpdateState::Failed => {
                            self.vmmd_undone = info.update_undone.clone();
                            return Ok(Arrival::Failed(info));
                        }
                        UpdateState::RolledBack if !inmigrate => {
                            self.image_changed = true;
                            self.vmmd_undone = info.update_undone.clone();
                            return Ok(Arrival::RolledBack(info));
                        }
                        _ => {}
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
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(UpdateError::NoAnswer { timeout, last });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn wait_new_process(&mut self) -> Result<StepOk<UpdateUndo>, UpdateError> {
        let waiting_ok = self.args.load == Load::Deferred;
        match self.arrival(waiting_ok).await? {
            Arrival::NewProcess(info) => Ok(StepOk::detail(format!(
                "vmmd {} answers (pid {}, {}, generation {})",
                info.version,
                info.pid,
                run_state_name(info.run_state),
                info.update_generation
            ))),
            other => Err(not_arrived(other)),
        }
    }

    async fn migrate_incoming(&mut self) -> Result<StepOk<UpdateUndo>, UpdateError> {
        let mut vmm = self.connect().await?;
        let uri = format!("file:{}", self.report.state_path);
        let answer = vmm.migrate_incoming(MigrateIncomingRequest { uri }).await;
        if let Err(status) = answer {
            // A load failure makes vmmd roll back; find out where the guest is.
            return match self.arrival(false).await? {
                rolled @ Arrival::RolledBack(_) => Err(not_arrived(rolled)),
                _ => Err(SessionError::rpc("migrate-incoming", status).into()),
            };
        }
        Ok(StepOk::done(None))
    }

    async fn verify(&mut self) -> Result<StepOk<UpdateUndo>, UpdateError> {
        let before = self.before()?.clone();
        // At start the new process resumes by itself; deferred, migrate-incoming returned after it.
        let info = match self.arrival(false).await? {
            Arrival::NewProcess(info) => info,
            other => return Err(not_arrived(other)),
        };
        let mut vmm = self.connect().await?;
        let migration: MigrationInfo = vmm
            .query_migrate(QueryMigrateRequest {})
            .await
            .map_err(|s| SessionError::rpc("query-migrate", s))?
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
        Ok(StepOk::detail(format!(
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

    /// `exec`: the guest was running and is left paused: resume it.
    async fn resume_if_paused(&mut self, c: &mut Compensating<'_, '_>) -> Option<String> {
        let before = self.before.as_ref()?;
        let now = self.session.info().await.ok()?;
        if !(before.run_state == RunState::Running as i32
            && now.run_state == RunState::Paused as i32)
        {
            return None;
        }
        c.announce(Some("resuming the guest".into()));
        let r = match self.session.connect().await {
            Ok(mut vmm) => vmm
                .resume(ResumeRequest {})
                .await
                .map(|_| ())
                .map_err(|s| s.to_string()),
            Err(e) => Err(e.to_string()),
        };
        Some(match r {
            Ok(()) => "the guest was left paused; resumed it".to_owned(),
            Err(e) => format!("cannot resume the guest: {e}"),
        })
    }

    /// `set-mode`: the previous parameters back, unless the process that had them is gone.
    async fn restore_mode(
        &mut self,
        prev: MigrationParameters,
        c: &mut Compensating<'_, '_>,
    ) -> Option<String> {
        if self.image_changed {
            return None;
        }
        c.announce(None);
        Some(self.session.restore_migration_parameters(prev).await)
    }
}

impl Workflow for Update<'_> {
    type Step = Step;
    type Undo = UpdateUndo;
    type Error = UpdateError;

    async fn run_step(&mut self, step: Step) -> Result<StepOk<UpdateUndo>, UpdateError> {
        match step {
            Step::Preflight => self.preflight().await,
            Step::SetMode => self.set_mode().await,
            Step::Exec => self.exec().await,
            Step::WaitNewProcess => self.wait_new_process().await,
            Step::MigrateIncoming => self.migrate_incoming().await,
            Step::Verify => self.verify().await,
        }
    }

    async fn compensate(
        &mut self,
        undo: UpdateUndo,
        _error: &UpdateError,
        c: &mut Compensating<'_, '_>,
    ) -> Option<String> {
        match undo {
            UpdateUndo::ResumeIfPaused => self.resume_if_paused(c).await,
            UpdateUndo::VfioDma => {
                let undone = self.vmmd_undone.iter().find(|u| u.step == "vfio-dma")?;
                c.announce(None);
                Some(undone.detail.clone())
            }
            UpdateUndo::RestoreMode(prev) => self.restore_mode(prev, c).await,
        }
    }

    async fn step_started(&mut self, step: Step) {
        self.report_step(step, "started").await;
    }

    async fn step_done(&mut self, step: Step) {
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

    /// After an exec that failed or was rolled back, waits until a process answers again, so
    /// that the compensations act on the process that is there.
    async fn step_failed(&mut self, _step: Step, error: &UpdateError) {
        let unsure = matches!(
            error,
            UpdateError::NoAnswer { .. } | UpdateError::Session(SessionError::Rpc(_))
        );
        if unsure && self.mode_set {
            if let Ok(Arrival::RolledBack(_) | Arrival::NewProcess(_)) = self.arrival(false).await {
                self.image_changed = true;
            }
        }
    }
}

/// The error of a wait that did not find the new process running the guest.
fn not_arrived(arrival: Arrival) -> UpdateError {
    match arrival {
        Arrival::RolledBack(info) => UpdateError::RolledBack {
            reason: info.update_detail,
        },
        Arrival::Failed(info) => UpdateError::FailedBeforeExec {
            reason: info.update_detail,
        },
        Arrival::NewProcess(info) => UpdateError::Verify(format!(
            "internal: vmmd {} (generation {}) counted as not arrived",
            info.version, info.update_generation
        )),
    }
}

/// Codes vmmd uses when it refuses an update before pausing anything (a state file that cannot be
/// created is NOT_FOUND or PERMISSION_DENIED, but only after the pause: not a refusal).
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::FailedPrecondition | Code::InvalidArgument | Code::Unimplemented
    )
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn update_outcomes_carry_their_exit_codes() {
        use crate::workflow::Guest;
        let refused = UpdateError::NotExecutable {
            path: PathBuf::from("/x"),
        };
        assert_eq!(refused.outcome(Guest::AsBefore).name(), "refused");
        assert_eq!(refused.outcome(Guest::AsBefore).exit_code(), 1);
        let rolled = UpdateError::RolledBack {
            reason: "crashed".into(),
        };
        assert_eq!(rolled.outcome(Guest::AsBefore).name(), "rolled-back");
        assert_eq!(rolled.vmmd_reason(), Some("crashed"));
        let lost = UpdateError::NoAnswer {
            timeout: Duration::from_secs(1),
            last: String::new(),
        };
        assert_eq!(lost.outcome(Guest::NotRestored).name(), "unknown");
        assert_eq!(lost.outcome(Guest::NotRestored).exit_code(), 4);
    }
}
