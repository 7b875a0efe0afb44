//! `reboot-resume`: load one guest saved by reboot-prep into the vmmd waiting for it, on the
//! workflow engine. Nothing before `migrate-incoming` changes anything, so there is nothing to
//! compensate: a refused resume is retried once the cause is fixed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use vmmd_proto::v1::{MigrateIncomingRequest, MigrationStatus, RunState, SystemWakeupRequest};

use super::marker::read_state_version;
use super::prep::host_kernel;
use super::{
    unix_micros, vm_progress, Marker, Progress, RebootError, RebootWorkflow, ResumeArgs, Target,
    VmReport, POLL_INTERVAL,
};
use crate::output::run_state_name;
use crate::workflow::session::run_state;
use crate::workflow::{
    micros, phase_views, probe, Compensating, Engine, Failed, Guest, Outcome, Session,
    SessionError, StepOk, Undo, Workflow,
};

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

impl crate::workflow::Step for ResumeStep {
    fn name(self) -> &'static str {
        ResumeStep::name(self)
    }

    fn what(self) -> &'static str {
        ResumeStep::what(self)
    }
}

/// reboot-resume pushes no compensations.
pub enum Never {}

impl Undo for Never {
    fn name(&self) -> &'static str {
        match *self {}
    }
}

struct Resume<'a> {
    target: Target,
    session: Session,
    args: &'a ResumeArgs,
    report: VmReport,
    marker: Option<Marker>,
}

/// Runs reboot-resume for one VM.
pub async fn resume(target: Target, args: &ResumeArgs, progress: Progress) -> VmReport {
    let steps = vec![
        ResumeStep::Preflight,
        ResumeStep::MigrateIncoming,
        ResumeStep::Wakeup,
        ResumeStep::Verify,
    ];
    let started = Instant::now();
    let mut progress = vm_progress(RebootWorkflow::Resume, &target, progress);
    let mut engine = Engine::new(steps, &mut progress);
    let mut wf = Resume {
        report: VmReport::new(RebootWorkflow::Resume, &target),
        session: Session::new(&target.socket),
        target,
        args,
        marker: None,
    };
    match engine.run(&mut wf).await {
        Ok(()) => {
            wf.report.ok = true;
            wf.report.outcome = Outcome::Resumed;
        }
        Err(Failed { step, error }) => {
            if let Ok(now) = wf.session.info().await {
                wf.report.run_state_after = Some(run_state_name(now.run_state));
                wf.report.guest_running = Some(run_state(&now) == RunState::Running);
            }
            // Nothing before migrate-incoming changes anything; a load that vmmd refused leaves it
            // waiting in inmigrate, so the resume can be retried.
            let retryable = step == ResumeStep::Preflight
                || (step == ResumeStep::MigrateIncoming
                    && wf.report.run_state_after
                        == Some(run_state_name(RunState::Inmigrate as i32)));
            wf.report.outcome = if retryable {
                Outcome::Refused(Guest::AsBefore)
            } else {
                Outcome::Failed(Guest::NotRestored)
            };
            wf.report.error = Some(error.to_string());
        }
    }
    wf.report.steps = engine.take_records();
    wf.report.total_micros = micros(started.elapsed());
    wf.report
}

impl Workflow for Resume<'_> {
    type Step = ResumeStep;
    type Undo = Never;
    type Error = RebootError;

    async fn run_step(&mut self, step: ResumeStep) -> Result<StepOk<Never>, RebootError> {
        match step {
            ResumeStep::Preflight => self.preflight().await,
            ResumeStep::MigrateIncoming => self.migrate_incoming().await,
            ResumeStep::Wakeup => self.wakeup().await,
            ResumeStep::Verify => self.verify().await,
        }
    }

    async fn compensate(
        &mut self,
        undo: Never,
        _error: &RebootError,
        _c: &mut Compensating<'_, '_>,
    ) -> Option<String> {
        match undo {}
    }
}

impl Resume<'_> {
    async fn preflight(&mut self) -> Result<StepOk<Never>, RebootError> {
        let marker = Marker::read(&self.target.marker())?;
        let version = read_state_version(&self.target.state)?;
        let info = self.session.info().await?;
        self.report.pid = Some(info.pid);
        self.report.version = Some(info.version.clone());
        self.report.state_format_version = Some(version);
        self.report.run_state_before = Some(run_state_name(info.run_state));
        self.report.run_state_after = Some(run_state_name(info.run_state));
        if run_state(&info) != RunState::Inmigrate {
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
            host_kernel()
        );
        self.marker = Some(marker);
        Ok(StepOk::detail(detail))
    }

    async fn migrate_incoming(&mut self) -> Result<StepOk<Never>, RebootError> {
        let mut vmm = self.session.connect().await?;
        let uri = format!("file:{}", self.target.state.display());
        let m = vmm
            .migrate_incoming(MigrateIncomingRequest { uri })
            .await
            .map_err(|s| RebootError::LoadFailed {
                path: self.target.state.clone(),
                message: format!("{} ({})", s.message(), crate::client::code_name(s.code())),
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
        let now = self.session.info().await?;
        self.report.run_state_after = Some(run_state_name(now.run_state));
        Ok(StepOk::detail(format!(
            "{} bytes of state loaded, guest {}",
            m.state_bytes,
            run_state_name(now.run_state)
        )))
    }

    async fn wakeup(&mut self) -> Result<StepOk<Never>, RebootError> {
        let now = self.session.info().await?;
        if run_state(&now) != RunState::Suspended {
            return Ok(StepOk::Skipped(format!(
                "skipped: the guest is {}",
                run_state_name(now.run_state)
            )));
        }
        let mut vmm = self.session.connect().await?;
        let r = vmm
            .system_wakeup(SystemWakeupRequest {})
            .await
            .map_err(|s| SessionError::rpc("system-wakeup", s))?
            .into_inner();
        self.report.suspended = true;
        self.report.run_state_after = Some(run_state_name(r.run_state));
        Ok(StepOk::detail(format!(
            "guest {}",
            run_state_name(r.run_state)
        )))
    }

    async fn verify(&mut self) -> Result<StepOk<Never>, RebootError> {
        // A guest that was paused before the prep stays paused; everything else runs.
        let expected = self
            .marker
            .as_ref()
            .map_or(RunState::Running, Marker::expected_run_state);
        let stopped_at = self
            .marker
            .as_ref()
            .map_or(0, |m| m.guest_stopped_unix_micros);
        let deadline = Instant::now() + Duration::from_secs(self.args.timeout);
        let now = loop {
            let now = self.session.info().await?;
            if run_state(&now) == expected || Instant::now() >= deadline {
                break now;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        let resumed_at = unix_micros();
        self.report.run_state_after = Some(run_state_name(now.run_state));
        self.report.guest_running = Some(run_state(&now) == RunState::Running);
        if run_state(&now) != expected {
            return Err(RebootError::NotResumed {
                run_state: run_state_name(now.run_state),
                expected: run_state_name(expected as i32).to_owned(),
            });
        }
        if stopped_at > 0 {
            self.report.guest_stopped_micros = Some(resumed_at.saturating_sub(stopped_at));
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
        Ok(StepOk::detail(format!(
            "guest {} on vmmd pid {}; marker -> {}",
            run_state_name(now.run_state),
            now.pid,
            self.target.resumed_marker().display()
        )))
    }
}
