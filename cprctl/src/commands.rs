//! The command line and what each command does.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use vmmd_proto::v1::{
    EventsRequest, InfoRequest, MigrateIncomingRequest, MigrateRequest, MigrationMode,
    MigrationParameters, PauseRequest, QueryMigrateRequest, QuitRequest, ResumeRequest,
    SystemWakeupRequest,
};

use crate::client::{self, code_name, ClientError};
use crate::console::{self, ConsoleError};
use crate::output::{
    self, mode_name, run_state_name, ErrorDetail, ErrorView, EventView, MigrationView, ModeView,
    QuitView, Render, RunStateView, StatusView,
};

pub use crate::workflow::outcome::{EXIT_FAILED, EXIT_GUEST_NOT_RESTORED, EXIT_UNREACHABLE};

/// Control a vmmd virtual machine monitor over its gRPC API.
#[derive(Debug, Parser)]
#[command(
    name = "cprctl",
    version,
    after_help = "Exit status: 0 success, 1 the request failed (update: refused, failed or rolled back, \
                  guest running as before), 2 bad usage, 3 vmmd unreachable, 4 update failed and the \
                  guest is not back in its runstate from before. `update --all`: 0 every VM updated, \
                  otherwise the worst of the VMs' statuses (a VM not started after another failed: 1)."
)]
pub struct Cli {
    /// vmmd's API socket (its --api-socket).
    #[arg(long, env = "VMMD_SOCKET", global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print one JSON document (`events`: one JSON object per line) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The cprctl commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show runstate, version, pid, uptime and configuration.
    Status,
    /// Stop the vCPUs.
    Pause,
    /// Restart the vCPUs (from paused or postmigrate).
    Resume,
    /// Stop the VM and make vmmd exit.
    Quit,
    /// Wake a guest that suspended itself (S3).
    Wakeup,
    /// Save the VM to URI (`file:PATH`) with the current migration mode.
    Migrate {
        /// Destination, e.g. `file:/var/lib/vmmd/vm1.state`.
        uri: String,
    },
    /// Load the VM from URI (`file:PATH`) into a vmmd started with `--incoming defer`.
    MigrateIncoming {
        /// Source, e.g. `file:/var/lib/vmmd/vm1.state`.
        uri: String,
    },
    /// Show status and per-phase timings of the last migration.
    QueryMigrate,
    /// Set the mode the next `migrate` uses (and, for cpr-exec, the new binary's command line).
    SetMode {
        /// The migration mode.
        mode: Mode,
        /// cpr-exec: the new vmmd and its arguments, after `--` (must include `--incoming defer`
        /// or `--incoming file:PATH`). Omitted: vmmd keeps the current ones.
        #[arg(last = true, value_name = "EXEC_ARGS")]
        exec_args: Vec<String>,
    },
    /// Stream runstate changes and migration progress until interrupted.
    Events,
    /// Live-update vmmd to a new binary under the running guest (cpr-exec: same PID, RAM kept).
    ///
    /// Steps: preflight, set-mode, exec, wait-new-process, [migrate-incoming,] verify. Progress goes
    /// to stderr (JSON lines with --json); the report to stdout. `--all` updates every vmmd in
    /// --socket-dir, --jobs at a time, and stops at the first failure unless --keep-going; it
    /// prints a table (VM, result, pause, generation) or, with --json, per-VM results and totals.
    #[command(
        after_help = "Exit status: 0 updated; 1 refused, failed or rolled back, the guest runs as \
                      before; 3 vmmd unreachable; 4 the guest is not as before (look at it). \
                      --all: 0 when every VM was updated, otherwise the worst of the VMs' statuses \
                      (a VM not started because another failed counts 1)."
    )]
    Update(crate::update::UpdateArgs),
    /// Save the guest for a host reboot (cpr-reboot): preflight, [suspend,] set-mode, save, marker, quit.
    ///
    /// Guest RAM must be in a file that survives the reboot. Rolls back (guest runs on) on any
    /// failure before quit. `--all` acts on every vmmd in --socket-dir. Progress on stderr.
    RebootPrep(crate::reboot::PrepArgs),
    /// After the host reboot: load the saved state into a vmmd started with `--incoming defer`,
    /// wake the guest if it was suspended, verify it runs, retire the marker.
    RebootResume(crate::reboot::ResumeArgs),
    /// Boot the test guest, live-update it three times while timing the guest's heartbeats, report.
    Demo(crate::demo::DemoArgs),
    /// Serve Prometheus metrics (`/metrics`) for every vmmd in --socket-dir, scraped at each request.
    ///
    /// Series are labelled vm="<socket name without .sock>"; a vmmd that does not answer within 2 s
    /// gives vmmd_up 0. Runs until SIGTERM or Ctrl-C.
    Exporter(crate::exporter::ExporterArgs),
    /// Attach this terminal to a console socket (Ctrl-] detaches; stdout is the raw console).
    Console {
        /// The console socket (vmmd's `--serial socket=PATH`).
        path: PathBuf,
        /// When stdin is not a terminal: milliseconds to keep printing output after stdin ends.
        #[arg(long, default_value_t = 1000, value_name = "MS")]
        linger_ms: u64,
    },
}

/// Migration modes as spelled on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Copy guest RAM and all state into the file.
    Normal,
    /// Save state without RAM and exec a new vmmd in place.
    CprExec,
    /// Save state without RAM for a host reboot.
    CprReboot,
}

impl From<Mode> for MigrationMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Normal => MigrationMode::Normal,
            Mode::CprExec => MigrationMode::CprExec,
            Mode::CprReboot => MigrationMode::CprReboot,
        }
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No socket was given.
    #[error("no vmmd API socket given: pass --socket PATH or set VMMD_SOCKET")]
    NoSocket,
    /// vmmd could not be reached or returned an error.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The console session failed.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// The demo failed.
    #[error("demo failed: {0}")]
    Demo(#[from] crate::demo::DemoError),
    /// The update did not complete (its report is already printed).
    #[error("update failed: {failure}{}", guest_note(failure))]
    Update {
        /// The failure and its report.
        failure: crate::update::UpdateFailure,
    },
    /// A reboot workflow did not complete (its report is already printed).
    #[error("{summary}")]
    Reboot {
        /// What failed.
        summary: String,
        /// The exit status.
        code: u8,
    },
    /// `update --all` did not update every VM (its report is already printed).
    #[error("{summary}")]
    UpdateAll {
        /// Which VMs failed.
        summary: String,
        /// The exit status.
        code: u8,
    },
    /// `update --all` could not start.
    #[error(transparent)]
    UpdateAllSetup(#[from] crate::update::all::DiscoverError),
    /// The exporter cannot serve.
    #[error(transparent)]
    Exporter(#[from] crate::exporter::ExporterError),
    /// A reboot workflow could not start.
    #[error(transparent)]
    RebootSetup(#[from] crate::reboot::RebootError),
    /// vmmd reported the migration as failed.
    #[error("migration to {uri} failed: {error}")]
    MigrationFailed {
        /// The migration URI.
        uri: String,
        /// vmmd's explanation.
        error: String,
    },
    /// Writing the result failed.
    #[error("cannot write output: {source}")]
    Output {
        /// The write error.
        #[source]
        source: std::io::Error,
    },
    /// Ctrl-C could not be watched.
    #[error("cannot watch for Ctrl-C: {source}")]
    Signal {
        /// The signal setup error.
        #[source]
        source: std::io::Error,
    },
}

fn guest_note(f: &crate::update::UpdateFailure) -> String {
    let r = &f.report;
    match (r.run_state_after, f.guest_as_before()) {
        (Some(state), true) => format!(
            "; the guest is {state} on vmmd {} (pid {})",
            r.new_version.as_deref().unwrap_or(&r.old_version),
            r.pid_after.unwrap_or(r.pid)
        ),
        (Some(state), false) => format!(
            "; ATTENTION: the guest is {state}, it was {}: check `cprctl status`",
            r.run_state_before
        ),
        (None, _) => String::new(),
    }
}

impl CommandError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Client(ClientError::SocketMissing { .. } | ClientError::Connect { .. })
            | Self::Console(ConsoleError::Connect { .. }) => EXIT_UNREACHABLE,
            Self::Update { failure } => failure.outcome().exit_code(),
            Self::Reboot { code, .. } | Self::UpdateAll { code, .. } => *code,
            _ => EXIT_FAILED,
        }
    }

    /// Whether the command already printed its result (`update` prints its report on failure too).
    pub fn already_reported(&self) -> bool {
        matches!(
            self,
            Self::Update { .. } | Self::Reboot { .. } | Self::UpdateAll { .. }
        )
    }

    /// The `--json` form of this error.
    pub fn to_view(&self) -> ErrorView {
        let code = match self {
            Self::Client(ClientError::Rpc { status, .. }) => Some(code_name(status.code())),
            _ => None,
        };
        ErrorView {
            error: ErrorDetail {
                code,
                message: self.to_string(),
            },
        }
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), CommandError> {
    let json = cli.json;
    if let Command::Console { path, linger_ms } = &cli.command {
        let path = path.clone();
        let linger = Duration::from_millis(*linger_ms);
        // The console is plain blocking I/O; keep it off the async workers.
        return tokio::task::spawn_blocking(move || console::attach(&path, linger))
            .await
            .map_err(|e| CommandError::Output {
                source: std::io::Error::other(e),
            })?
            .map(|_| ())
            .map_err(Into::into);
    }
    if let Command::Exporter(args) = &cli.command {
        return Ok(crate::exporter::run(args).await?);
    }
    if let Command::Demo(args) = cli.command {
        let report = crate::demo::run(args, json).await?;
        return emit(&report, json);
    }
    let progress = if json {
        crate::reboot::Progress::Json
    } else {
        crate::reboot::Progress::Text
    };
    match &cli.command {
        Command::RebootPrep(args) if args.fleet.all => {
            let report = crate::reboot::prep_all(args, progress).await?;
            return emit_fleet(&report, json);
        }
        Command::Update(args) if args.fleet.all => {
            let report = crate::update::run_all(args, json).await?;
            emit(&report, json)?;
            if report.ok {
                return Ok(());
            }
            return Err(CommandError::UpdateAll {
                summary: report.failure_summary(),
                code: report.exit_code(),
            });
        }
        Command::RebootResume(args) if args.fleet.all => {
            let report = crate::reboot::resume_all(args, progress).await?;
            return emit_fleet(&report, json);
        }
        _ => {}
    }
    let socket = cli.socket.ok_or(CommandError::NoSocket)?;
    match &cli.command {
        Command::RebootPrep(args) => {
            let target =
                crate::reboot::Target::new(&socket, args.state.as_deref(), &args.fleet.state_dir);
            let report = crate::reboot::prep(target, args, progress).await;
            return emit_vm(&report, json);
        }
        Command::RebootResume(args) => {
            let target =
                crate::reboot::Target::new(&socket, args.state.as_deref(), &args.fleet.state_dir);
            let report = crate::reboot::resume(target, args, progress).await;
            return emit_vm(&report, json);
        }
        _ => {}
    }
    if let Command::Update(args) = &cli.command {
        let mut progress = crate::update::StderrProgress {
            json,
            prefix: "cprctl update: ".to_owned(),
        };
        return match crate::update::run(&socket, args, &mut progress).await {
            Ok(report) => emit(&report, json),
            Err(failure) => {
                emit(failure.report.as_ref(), json)?;
                Err(CommandError::Update { failure })
            }
        };
    }
    let mut vmm = client::connect(&socket).await?;
    match cli.command {
        Command::Status => {
            let info = vmm
                .info(InfoRequest {})
                .await
                .map_err(|s| ClientError::rpc("status", s))?;
            emit(&StatusView::from(info.into_inner()), json)
        }
        Command::Pause => {
            let r = vmm
                .pause(PauseRequest {})
                .await
                .map_err(|s| ClientError::rpc("pause", s))?;
            emit(&run_state_view(r.into_inner().run_state), json)
        }
        Command::Resume => {
            let r = vmm
                .resume(ResumeRequest {})
                .await
                .map_err(|s| ClientError::rpc("resume", s))?;
            emit(&run_state_view(r.into_inner().run_state), json)
        }
        Command::Wakeup => {
            let r = vmm
                .system_wakeup(SystemWakeupRequest {})
                .await
                .map_err(|s| ClientError::rpc("wakeup", s))?;
            emit(&run_state_view(r.into_inner().run_state), json)
        }
        Command::Quit => {
            vmm.quit(QuitRequest {})
                .await
                .map_err(|s| ClientError::rpc("quit", s))?;
            emit(&QuitView { quit: true }, json)
        }
        Command::Migrate { uri } => {
            let r = vmm
                .migrate(MigrateRequest { uri })
                .await
                .map_err(|s| ClientError::rpc("migrate", s))?;
            emit_migration(r.into_inner().into(), json)
        }
        Command::MigrateIncoming { uri } => {
            let r = vmm
                .migrate_incoming(MigrateIncomingRequest { uri })
                .await
                .map_err(|s| ClientError::rpc("migrate-incoming", s))?;
            emit_migration(r.into_inner().into(), json)
        }
        Command::QueryMigrate => {
            let r = vmm
                .query_migrate(QueryMigrateRequest {})
                .await
                .map_err(|s| ClientError::rpc("query-migrate", s))?;
            // Reporting a past failure is not itself a failure of this command.
            emit(&MigrationView::from(r.into_inner()), json)
        }
        Command::SetMode { mode, exec_args } => {
            let params = MigrationParameters {
                mode: MigrationMode::from(mode) as i32,
                exec_args,
            };
            let r = vmm
                .set_migration_parameters(params)
                .await
                .map_err(|s| ClientError::rpc("set-mode", s))?;
            let r = r.into_inner();
            emit(
                &ModeView {
                    mode: mode_name(r.mode),
                    exec_args: r.exec_args,
                },
                json,
            )
        }
        Command::Events => {
            let mut stream = vmm
                .events(EventsRequest {})
                .await
                .map_err(|s| ClientError::rpc("events", s))?
                .into_inner();
            let ctrl_c = tokio::signal::ctrl_c();
            tokio::pin!(ctrl_c);
            let mut shut_down = false;
            loop {
                tokio::select! {
                    r = &mut ctrl_c => return r.map_err(|source| CommandError::Signal { source }),
                    msg = stream.message() => match msg {
                        Ok(Some(event)) => {
                            let view = EventView::from(event);
                            shut_down = view.is_shutdown();
                            emit(&view, json)?;
                        }
                        // vmmd ended the stream (it is exiting).
                        Ok(None) => return Ok(()),
                        // A vmmd that announced its shutdown may drop the connection as it exits.
                        Err(_) if shut_down => return Ok(()),
                        Err(s) => return Err(ClientError::rpc("events", s).into()),
                    },
                }
            }
        }
        Command::Console { .. }
        | Command::Demo(_)
        | Command::Exporter(_)
        | Command::Update(_)
        | Command::RebootPrep(_)
        | Command::RebootResume(_) => Ok(()),
    }
}

fn emit_vm(report: &crate::reboot::VmReport, json: bool) -> Result<(), CommandError> {
    emit(report, json)?;
    if report.ok {
        return Ok(());
    }
    Err(CommandError::Reboot {
        summary: format!(
            "{} {} {}: {}",
            report.workflow,
            report.name,
            report.outcome.name(),
            report.error.as_deref().unwrap_or("")
        ),
        code: report.outcome.exit_code(),
    })
}

fn emit_fleet(report: &crate::reboot::FleetReport, json: bool) -> Result<(), CommandError> {
    emit(report, json)?;
    if report.ok {
        return Ok(());
    }
    let failed: Vec<&crate::reboot::VmReport> = report
        .reports
        .iter()
        .filter(|r| !r.ok && r.outcome != crate::workflow::Outcome::Skipped)
        .collect();
    let code = failed
        .iter()
        .map(|r| r.outcome.exit_code())
        .max()
        .unwrap_or(EXIT_FAILED);
    Err(CommandError::Reboot {
        summary: format!(
            "{} --all: {} of {} VMs failed: {}",
            report.workflow,
            failed.len(),
            report.vms,
            failed
                .iter()
                .map(|r| format!(
                    "{} ({})",
                    r.name,
                    r.error.as_deref().unwrap_or(r.outcome.name())
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        code,
    })
}

fn run_state_view(raw: i32) -> RunStateView {
    RunStateView {
        run_state: run_state_name(raw),
    }
}

fn emit_migration(view: MigrationView, json: bool) -> Result<(), CommandError> {
    emit(&view, json)?;
    if view.failed() {
        return Err(CommandError::MigrationFailed {
            uri: view.uri,
            error: view.error.unwrap_or_else(|| "no reason given".to_owned()),
        });
    }
    Ok(())
}

/// Prints `value` to stdout; a closed pipe (`cprctl events | head`) is not an error.
fn emit(value: &impl Render, json: bool) -> Result<(), CommandError> {
    match output::print(&mut std::io::stdout().lock(), value, json) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(CommandError::Output { source: e })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cprctl").chain(args.iter().copied()))
    }

    #[test]
    fn global_flags_go_before_or_after_the_command() {
        let cli = parse(&["--socket", "/run/vm1.sock", "status", "--json"]).expect("parses");
        assert_eq!(
            cli.socket.as_deref(),
            Some(std::path::Path::new("/run/vm1.sock"))
        );
        assert!(cli.json);
        assert!(matches!(cli.command, Command::Status));
    }

    #[test]
    fn migrate_takes_a_uri_and_set_mode_takes_known_modes_only() {
        let cli = parse(&["--socket", "s", "migrate", "file:/tmp/x"]).expect("parses");
        assert!(matches!(cli.command, Command::Migrate { uri } if uri == "file:/tmp/x"));
        let cli = parse(&["--socket", "s", "set-mode", "cpr-exec"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::SetMode { mode: Mode::CprExec, ref exec_args } if exec_args.is_empty()
        ));
        let cli = parse(&[
            "set-mode",
            "cpr-exec",
            "--",
            "/usr/bin/vmmd",
            "--incoming",
            "defer",
        ])
        .expect("parses");
        match cli.command {
            Command::SetMode { exec_args, .. } => {
                assert_eq!(exec_args, ["/usr/bin/vmmd", "--incoming", "defer"]);
            }
            other => panic!("parsed as {other:?}"),
        }
        let err = parse(&["--socket", "s", "set-mode", "warp"]).expect_err("unknown mode");
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
        assert!(parse(&["migrate"]).is_err(), "migrate needs a URI");
    }

    #[test]
    fn console_needs_a_path_but_no_api_socket() {
        let cli = parse(&["console", "/run/vm1.console"]).expect("parses");
        match cli.command {
            Command::Console { path, linger_ms } => {
                assert_eq!(path, PathBuf::from("/run/vm1.console"));
                assert_eq!(linger_ms, 1000);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[tokio::test]
    async fn api_command_without_socket_says_how_to_give_one() {
        let cli = Cli {
            socket: None,
            json: false,
            command: Command::Status,
        };
        let err = run(cli).await.expect_err("no socket");
        assert!(err.to_string().contains("--socket"), "{err}");
        assert_eq!(err.exit_code(), EXIT_FAILED);
    }

    #[test]
    fn grpc_errors_keep_their_code_in_json() {
        let err = CommandError::from(ClientError::rpc(
            "migrate-incoming",
            tonic::Status::not_found("state file /x does not exist"),
        ));
        let v = serde_json::to_value(err.to_view()).expect("serialize");
        assert_eq!(v["error"]["code"], "NOT_FOUND");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/x does not exist")));
        assert_eq!(err.exit_code(), EXIT_FAILED);
    }
}
