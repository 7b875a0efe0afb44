//! vmmd: one process, one KVM VM, driven over gRPC on a unix socket.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing::{error, info, warn};

use vmmd::config::Cli;
use vmmd::vm::{self, EventBus, Incoming, Vm, VmError};
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
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen for signals")]
    Signal(#[source] std::io::Error),
    #[error("VM setup task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(v) = cli.check_state_version {
        return check_state_version(v);
    }
    init_logging(&cli);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("vmmd-api")
        .build()
        .map_err(MainError::Runtime);
    let result = runtime.and_then(|rt| rt.block_on(run(cli)));
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(cli: Cli) -> Result<u8, MainError> {
    vcpu::install_kick_handler()?;
    let config = cli.vm_config();
    let socket = config.api_socket.clone();
    let listener = api::bind(&socket)?;
    let events = EventBus::new();
    let (vcpu_tx, mut vcpu_rx) = tokio::sync::mpsc::unbounded_channel();
    let vm_events = events.clone();
    let vm = tokio::task::spawn_blocking(move || -> Result<Vm, VmError> {
        let incoming = config.incoming.clone();
        let mut vm = Vm::create(config, vm_events, vcpu_tx)?;
        match incoming {
            None => vm.boot()?,
            Some(Incoming::Defer) => info!("waiting for migrate-incoming"),
            Some(Incoming::Uri(uri)) => {
                vm.migrate_incoming(&uri.to_string())?;
            }
        }
        Ok(vm)
    })
    .await??;

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
    vcpu_task.abort();
    signal_task.abort();
    let code = exit_rx.borrow().unwrap_or(0);
    if let Err(e) = std::fs::remove_file(&socket) {
        warn!(socket = %socket.display(), error = %e, "could not remove the API socket");
    }
    {
        let mut vm = handle.vm();
        vm.shut_down("vmmd exit");
    }
    drop(handle);
    served?;
    info!(code, "vmmd exits");
    Ok(code.clamp(0, 255) as u8)
}
