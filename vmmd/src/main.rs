//! vmmd: one process, one KVM VM, driven over gRPC on a unix socket.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing::{error, info, warn};

use std::os::fd::{AsRawFd, OwnedFd};
use vmmd::config::Cli;
use vmmd::vm::{self, EventBus, Incoming, Vm, VmBuilder, VmError};

use vmmd::console::{ConsoleHandover, SerialBackendSpec};
use vmmd::cpr::exec::process as cpr_exec;
use vmmd::cpr::CprError;
use vmmd::migration::MigrationError;
use vmmd::state::handover::{fd_names, CprHandover, HandoverError, HANDOVER_ENV};
use vmmd::sys::fd::monotonic_ns;
use vmmd::{api, vcpu};

/// Why vmmd could not start or serve.
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Config(#[from] vmmd::config::ConfigError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen for signals")]
    Signal(#[source] std::io::Error),
    #[error("VM setup task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Handover(#[from] HandoverError),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error(transparent)]
    Cpr(#[from] CprError),
    #[error("the rollback target could not build the VM either")]
    RollbackTargetFailed(#[source] VmError),
    #[error(transparent)]
    CprExec(#[from] cpr_exec::CprExecError),
    #[error("cannot adopt inherited fd {name}")]
    Inherit {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--only-cpr-capable: this configuration blocks cpr-exec: {0}")]
    NotCprCapable(String),
    #[error("the CPR hand-over lacks the {0} fd")]
    Missing(&'static str),
}

/// A vmmd started by cpr-exec that cannot build its VM goes back to the previous binary.
fn roll_back_or_fail(i: &Inheritance, e: VmError) -> MainError {
    if i.handover.rollback_reason.is_some() {
        return MainError::RollbackTargetFailed(e);
    }
    cpr_exec::roll_back(&i.handover, &api::error_chain(&e)).into()
}

fn main() -> ExitCode {
    let started_ns = monotonic_ns();
    // The VM is made in parallel with parsing the arguments and the hand-over, unless this run only
    // answers a question (`--check-state-version`, `--help`, `--version`).
    let answers_only = std::env::args_os().skip(1).any(|a| {
        let a = a.as_encoded_bytes();
        a.starts_with(b"--check-state-version")
            || [&b"--help"[..], b"-h", b"--version", b"-V"].contains(&a)
    });
    let early = (!answers_only)
        .then(vm::EarlyVm::start)
        .and_then(Result::ok);
    let cli = Cli::parse();
    if let Some(v) = cli.check_state_version {
        return check_state_version(v);
    }
    init_logging(&cli);
    // The guest first (a cpr-exec successor resumes it here), the async runtime and API after.
    let result = prepare(&cli, started_ns, early).and_then(|prepared| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("vmmd-api")
            .build()
            .map_err(MainError::Runtime)?;
        runtime.block_on(serve(prepared))
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            error!(error = %api::error_chain(&e), "vmmd failed");
            eprintln!("vmmd: {}", api::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn check_state_version(v: u32) -> ExitCode {
    use cpr_common::state::{can_read_version, STATE_FORMAT_MIN_VERSION, STATE_FORMAT_VERSION};
    if can_read_version(v) {
        println!("vmmd {} reads state format version {v}", vm::VERSION);
        ExitCode::SUCCESS
    } else {
        println!(
            "vmmd {} cannot read state format version {v} (reads {STATE_FORMAT_MIN_VERSION}..={STATE_FORMAT_VERSION})",
            vm::VERSION
        );
        ExitCode::FAILURE
    }
}

fn init_logging(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The fds and context a cpr-exec predecessor handed over.
struct Inheritance {
    handover: CprHandover,
    fds: Vec<(String, OwnedFd)>,
    started_ns: u64,
}

impl Inheritance {
    /// Reads the hand-over from the environment and adopts its fds (close-on-exec again).
    fn from_env(started_ns: u64) -> Result<Option<Inheritance>, MainError> {
        let Some(handover) = CprHandover::from_env()? else {
            return Ok(None);
        };
        // SAFETY: single-threaded at this point; nothing reads the environment concurrently.
        unsafe { std::env::remove_var(HANDOVER_ENV) };
        let mut fds = Vec::new();
        for (name, fd) in &handover.fds {
            // SAFETY: the previous process left exactly these fds open for us; nothing in this
            // process has opened or claimed them yet.
            let owned =
                unsafe { cpr_exec::adopt_fd(*fd) }.map_err(|source| MainError::Inherit {
                    name: name.clone(),
                    source,
                })?;
            fds.push((name.clone(), owned));
        }
        Ok(Some(Inheritance {
            handover,
            fds,
            started_ns,
        }))
    }

    /// A duplicate of the fd named `name` (the original stays held for a rollback).
    fn dup(&self, name: &str) -> Option<OwnedFd> {
        self.fds
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, fd)| fd.try_clone().ok())
    }

    fn vm_part(&self, spec: &SerialBackendSpec) -> Result<vm::Inherited, MainError> {
        let ram = self
            .dup(fd_names::RAM)
            .ok_or(MainError::Missing(fd_names::RAM))?;
        let h = &self.handover;
        // The console's undelivered bytes are in the state, loaded later.
        let console = ConsoleHandover::inherited(
            spec.clone(),
            |name| self.dup(name),
            h.console_pty_path.clone(),
        );
        let vfio_fds = self
            .fds
            .iter()
            .filter(|(n, _)| n.starts_with("vfio-"))
            .filter_map(|(n, fd)| fd.try_clone().ok().map(|fd| (n.clone(), fd)))
            .collect();
        Ok(vm::Inherited {
            ram,
            console,
            handover: h.clone(),
            vfio_fds,
            bridge: self.dup(fd_names::BRIDGE_CONTROL),
            started_ns: self.started_ns,
        })
    }
}

/// Everything up to a running (or incoming) guest, built before the async runtime exists: a vmmd
/// started by cpr-exec resumes the guest first, and sets up tokio and gRPC after.
struct Prepared {
    vm: Vm,
    events: EventBus,
    vcpu_rx: tokio::sync::mpsc::UnboundedReceiver<vcpu::VcpuEvent>,
    listener: std::os::unix::net::UnixListener,
    socket: std::path::PathBuf,
    defer_deadline: Option<Duration>,
}

fn prepare(cli: &Cli, started_ns: u64, early: Option<vm::EarlyVm>) -> Result<Prepared, MainError> {
    let inheritance = Inheritance::from_env(started_ns)?;
    vcpu::install_kick_handler()?;
    if let Some(i) = &inheritance {
        info!(
            from = %i.handover.from_version,
            generation = i.handover.generation,
            rollback = ?i.handover.rollback_reason,
            "started by cpr-exec"
        );
        if i.handover.rollback_reason.is_none() {
            cpr_exec::arm_crash_rollback(&i.handover)?;
        }
    }
    let config = cli.vm_config()?;
    let socket = config.api_socket.clone();
    let listener = match inheritance
        .as_ref()
        .and_then(|i| i.dup(fd_names::API_LISTENER))
    {
        Some(fd) => std::os::unix::net::UnixListener::from(fd),
        None => api::bind(&socket)?,
    };
    let events = EventBus::new();
    let (vcpu_tx, vcpu_rx) = tokio::sync::mpsc::unbounded_channel();
    let vm_part = match &inheritance {
        Some(i) => Some(i.vm_part(&config.serial)?),
        None => None,
    };
    let incoming = config.incoming.clone();
    let created = VmBuilder::new(config, events.clone(), vcpu_tx)
        .inherited(vm_part)
        .early_vm(early)
        .build();
    let mut vm = match (created, &inheritance) {
        (Ok(vm), _) => vm,
        (Err(e), Some(i)) => return Err(roll_back_or_fail(i, e)),
        (Err(e), None) => return Err(e.into()),
    };
    vm.set_api_listener_fd(listener.as_raw_fd());
    if cli.only_cpr_capable {
        if let Some(blocker) = vm.cpr_exec_blockers().into_iter().next() {
            return Err(MainError::NotCprCapable(blocker));
        }
    }
    let defer_deadline = match (&incoming, &inheritance) {
        (Some(Incoming::Defer), Some(_)) => Some(Duration::from_secs(cli.cpr_incoming_timeout)),
        _ => None,
    };
    if let Some(i) = inheritance {
        vm.hold_for_rollback(i.fds);
    }
    let result: Result<(), MainError> = match incoming {
        None => vm.boot().map_err(MainError::from),
        Some(Incoming::Defer) => {
            info!("waiting for migrate-incoming");
            Ok(())
        }
        Some(Incoming::Uri(uri)) => vm
            .migrate_incoming(&uri.to_string())
            .map(|_| ())
            .map_err(MainError::from),
    };
    match result {
        Ok(()) => {}
        Err(e) if vm.awaiting_handover_load() => {
            let reason = api::error_chain(&e);
            let undone = match &e {
                MainError::Migration(m) => m.undone(),
                _ => Vec::new(),
            };
            return Err(vm.roll_back(&reason, undone).into());
        }
        Err(e) => return Err(e),
    }
    tracing::debug!(
        at_us = (monotonic_ns() - started_ns) / 1000,
        "VM ready; starting the API"
    );
    Ok(Prepared {
        vm,
        events,
        vcpu_rx,
        listener,
        socket,
        defer_deadline,
    })
}

async fn serve(prepared: Prepared) -> Result<u8, MainError> {
    let Prepared {
        vm,
        events,
        mut vcpu_rx,
        listener,
        socket,
        defer_deadline,
    } = prepared;
    let listener = api::to_tokio(listener)?;
    {
        let v = &vm;
        let status = if v.update_status() == &vm::UpdateStatus::None {
            v.run_state().to_string()
        } else {
            format!("{}; {}", v.run_state(), v.update_status())
        };
        vmmd::notify::ready(&status);
    }
    let (exit_tx, mut exit_rx) = tokio::sync::watch::channel(None::<i32>);
    let handle = api::VmHandle::new(vm, events, exit_tx);

    let vcpu_handle = handle.clone();
    let vcpu_task = tokio::spawn(async move {
        while let Some(event) = vcpu_rx.recv().await {
            let h = vcpu_handle.clone();
            let failed = matches!(event, vcpu::VcpuEvent::Failed { .. });
            let exit = tokio::task::spawn_blocking(move || h.vm().handle_vcpu_event(event))
                .await
                .unwrap_or(true);
            if exit {
                vcpu_handle.request_exit(if failed { 1 } else { 0 });
            }
        }
    });

    if let Some(timeout) = defer_deadline {
        let h = handle.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let h2 = h.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let mut vm = h2.vm();
                if vm.awaiting_handover_load() {
                    let reason = format!(
                        "no migrate-incoming within {}s of the exec (orchestrator gone?)",
                        timeout.as_secs()
                    );
                    let e = vm.roll_back(&reason, Vec::new());
                    error!(error = %api::error_chain(&e), "rollback failed");
                }
            })
            .await;
        });
    }

    let signal_handle = handle.clone();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(MainError::Signal)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(MainError::Signal)?;
    let signal_task = tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            _ = sigint.recv() => info!("SIGINT: shutting down"),
        }
        signal_handle.request_exit(0);
    });

    let mut exit_watch = exit_rx.clone();
    let shutdown = async move {
        let _ = exit_watch.wait_for(|c| c.is_some()).await;
    };
    let server = api::serve(listener, handle.clone(), shutdown);
    tokio::pin!(server);
    // Open event streams keep a graceful shutdown waiting forever: give in-flight calls a moment.
    let served = tokio::select! {
        r = &mut server => r,
        _ = async {
            let _ = exit_rx.wait_for(|c| c.is_some()).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        } => Ok(()),
    };
    vmmd::notify::stopping();
    vcpu_task.abort();
    signal_task.abort();
    let code = exit_rx.borrow().unwrap_or(0);
    if let Err(e) = std::fs::remove_file(&socket) {
        warn!(socket = %socket.display(), error = %e, "could not remove the API socket");
    }
    {
        let mut vm = handle.vm();
        // After a completed save a successor is about to load the state: exit now and leave the
        // teardown (guest RAM, the KVM VM) to a child, off the guest's way back. Not with VFIO: the
        // successor must be able to open the device's group, which the child would still hold.
        if vm.shut_down_after_save() && !vm.has_vfio() {
            // The successor binds the console socket: the child must not hold it.
            vm.close_console();
            match cpr_exec::detach_teardown() {
                Ok(pid) => {
                    info!(
                        code,
                        teardown_pid = pid,
                        "vmmd exits; a child finishes the teardown"
                    );
                    std::process::exit(code);
                }
                Err(e) => {
                    warn!(error = %e, "cannot hand the teardown to a child; tearing down here")
                }
            }
        }
        vm.shut_down("vmmd exit");
    }
    drop(handle);
    served?;
    info!(code, "vmmd exits");
    Ok(code.clamp(0, 255) as u8)
}
