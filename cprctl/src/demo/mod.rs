//! `cprctl demo`: boot the test guest, live-update vmmd under it three times, report the blackout.
//!
//! A console reader timestamps every heartbeat byte the guest sends (about one a millisecond) on the
//! host's monotonic clock; the guest-visible blackout of an update is the longest gap between two
//! heartbeats across it. Each update is `cprctl update`'s own workflow, with the same vmmd binary as
//! the new one.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::process::Command;
use vmmd_proto::v1::{InfoRequest, QuitRequest};

use crate::client::ClientError;
use crate::output::{format_bytes, format_micros, PhaseView, Render};
use crate::update::{self, StderrProgress, UpdateArgs, UpdateFailure};
use crate::workflow::micros;

mod guest;

use self::guest::{GuestConsole, VmmdSpec};

/// How long vmmd may take to answer its API.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest may take to fill its RAM and print READY.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a guest command may take to answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Heartbeats to wait for after each update before the next one.
const SETTLE_HEARTBEATS: u64 = 200;
/// Steady-state window measured before the first update, for comparison.
const STEADY_WINDOW: Duration = Duration::from_secs(1);

/// Options of `cprctl demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// vCPUs of the demo guest.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Guest RAM, e.g. 256M.
    #[arg(long, default_value = "256M")]
    pub memory: String,
    /// Live updates to do.
    #[arg(long, default_value_t = 3)]
    pub updates: u32,
    /// Working directory for sockets, logs and the state file (default: a fresh one in /tmp).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Keep the working directory afterwards.
    #[arg(long)]
    pub keep: bool,
    /// The vmmd binary (default: next to cprctl); also the binary each update switches to.
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
    /// A live update failed.
    #[error("live update {n} failed: {source}; see the vmmd log in {}", dir.display())]
    Update {
        /// Which update (1-based).
        n: u32,
        /// The working directory.
        dir: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<UpdateFailure>,
    },
}

/// min/median/max of a figure over the updates, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Spread {
    /// Smallest.
    pub min: u64,
    /// Median (the mean of the middle two for an even count).
    pub median: u64,
    /// Largest.
    pub max: u64,
}

impl Spread {
    /// The spread of `values` (all zero when empty).
    pub fn of(values: &[u64]) -> Spread {
        let mut v = values.to_vec();
        v.sort_unstable();
        let Some((&min, &max)) = v.first().zip(v.last()) else {
            return Spread::default();
        };
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2
        };
        Spread { min, median, max }
    }

    fn human(&self) -> String {
        format!(
            "{} / {} / {}",
            format_micros(self.min),
            format_micros(self.median),
            format_micros(self.max)
        )
    }
}

/// One live update as the demo saw it.
#[derive(Debug, Serialize)]
pub struct DemoUpdate {
    /// 1-based.
    pub n: u32,
    /// Longest gap between two heartbeat bytes across the update (host monotonic clock).
    pub blackout_micros: u64,
    /// The pause vmmd measured.
    pub vmmd_pause_micros: u64,
    /// `cprctl update` start to verified.
    pub total_micros: u64,
    /// vmmd's phases.
    pub phases: Vec<PhaseView>,
    /// Version before.
    pub old_version: String,
    /// Version after.
    pub new_version: String,
    /// Update generation after.
    pub generation: u64,
}

/// min/median/max over the updates.
#[derive(Debug, Serialize)]
pub struct DemoSummary {
    /// Guest-visible blackout.
    pub blackout_micros: Spread,
    /// vmmd's pause.
    pub vmmd_pause_micros: Spread,
    /// Whole update.
    pub total_micros: Spread,
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
    /// vmmd's pid (the same throughout).
    pub pid: u32,
    /// vmmd start to the guest's READY line.
    pub boot_to_ready_ms: u64,
    /// The guest's READY line.
    pub ready: String,
    /// Memory hash before the updates, equal after them.
    pub verify_hash: String,
    /// COUNTERS before the updates.
    pub counters_before: String,
    /// COUNTERS after the updates.
    pub counters_after: String,
    /// Heartbeat bytes received between the two COUNTERS lines.
    pub heartbeats_received: u64,
    /// Heartbeats the guest counted between them (must equal what was received).
    pub heartbeats_counted: u64,
    /// Longest heartbeat gap in a quiet second before the first update, for comparison.
    pub steady_max_gap_micros: u64,
    /// Each update.
    pub updates: Vec<DemoUpdate>,
    /// min/median/max over the updates.
    pub summary: DemoSummary,
}

impl Render for DemoReport {
    fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "1. booted {} vCPUs, {} (vmmd pid {}): READY after {} ms",
            self.vcpus,
            format_bytes(self.memory_bytes),
            self.pid,
            self.boot_to_ready_ms
        );
        let _ = writeln!(s, "   {}", self.ready);
        let _ = writeln!(s, "2. guest memory verified: hash {}", self.verify_hash);
        let _ = writeln!(s, "   {}", self.counters_before);
        let _ = writeln!(
            s,
            "   steady state: longest heartbeat gap in 1 s without an update {}",
            format_micros(self.steady_max_gap_micros)
        );
        let _ = writeln!(
            s,
            "3. {} live updates (cpr-exec, same binary, same pid):",
            self.updates.len()
        );
        for u in &self.updates {
            let _ = writeln!(
                s,
                "   update {}: vmmd {} -> {}, generation {}: guest blackout {}, vmmd pause {}, update total {}",
                u.n,
                u.old_version,
                u.new_version,
                u.generation,
                format_micros(u.blackout_micros),
                format_micros(u.vmmd_pause_micros),
                format_micros(u.total_micros)
            );
            let phases: Vec<String> = u
                .phases
                .iter()
                .map(|p| format!("{} {}", p.name, format_micros(p.micros)))
                .collect();
            let _ = writeln!(s, "     phases: {}", phases.join(", "));
        }
        let _ = writeln!(
            s,
            "4. the guest carried on: same pid, memory hash unchanged, counters continued, \
             {} heartbeats received = {} counted by the guest",
            self.heartbeats_received, self.heartbeats_counted
        );
        let _ = writeln!(s, "   {}", self.counters_after);
        let _ = writeln!(
            s,
            "summary (min / median / max over {} updates):",
            self.updates.len()
        );
        let _ = writeln!(
            s,
            "   guest blackout (longest heartbeat gap)  {}",
            self.summary.blackout_micros.human()
        );
        let _ = writeln!(
            s,
            "   vmmd pause (pause to resume)            {}",
            self.summary.vmmd_pause_micros.human()
        );
        let _ = writeln!(
            s,
            "   update total (cprctl update)            {}",
            self.summary.total_micros.human()
        );
        let _ = writeln!(s, "OK");
        s
    }
}

/// Runs the demo; update progress goes to stderr (JSON lines with `json`).
pub async fn run(args: DemoArgs, json: bool) -> Result<DemoReport, DemoError> {
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
    let result = run_in(&args, json, memory_bytes, &vmmd, &kernel, &dir).await;
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
    json: bool,
    memory_bytes: u64,
    vmmd: &Path,
    kernel: &Path,
    dir: &Path,
) -> Result<DemoReport, DemoError> {
    let console_path = dir.join("console.sock");
    let spec = VmmdSpec {
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
    let mut vm = spec.spawn("vm").await?;
    let mut console = GuestConsole::connect(&console_path, dir).await?;
    let (ready, _) = console.wait_line("READY", READY_TIMEOUT).await?;
    let boot_to_ready_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);

    // 2. Verify and count.
    let verify_hash = verify(&mut console).await?;
    let (counters_before, beats_at_before) = console.command(b'c', "COUNTERS").await?;
    let quiet_from = Instant::now();
    tokio::time::sleep(STEADY_WINDOW).await;
    let steady_max_gap_micros = micros(console.max_gap(quiet_from, Instant::now()));

    // 3. Live updates.
    let mut updates = Vec::new();
    for n in 1..=args.updates {
        eprintln!("cprctl demo: live update {n}/{}", args.updates);
        let mut progress = StderrProgress {
            json,
            prefix: format!("cprctl demo: update {n}: "),
        };
        let from = Instant::now();
        let report = update::run(
            &vm.api_socket,
            &UpdateArgs::new(vmmd.to_path_buf()),
            &mut progress,
        )
        .await
        .map_err(|source| DemoError::Update {
            n,
            dir: dir.to_path_buf(),
            source: Box::new(source),
        })?;
        let done = Instant::now();
        console
            .wait_heartbeats(SETTLE_HEARTBEATS, COMMAND_TIMEOUT)
            .await?;
        let blackout = console.max_gap_across(from, done);
        updates.push(DemoUpdate {
            n,
            blackout_micros: micros(blackout),
            vmmd_pause_micros: report.vmmd_pause_micros.unwrap_or(0),
            total_micros: report.total_micros,
            phases: report.phases,
            old_version: report.old_version,
            new_version: report.new_version.unwrap_or_default(),
            generation: report.generation_after.unwrap_or(0),
        });
    }

    // 4. The guest carried on.
    let (counters_after, beats_at_after) = console.command(b'c', "COUNTERS").await?;
    check_continues(&counters_before, &counters_after)?;
    let hb = |l: &str| {
        field(l, "hb")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let heartbeats_counted = hb(&counters_after).saturating_sub(hb(&counters_before));
    let heartbeats_received = beats_at_after - beats_at_before;
    if heartbeats_counted != heartbeats_received {
        return Err(DemoError::Guest {
            problem: "sent heartbeats the console did not receive exactly once",
            line: format!(
                "the guest counted {heartbeats_counted} between the COUNTERS lines, the console \
                 received {heartbeats_received}"
            ),
        });
    }
    let hash_after = verify(&mut console).await?;
    if hash_after != verify_hash {
        return Err(DemoError::Guest {
            problem: "memory hash changed across the live updates",
            line: format!("before {verify_hash}, after {hash_after}"),
        });
    }
    let info = vm
        .api
        .info(InfoRequest {})
        .await
        .map_err(|s| ClientError::rpc("info", s))?
        .into_inner();
    if info.pid != vm.pid {
        return Err(DemoError::Guest {
            problem: "is run by another process after the updates",
            line: format!("vmmd pid {} then {}", vm.pid, info.pid),
        });
    }
    let _ = vm.reconnect().await?.quit(QuitRequest {}).await;
    vm.wait_exit().await?;

    let summary = DemoSummary {
        blackout_micros: Spread::of(
            &updates
                .iter()
                .map(|u| u.blackout_micros)
                .collect::<Vec<_>>(),
        ),
        vmmd_pause_micros: Spread::of(
            &updates
                .iter()
                .map(|u| u.vmmd_pause_micros)
                .collect::<Vec<_>>(),
        ),
        total_micros: Spread::of(&updates.iter().map(|u| u.total_micros).collect::<Vec<_>>()),
    };
    Ok(DemoReport {
        ok: true,
        dir: dir.display().to_string(),
        vcpus: args.vcpus,
        memory_bytes,
        pid: vm.pid,
        boot_to_ready_ms,
        ready,
        verify_hash,
        counters_before,
        counters_after,
        heartbeats_received,
        heartbeats_counted,
        steady_max_gap_micros,
        updates,
        summary,
    })
}

/// Sends `v`; the hash of a `VERIFY OK` line.
async fn verify(console: &mut GuestConsole) -> Result<String, DemoError> {
    let (line, _) = console.command(b'v', "VERIFY").await?;
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
    fn spread_is_min_median_max() {
        assert_eq!(
            Spread::of(&[5, 1, 3]),
            Spread {
                min: 1,
                median: 3,
                max: 5
            }
        );
        assert_eq!(Spread::of(&[4, 2]).median, 3);
        assert_eq!(Spread::of(&[]), Spread::default());
    }

    #[test]
    fn missing_binaries_say_how_to_build_them() {
        let args = DemoArgs {
            vcpus: 1,
            memory: "64M".into(),
            updates: 3,
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
