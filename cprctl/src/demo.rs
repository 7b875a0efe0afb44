//! `cprctl demo`: boot the test guest, save it, restore it into a new vmmd, verify, report.
//!
//! The whole normal-mode save/restore path end to end, for a first look on a fresh machine.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use vmmd_proto::v1::{InfoRequest, MigrateIncomingRequest, MigrateRequest, QuitRequest};

use crate::client::{self, Client, ClientError};
use crate::console::{LineSplitter, Token};
use crate::output::{format_bytes, format_micros, MigrationView, Render};

/// How long vmmd may take to answer its API.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest may take to fill its RAM and print READY.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a guest command may take to answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of `cprctl demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// vCPUs of the demo guest.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Guest RAM, e.g. 256M.
    #[arg(long, default_value = "256M")]
    pub memory: String,
    /// Working directory for sockets, logs and the state file (default: a fresh one in /tmp).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Keep the working directory afterwards.
    #[arg(long)]
    pub keep: bool,
    /// The vmmd binary (default: next to cprctl).
    #[arg(long, value_name = "PATH")]
    pub vmmd: Option<PathBuf>,
    /// The guest kernel (default: cpr-testguest next to cprctl).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Do not run `cargo build` first, even when started by `cargo run`.
    #[arg(long)]
    pub no_build: bool,
}

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// `--memory` does not parse.
    #[error(transparent)]
    Size(#[from] cpr_common::SizeError),
    /// Building vmmd and the guest failed.
    #[error("`{command}` failed ({detail}): fix the build error above and retry")]
    Build {
        /// The command line.
        command: String,
        /// Exit status or spawn error.
        detail: String,
    },
    /// A binary is missing.
    #[error(
        "{} is missing: run `cargo build --release` first, or pass --vmmd/--kernel",
        path.display()
    )]
    MissingBinary {
        /// The expected path.
        path: PathBuf,
    },
    /// A file operation on the working directory failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// vmmd could not be started.
    #[error("cannot start {}: {source}", path.display())]
    Spawn {
        /// The vmmd binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// vmmd exited when it should not have.
    #[error("vmmd exited with {status} {when}; its log {} ends with:\n{tail}", log.display())]
    VmmdExited {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// At which step.
        when: &'static str,
        /// The log file.
        log: PathBuf,
        /// The end of the log.
        tail: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {}s waiting for {what}; see the logs in {}", timeout.as_secs(), dir.display())]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        timeout: Duration,
        /// The working directory.
        dir: PathBuf,
    },
    /// The console socket could not be opened or read.
    #[error("console {}: {source}", path.display())]
    Console {
        /// The console socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// vmmd refused a request.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The guest reported a problem, or its state did not survive.
    #[error("the guest {problem}: {line}")]
    Guest {
        /// What is wrong.
        problem: &'static str,
        /// The guest's line.
        line: String,
    },
    /// vmmd reported a failed migration.
    #[error("{direction} migration failed: {error}")]
    Migration {
        /// `save` or `restore`.
        direction: &'static str,
        /// vmmd's message.
        error: String,
    },
}

/// What the demo did and measured.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    /// Always true when printed: failures are errors.
    pub ok: bool,
    /// The working directory (removed unless `--keep`).
    pub dir: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Source vmmd's pid.
    pub source_pid: u32,
    /// Restored vmmd's pid.
    pub target_pid: u32,
    /// vmmd start to the guest's READY line.
    pub boot_to_ready_ms: u64,
    /// The guest's READY line.
    pub ready: String,
    /// Memory hash before the save, equal after the restore.
    pub verify_hash: String,
    /// COUNTERS before the save.
    pub counters_before: String,
    /// COUNTERS after the restore.
    pub counters_after: String,
    /// The save, as vmmd reported it.
    pub save: MigrationView,
    /// The restore, as vmmd reported it.
    pub restore: MigrationView,
}

impl Render for DemoReport {
    fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "1. booted {} vCPUs, {} (vmmd pid {}): READY after {} ms",
            self.vcpus,
            format_bytes(self.memory_bytes),
            self.source_pid,
            self.boot_to_ready_ms
        );
        let _ = writeln!(s, "   {}", self.ready);
        let _ = writeln!(s, "2. guest memory verified: hash {}", self.verify_hash);
        let _ = writeln!(s, "   {}", self.counters_before);
        let _ = writeln!(
            s,
            "3. saved to {} in {} (RAM {}, state {}, guest stopped {})",
            self.save.uri,
            format_micros(self.save.total_micros),
            format_bytes(self.save.ram_bytes),
            format_bytes(self.save.state_bytes),
            format_micros(self.save.downtime_micros)
        );
        let _ = writeln!(s, "4. vmmd {} quit", self.source_pid);
        let _ = writeln!(
            s,
            "5. restored into a new vmmd (pid {}) in {}",
            self.target_pid,
            format_micros(self.restore.total_micros)
        );
        let _ = writeln!(
            s,
            "6. the guest carried on: same seed, counters moved on, memory hash unchanged"
        );
        let _ = writeln!(s, "   {}", self.counters_after);
        let _ = writeln!(s, "OK");
        s
    }
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<DemoReport, DemoError> {
    let memory_bytes = cpr_common::parse_size(&args.memory)?;
    build_if_under_cargo(&args).await?;
    let (vmmd, kernel) = binaries(&args)?;
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("cprctl-demo-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).map_err(|source| DemoError::Io {
        op: "create",
        path: dir.clone(),
        source,
    })?;
    let result = run_in(&args, memory_bytes, &vmmd, &kernel, &dir).await;
    match &result {
        Ok(_) if !args.keep => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(_) => {}
        Err(_) => eprintln!("cprctl demo: kept {} for inspection", dir.display()),
    }
    result
}

async fn run_in(
    args: &DemoArgs,
    memory_bytes: u64,
    vmmd: &Path,
    kernel: &Path,
    dir: &Path,
) -> Result<DemoReport, DemoError> {
    let console_path = dir.join("console.sock");
    let state = dir.join("vm.state");
    let uri = format!("file:{}", state.display());
    let base = VmmdSpec {
        vmmd,
        kernel,
        dir,
        vcpus: args.vcpus,
        memory: &args.memory,
        console: &console_path,
    };

    // 1. Boot.
    eprintln!(
        "cprctl demo: starting vmmd with the test guest in {}",
        dir.display()
    );
    let started = Instant::now();
    let mut src = base.spawn("source", None).await?;
    let mut console = GuestConsole::connect(&console_path, dir).await?;
    let ready = console.wait_line("READY", READY_TIMEOUT).await?;
    let boot_to_ready_ms = started.elapsed().as_millis() as u64;

    // 2. Verify and count.
    let verify_hash = verify(&mut console).await?;
    let counters_before = console.command(b'c', "COUNTERS").await?;

    // 3. Save.
    eprintln!("cprctl demo: saving to {}", state.display());
    let save = src
        .api
        .migrate(MigrateRequest { uri: uri.clone() })
        .await
        .map_err(|s| ClientError::rpc("migrate", s))?
        .into_inner();
    let save = MigrationView::from(save);
    if save.status != "completed" {
        return Err(DemoError::Migration {
            direction: "save",
            error: save.error.clone().unwrap_or_else(|| save.status.to_owned()),
        });
    }

    // 4. Quit.
    let _ = src.api.quit(QuitRequest {}).await;
    src.wait_exit().await?;
    drop(console);

    // 5. Restore into a new vmmd.
    eprintln!("cprctl demo: restoring into a new vmmd");
    let mut dst = base.spawn("target", Some("defer")).await?;
    let mut console = GuestConsole::connect(&console_path, dir).await?;
    let restore = dst
        .api
        .migrate_incoming(MigrateIncomingRequest { uri })
        .await
        .map_err(|s| ClientError::rpc("migrate-incoming", s))?
        .into_inner();
    let restore = MigrationView::from(restore);
    if restore.status != "completed" {
        return Err(DemoError::Migration {
            direction: "restore",
            error: restore
                .error
                .clone()
                .unwrap_or_else(|| restore.status.to_owned()),
        });
    }

    // 6. The guest carries on.
    console.wait_heartbeats(50, COMMAND_TIMEOUT).await?;
    let counters_after = console.command(b'c', "COUNTERS").await?;
    check_continues(&counters_before, &counters_after)?;
    let hash_after = verify(&mut console).await?;
    if hash_after != verify_hash {
        return Err(DemoError::Guest {
            problem: "memory hash changed across save/restore",
            line: format!("before {verify_hash}, after {hash_after}"),
        });
    }
    let _ = dst.api.quit(QuitRequest {}).await;
    dst.wait_exit().await?;

    Ok(DemoReport {
        ok: true,
        dir: dir.display().to_string(),
        vcpus: args.vcpus,
        memory_bytes,
        source_pid: src.pid,
        target_pid: dst.pid,
        boot_to_ready_ms,
        ready,
        verify_hash,
        counters_before,
        counters_after,
        save,
        restore,
    })
}

/// Sends `v`; the hash of a `VERIFY OK` line.
async fn verify(console: &mut GuestConsole) -> Result<String, DemoError> {
    let line = console.command(b'v', "VERIFY").await?;
    match line.strip_prefix("VERIFY OK ") {
        Some(hash) => Ok(hash.trim().to_owned()),
        None => Err(DemoError::Guest {
            problem: "found its memory damaged",
            line,
        }),
    }
}

/// The value of `key=` in a guest line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Fails unless the later COUNTERS line continues the earlier one.
fn check_continues(before: &str, after: &str) -> Result<(), DemoError> {
    let bad = |problem| DemoError::Guest {
        problem,
        line: format!("before: {before}; after: {after}"),
    };
    if field(before, "seed") != field(after, "seed") {
        return Err(bad("came back with another seed (a different boot)"));
    }
    let hb = |l| field(l, "hb").and_then(|v| v.parse::<u64>().ok());
    match (hb(before), hb(after)) {
        (Some(b), Some(a)) if a >= b => {}
        _ => return Err(bad("lost its heartbeat count")),
    }
    if field(after, "fails") != Some("0") {
        return Err(bad("counted failures"));
    }
    Ok(())
}

/// Under `cargo run`, build vmmd and the guest in the same profile so the demo finds them.
async fn build_if_under_cargo(args: &DemoArgs) -> Result<(), DemoError> {
    if args.no_build || args.vmmd.is_some() {
        return Ok(());
    }
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-p", "vmmd", "-p", "cpr-testguest"]);
    if exe_dir().is_some_and(|d| d.ends_with("release")) {
        cmd.arg("--release");
    }
    if let Some(manifest) = std::env::var_os("CARGO_MANIFEST_DIR") {
        cmd.current_dir(manifest);
    }
    let command = format!("{cmd:?}");
    eprintln!("cprctl demo: building vmmd and cpr-testguest");
    let status = cmd
        .stdout(Stdio::null())
        .status()
        .await
        .map_err(|e| DemoError::Build {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if !status.success() {
        return Err(DemoError::Build {
            command,
            detail: status.to_string(),
        });
    }
    Ok(())
}

fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

fn binaries(args: &DemoArgs) -> Result<(PathBuf, PathBuf), DemoError> {
    let dir = exe_dir().unwrap_or_default();
    let vmmd = args.vmmd.clone().unwrap_or_else(|| dir.join("vmmd"));
    let kernel = args
        .kernel
        .clone()
        .unwrap_or_else(|| dir.join("cpr-testguest"));
    for path in [&vmmd, &kernel] {
        if !path.is_file() {
            return Err(DemoError::MissingBinary { path: path.clone() });
        }
    }
    Ok((vmmd, kernel))
}

/// How to start one vmmd of the demo.
struct VmmdSpec<'a> {
    vmmd: &'a Path,
    kernel: &'a Path,
    dir: &'a Path,
    vcpus: u32,
    memory: &'a str,
    console: &'a Path,
}

/// A running vmmd, killed if the demo stops early.
struct Vmmd {
    child: Child,
    pid: u32,
    api: Client,
    log: PathBuf,
}

impl VmmdSpec<'_> {
    async fn spawn(&self, name: &str, incoming: Option<&str>) -> Result<Vmmd, DemoError> {
        let api_socket = self.dir.join(format!("{name}.sock"));
        let log = self.dir.join(format!("{name}.log"));
        let io_err = |op, source| DemoError::Io {
            op,
            path: log.clone(),
            source,
        };
        let log_file = std::fs::File::create(&log).map_err(|e| io_err("create", e))?;
        let log_err = log_file.try_clone().map_err(|e| io_err("open", e))?;
        let mut cmd = Command::new(self.vmmd);
        cmd.arg("--api-socket")
            .arg(&api_socket)
            .arg("--kernel")
            .arg(self.kernel)
            .arg("--vcpus")
            .arg(self.vcpus.to_string())
            .arg("--memory")
            .arg(format!("size={}", self.memory))
            .arg("--serial")
            .arg(format!("socket={}", self.console.display()));
        if let Some(incoming) = incoming {
            cmd.arg("--incoming").arg(incoming);
        }
        let mut child = cmd
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| DemoError::Spawn {
                path: self.vmmd.to_path_buf(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(exited(status, "before its API answered", &log));
            }
            if let Ok(mut api) = client::connect(&api_socket).await {
                if api.info(InfoRequest {}).await.is_ok() {
                    return Ok(Vmmd {
                        child,
                        pid,
                        api,
                        log,
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(DemoError::Timeout {
                    what: format!("vmmd's API on {}", api_socket.display()),
                    timeout: START_TIMEOUT,
                    dir: self.dir.to_path_buf(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Vmmd {
    /// Waits for vmmd to exit after Quit; a non-zero status is an error.
    async fn wait_exit(&mut self) -> Result<(), DemoError> {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .map_err(|_| DemoError::Timeout {
                what: format!("vmmd {} to exit after quit", self.pid),
                timeout: Duration::from_secs(30),
                dir: self.log.parent().map(Path::to_path_buf).unwrap_or_default(),
            })?
            .map_err(|source| DemoError::Io {
                op: "wait for vmmd of",
                path: self.log.clone(),
                source,
            })?;
        if !status.success() {
            return Err(exited(status, "after quit", &self.log));
        }
        Ok(())
    }
}

fn exited(status: std::process::ExitStatus, when: &'static str, log: &Path) -> DemoError {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(15).collect();
    DemoError::VmmdExited {
        status,
        when,
        log: log.to_path_buf(),
        tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
    }
}

/// The guest console: lines arrive on a channel, heartbeats are counted.
struct GuestConsole {
    writer: OwnedWriteHalf,
    lines: mpsc::UnboundedReceiver<String>,
    heartbeats: Arc<AtomicU64>,
    path: PathBuf,
    dir: PathBuf,
}

impl GuestConsole {
    async fn connect(path: &Path, dir: &Path) -> Result<Self, DemoError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(source) => {
                    return Err(DemoError::Console {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        let (mut reader, writer) = stream.into_split();
        let (tx, lines) = mpsc::unbounded_channel();
        let heartbeats = Arc::new(AtomicU64::new(0));
        let beats = Arc::clone(&heartbeats);
        tokio::spawn(async move {
            let mut splitter = LineSplitter::default();
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                for &b in &buf[..n] {
                    match splitter.push(b) {
                        Some(Token::Heartbeat) => {
                            beats.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Token::Line(line)) => {
                            // The demo stopped listening: nothing more to do.
                            let gone = tx.send(line).is_err();
                            if gone {
                                return;
                            }
                        }
                        None => {}
                    }
                }
            }
        });
        Ok(Self {
            writer,
            lines,
            heartbeats,
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
        })
    }

    fn timeout(&self, what: String, timeout: Duration) -> DemoError {
        DemoError::Timeout {
            what,
            timeout,
            dir: self.dir.clone(),
        }
    }

    /// The next line starting with `prefix`; a failure line on the way is an error.
    async fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String, DemoError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .map_err(|_| self.timeout(format!("the guest's {prefix} line"), timeout))?;
            let Some(line) = line else {
                return Err(DemoError::Console {
                    path: self.path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("closed while waiting for {prefix}"),
                    ),
                });
            };
            if line.starts_with(prefix) {
                return Ok(line);
            }
            if line.starts_with("FAIL") || line.starts_with("PANIC") {
                return Err(DemoError::Guest {
                    problem: "reported a failure",
                    line,
                });
            }
        }
    }

    /// Sends a one-byte command and waits for its answer.
    async fn command(&mut self, cmd: u8, answer: &str) -> Result<String, DemoError> {
        self.writer
            .write_all(&[cmd])
            .await
            .map_err(|source| DemoError::Console {
                path: self.path.clone(),
                source,
            })?;
        self.wait_line(answer, COMMAND_TIMEOUT).await
    }

    /// Waits until `n` more heartbeats arrived.
    async fn wait_heartbeats(&self, n: u64, timeout: Duration) -> Result<(), DemoError> {
        let target = self.heartbeats.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + timeout;
        while self.heartbeats.load(Ordering::Relaxed) < target {
            if Instant::now() > deadline {
                return Err(self.timeout("heartbeats after the restore".into(), timeout));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str =
        "COUNTERS hb=100 cpus=2 iters=5,7 fails=0 suspends=0 seed=00000000000000aa";

    #[test]
    fn counters_must_continue_with_the_same_seed() {
        let later = "COUNTERS hb=150 cpus=2 iters=9,9 fails=0 suspends=0 seed=00000000000000aa";
        check_continues(BEFORE, later).expect("continues");
        let reboot = "COUNTERS hb=3 cpus=2 iters=1,1 fails=0 suspends=0 seed=00000000000000bb";
        let err = check_continues(BEFORE, reboot).expect_err("another seed is another boot");
        assert!(err.to_string().contains("another seed"), "{err}");
        let back = "COUNTERS hb=99 cpus=2 iters=9,9 fails=0 suspends=0 seed=00000000000000aa";
        assert!(check_continues(BEFORE, back).is_err());
        let failed = "COUNTERS hb=150 cpus=2 iters=9,9 fails=1 suspends=0 seed=00000000000000aa";
        assert!(check_continues(BEFORE, failed).is_err());
    }

    #[test]
    fn missing_binaries_say_how_to_build_them() {
        let args = DemoArgs {
            vcpus: 1,
            memory: "64M".into(),
            dir: None,
            keep: false,
            vmmd: Some("/nonexistent/vmmd".into()),
            kernel: Some("/nonexistent/cpr-testguest".into()),
            no_build: true,
        };
        let err = binaries(&args).expect_err("missing");
        assert!(err.to_string().contains("cargo build --release"), "{err}");
    }
}
