//! The gRPC service (`vmmd.v1.Vmm`): translates requests into [`Vm`] calls, plus gRPC health and
//! reflection, served on a unix socket created mode 0600.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, UNIX_EPOCH};

use cpr_common::state::StateFileError;
use cpr_common::MigrationMode;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::info;
use vmmd_proto::v1 as pb;
use vmmd_proto::v1::vmm_server::{Vmm, VmmServer};

mod authority;
mod hpack;

use crate::cpr::CprError;
use crate::migration::MigrationError;
use crate::vm::{
    EventBus, MigrationReport, MigrationStatus, RunState, UpdateStatus, Vm, VmError, VmEvent,
    VERSION,
};

/// Why the API could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Binding the socket failed.
    #[error("cannot listen on API socket {path}: is another vmmd using it?")]
    Bind {
        /// The socket path.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Setting up reflection failed.
    #[error("cannot build the gRPC reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The server failed.
    #[error("gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// The VM plus what the API needs around it.
pub struct VmHandle {
    vm: Mutex<Vm>,
    events: EventBus,
    last_migration: Arc<Mutex<crate::vm::MigrationReport>>,
    started: Instant,
    exit: tokio::sync::watch::Sender<Option<i32>>,
}

impl VmHandle {
    /// Wraps a VM.
    pub fn new(
        vm: Vm,
        events: EventBus,
        exit: tokio::sync::watch::Sender<Option<i32>>,
    ) -> Arc<VmHandle> {
        Arc::new(VmHandle {
            last_migration: vm.last_migration(),
            vm: Mutex::new(vm),
            events,
            started: Instant::now(),
            exit,
        })
    }

    /// Locks the VM.
    pub fn vm(&self) -> MutexGuard<'_, Vm> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks vmmd to exit with `code`.
    pub fn request_exit(&self, code: i32) {
        let _ = self.exit.send(Some(code));
    }
}

/// An error that maps to the gRPC status an operator's tool can act on.
pub trait ToStatus: std::error::Error {
    /// The status code for this error (the message is the error chain).
    fn code(&self) -> tonic::Code;
}

/// The gRPC status for `e`.
pub fn status_for(e: &dyn ToStatus) -> Status {
    Status::new(e.code(), error_chain(e))
}

impl ToStatus for VmError {
    fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            VmError::WrongState { .. } => Code::FailedPrecondition,
            // A loop could not move into the bridge: the update stopped before the exec.
            VmError::Console(crate::console::ConsoleError::Bridge(_))
            | VmError::Vcpu(crate::vcpu::VcpuError::Detach { .. }) => Code::Aborted,
            _ => Code::Internal,
        }
    }
}

impl ToStatus for StateFileError {
    fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            StateFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Code::NotFound
            }
            StateFileError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Code::PermissionDenied
            }
            StateFileError::Io { .. } => Code::Unavailable,
            StateFileError::NewerVersion { .. }
            | StateFileError::OlderVersion { .. }
            | StateFileError::RamSizeMismatch { .. } => Code::FailedPrecondition,
            StateFileError::Encode(_) => Code::Internal,
            _ => Code::DataLoss,
        }
    }
}

impl ToStatus for CprError {
    fn code(&self) -> tonic::Code {
        use crate::cpr::exec::process::CprExecError;
        use tonic::Code;
        match self {
            CprError::Vm(e) => e.code(),
            CprError::StateFile(e) => e.code(),
            CprError::Blocked(_) => Code::FailedPrecondition,
            // The update stopped before the exec; the guest runs on.
            CprError::BridgeSetup(_) | CprError::Handover(_) => Code::Aborted,
            CprError::Bridge(_) => Code::Unavailable,
            CprError::Exec(
                CprExecError::Exec { .. }
                | CprExecError::Cloexec { .. }
                | CprExecError::Handover(_)
                | CprExecError::OpenSelf(_),
            ) => Code::Aborted,
            CprError::Exec(_) => Code::FailedPrecondition,
            CprError::VfioDma { .. } | CprError::NoRollbackTarget => Code::Internal,
        }
    }
}

impl ToStatus for MigrationError {
    fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            MigrationError::Vm(e) => e.code(),
            MigrationError::Cpr(e) => e.code(),
            MigrationError::StateFile(e) => e.code(),
            MigrationError::Incompatible { .. } | MigrationError::Blocked { .. } => {
                Code::FailedPrecondition
            }
            MigrationError::Uri(_) => Code::InvalidArgument,
            MigrationError::Injected(_) | MigrationError::VfioDma { .. } => Code::Internal,
        }
    }
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

fn pb_run_state(s: RunState) -> pb::RunState {
    match s {
        RunState::Running => pb::RunState::Running,
        RunState::Paused => pb::RunState::Paused,
        RunState::Suspended => pb::RunState::Suspended,
        RunState::InMigrate => pb::RunState::Inmigrate,
        RunState::PostMigrate => pb::RunState::Postmigrate,
        RunState::Shutdown => pb::RunState::Shutdown,
    }
}

fn pb_update_state(s: &UpdateStatus) -> pb::UpdateState {
    match s {
        UpdateStatus::None => pb::UpdateState::None,
        UpdateStatus::InProgress(_) => pb::UpdateState::InProgress,
        UpdateStatus::Failed(_) => pb::UpdateState::Failed,
        UpdateStatus::Updated { .. } => pb::UpdateState::Updated,
        UpdateStatus::RolledBack(_) => pb::UpdateState::RolledBack,
    }
}

fn pb_mode(m: MigrationMode) -> pb::MigrationMode {
    match m {
        MigrationMode::Normal => pb::MigrationMode::Normal,
        MigrationMode::CprExec => pb::MigrationMode::CprExec,
        MigrationMode::CprReboot => pb::MigrationMode::CprReboot,
    }
}

fn pb_status(s: MigrationStatus) -> pb::MigrationStatus {
    match s {
        MigrationStatus::None => pb::MigrationStatus::None,
        MigrationStatus::Active => pb::MigrationStatus::Active,
        MigrationStatus::Completed => pb::MigrationStatus::Completed,
        MigrationStatus::Failed => pb::MigrationStatus::Failed,
    }
}

fn pb_migration(r: &MigrationReport) -> pb::MigrationInfo {
    pb::MigrationInfo {
        status: pb_status(r.status) as i32,
        mode: pb_mode(r.mode) as i32,
        uri: r.uri.clone(),
        error: r.error.clone().unwrap_or_default(),
        phases: r
            .phases
            .iter()
            .map(|(name, d)| pb::Phase {
                name: name.clone(),
                micros: d.as_micros() as u64,
            })
            .collect(),
        total_micros: r.total.as_micros() as u64,
        ram_bytes: r.ram_bytes,
        state_bytes: r.state_bytes,
        downtime_micros: r.downtime.as_micros() as u64,
        incoming: r.incoming,
    }
}

fn pb_event(at: std::time::SystemTime, e: VmEvent) -> pb::Event {
    let kind = match e {
        VmEvent::RunState { old, new, reason } => pb::event::Kind::RunState(pb::RunStateChanged {
            old: pb_run_state(old) as i32,
            new: pb_run_state(new) as i32,
            reason,
        }),
        VmEvent::Migration(p) => pb::event::Kind::Migration(pb::MigrationProgress {
            status: pb_status(p.status) as i32,
            phase: p.phase,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            message: p.message,
            incoming: p.incoming,
        }),
    };
    pb::Event {
        timestamp_unix_micros: at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0),
        kind: Some(kind),
    }
}

/// The `vmmd.v1.Vmm` service.
pub struct VmmApi {
    handle: Arc<VmHandle>,
}

impl VmmApi {
    async fn with_vm<T, E, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        E: ToStatus,
        F: FnOnce(&mut Vm) -> Result<T, E> + Send + 'static,
    {
        let handle = self.handle.clone();
        tokio::task::spawn_blocking(move || f(&mut handle.vm()).map_err(|e| status_for(&e)))
            .await
            .map_err(|e| Status::internal(format!("VM task failed: {e}")))?
    }

    fn run_state_response(s: RunState) -> Response<pb::RunStateResponse> {
        Response::new(pb::RunStateResponse {
            run_state: pb_run_state(s) as i32,
        })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl Vmm for VmmApi {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let uptime = self.handle.started.elapsed();
        let (state, cfg, pty, blockers, generation, status, reboot_blockers, workflow_step, counts) =
            self.with_vm(|vm| {
                Ok::<_, VmError>((
                    vm.run_state(),
                    vm.config().clone(),
                    vm.serial_pty(),
                    vm.cpr_exec_blockers(),
                    vm.generation(),
                    (vm.update_status().clone(), vm.update_undone().to_vec()),
                    (
                        vm.cpr_reboot_blockers(),
                        vm.cpr_reboot_blockers_cleared_by_suspend(),
                    ),
                    vm.workflow_step().to_string(),
                    vm.metrics().counters().clone(),
                ))
            })
            .await?;
        let (status, undone) = status;
        let seconds = |us: u64| us as f64 / 1e6;
        let update_metrics = pb::UpdateMetrics {
            updated: counts.updated,
            failed: counts.failed,
            refused: counts.refused,
            rolled_back: counts.rolled_back,
            pause_bucket_bounds_seconds: counts
                .pause_bounds_us
                .iter()
                .map(|b| seconds(*b))
                .collect(),
            pause_bucket_counts: counts.pause_buckets,
            pause_sum_seconds: seconds(counts.pause_sum_us),
            pause_count: counts.pause_count,
        };
        Ok(Response::new(pb::InfoResponse {
            run_state: pb_run_state(state) as i32,
            version: VERSION.to_string(),
            pid: std::process::id(),
            uptime_ms: uptime.as_millis() as u64,
            config: Some(pb::VmConfig {
                vcpus: u32::from(cfg.vcpus),
                memory_bytes: cfg.memory.size,
                memory_path: cfg
                    .memory
                    .path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                kernel: cfg
                    .kernel
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                cmdline: cfg.cmdline.clone(),
                serial: cfg.serial.to_string(),
                serial_pty: pty.map(|p| p.display().to_string()).unwrap_or_default(),
                api_socket: cfg.api_socket.display().to_string(),
                incoming: cfg
                    .incoming
                    .as_ref()
                    .map(|i| i.to_string())
                    .unwrap_or_default(),
            }),
            cpr_exec_blockers: blockers,
            update_generation: generation,
            executable: std::fs::read_link("/proc/self/exe")
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            state_format_version: cpr_common::state::STATE_FORMAT_VERSION,
            update_status: status.to_string(),
            update_state: pb_update_state(&status) as i32,
            update_detail: status.detail().to_string(),
            cpr_reboot_blockers: reboot_blockers.0,
            cpr_reboot_blockers_cleared_by_suspend: reboot_blockers.1,
            command_line: std::env::args().collect(),
            workflow_step,
            update_metrics: Some(update_metrics),
            update_undone: undone
                .into_iter()
                .map(|u| pb::UndoneStep {
                    step: u.step,
                    detail: u.detail,
                })
                .collect(),
        }))
    }

    async fn pause(
        &self,
        _: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::RunStateResponse>, Status> {
        self.with_vm(|vm| vm.pause())
            .await
            .map(Self::run_state_response)
    }

    async fn resume(
        &self,
        _: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::RunStateResponse>, Status> {
        self.with_vm(|vm| vm.resume())
            .await
            .map(Self::run_state_response)
    }

    async fn quit(
        &self,
        _: Request<pb::QuitRequest>,
    ) -> Result<Response<pb::QuitResponse>, Status> {
        self.with_vm(|vm| {
            vm.shut_down("api quit");
            Ok::<_, VmError>(())
        })
        .await?;
        info!("quit requested over the API");
        self.handle.request_exit(0);
        Ok(Response::new(pb::QuitResponse {}))
    }

    async fn system_wakeup(
        &self,
        _: Request<pb::SystemWakeupRequest>,
    ) -> Result<Response<pb::RunStateResponse>, Status> {
        self.with_vm(|vm| vm.wakeup())
            .await
            .map(Self::run_state_response)
    }

    async fn set_migration_parameters(
        &self,
        req: Request<pb::MigrationParameters>,
    ) -> Result<Response<pb::MigrationParameters>, Status> {
        let req = req.into_inner();
        let exec_args = req.exec_args;
        let mode = match pb::MigrationMode::try_from(req.mode) {
            Ok(pb::MigrationMode::Normal) => MigrationMode::Normal,
            Ok(pb::MigrationMode::CprExec) => MigrationMode::CprExec,
            Ok(pb::MigrationMode::CprReboot) => MigrationMode::CprReboot,
            Ok(pb::MigrationMode::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(
                    "migration mode is missing or unknown: use normal, cpr-exec or cpr-reboot",
                ))
            }
        };
        let (mode, exec_args) = self.with_vm(move |vm| vm.set_mode(mode, exec_args)).await?;
        Ok(Response::new(pb::MigrationParameters {
            mode: pb_mode(mode) as i32,
            exec_args,
        }))
    }

    async fn get_migration_parameters(
        &self,
        _: Request<pb::GetMigrationParametersRequest>,
    ) -> Result<Response<pb::MigrationParameters>, Status> {
        let (mode, exec_args) = self
            .with_vm(|vm| Ok::<_, VmError>((vm.mode(), vm.exec_args().to_vec())))
            .await?;
        Ok(Response::new(pb::MigrationParameters {
            mode: pb_mode(mode) as i32,
            exec_args,
        }))
    }

    async fn migrate(
        &self,
        req: Request<pb::MigrateRequest>,
    ) -> Result<Response<pb::MigrationInfo>, Status> {
        let uri = req.into_inner().uri;
        let report = self.with_vm(move |vm| vm.migrate(&uri)).await?;
        Ok(Response::new(pb_migration(&report)))
    }

    async fn migrate_incoming(
        &self,
        req: Request<pb::MigrateIncomingRequest>,
    ) -> Result<Response<pb::MigrationInfo>, Status> {
        let uri = req.into_inner().uri;
        let report = self.with_vm(move |vm| vm.migrate_incoming(&uri)).await?;
        Ok(Response::new(pb_migration(&report)))
    }

    async fn query_migrate(
        &self,
        _: Request<pb::QueryMigrateRequest>,
    ) -> Result<Response<pb::MigrationInfo>, Status> {
        let report = self
            .handle
            .last_migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok(Response::new(pb_migration(&report)))
    }

    async fn set_workflow_step(
        &self,
        req: Request<pb::WorkflowStep>,
    ) -> Result<Response<pb::WorkflowStep>, Status> {
        let req = req.into_inner();
        if req.step.len() > 4096 || req.orchestrator.len() > 256 {
            return Err(Status::invalid_argument(
                "workflow step too long (limit 4096 bytes)",
            ));
        }
        let text = format!("{}: {}", req.orchestrator, req.step);
        self.with_vm(move |vm| {
            vm.set_workflow_step(text);
            Ok::<_, VmError>(())
        })
        .await?;
        Ok(Response::new(req))
    }

    type EventsStream = EventStream;

    async fn events(
        &self,
        _: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let rx = self.handle.events.subscribe();
        let stream =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|item| match item {
                Ok((at, e)) => Some(Ok(pb_event(at, e))),
                // A subscriber that fell behind skips what it missed rather than ending the stream.
                Err(_) => None,
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Binds the API socket with mode 0600 (removing a stale socket file first).
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, ApiError> {
    let bind_err = |source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_err() {
            std::fs::remove_file(path).map_err(bind_err)?;
        }
    }
    // The umask makes the socket 0600 from the moment it exists; nothing else creates files now.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Hands a listening socket (bound here or inherited across cpr-exec) to tokio.
pub fn to_tokio(listener: std::os::unix::net::UnixListener) -> Result<UnixListener, ApiError> {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .unwrap_or_default();
    listener
        .set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(listener))
        .map_err(|source| ApiError::Bind { path, source })
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    handle: Arc<VmHandle>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<VmmServer<VmmApi>>().await;
    // Both reflection versions: grpcurl and older tools still speak v1alpha.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vmmd_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(ApiError::Reflection)?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vmmd_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(ApiError::Reflection)?;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(VmmServer::new(VmmApi { handle }))
        // Each connection goes through the :authority shim (see `authority`) before h2 parses it.
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener).map(|c| c.map(authority::AuthorityFix::new)),
            shutdown,
        )
        .await
        .map_err(ApiError::Serve)
}
