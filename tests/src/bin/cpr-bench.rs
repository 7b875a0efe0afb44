//! `cpr-bench`: the project's figures as one JSON document on stdout (progress on stderr).
//!
//! `--mode save-restore`: per guest size and run, vmmd start → API ready / READY line / first
//! heartbeat; vmmd's resident memory without guest RAM; normal-mode save (Migrate `file:`) and
//! restore (`--incoming defer` + MigrateIncoming) as vmmd reports them (total, downtime, phases) and
//! by wall clock; min/median/max over `--runs`.
//!
//! `--mode cpr-exec`: per guest size, one guest live-updated `--updates` times with `cprctl update`'s
//! workflow (same binary). Per update: the guest-visible blackout (longest gap between heartbeat
//! bytes on the console from the last one before the update to the first one after it, host
//! monotonic clock), vmmd's pause and per-phase timings, and the update's total; min/median/max over
//! the updates, and flatness = median at the largest size / median at the smallest. Before the
//! updates, the steady-state heartbeat gap distribution (p50/p99/max over `--steady-secs` without
//! an update), the noise floor the blackout must be read against.
//!
//! With `qemu-system-x86_64` 10.0 or newer installed (`--qemu` names another binary, `--no-qemu`
//! skips it), each size is then measured again in the same run with QEMU as the peer: the same
//! test guest (`-kernel`), RAM size and vCPU count, RAM in a shared memfd, live-updated
//! `--updates` times with QEMU's cpr-transfer into a freshly started QEMU (see `cpr_tests::qemu`
//! for the command line and how the console survives). Per update: the blackout by the same
//! definition, `migrate` → new QEMU `running`, new QEMU spawned → `running` (QEMU's update total:
//! unlike cpr-exec, the new process starts before the pause), QEMU's own `downtime`; and the
//! steady-state gap distribution under QEMU. `ratio` = vmmd's median ÷ QEMU's median.
//!
//! `--mode all` (default) does both. Run it from release binaries (`cargo run --release --bin
//! cpr-bench`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use cpr_tests::cpr::update_in_process;
use cpr_tests::qemu::{self, ConsoleServer, QemuConfig, QemuProcess};
use cpr_tests::smaps::process_rss_excluding_guest_ram;
use cpr_tests::vmmd::READY_TIMEOUT;
use cpr_tests::{
    MigrationInfo, MigrationStatus, Ready, RunState, TestDir, VmmdOptions, VmmdProcess,
};
use cprctl::update::UpdateArgs;
use serde::Serialize;
use serde_json::{json, Value};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// Boot, overhead, normal-mode save/restore.
    SaveRestore,
    /// Live update (cpr-exec): blackout, vmmd's pause and phases, flatness.
    CprExec,
    /// Both.
    All,
}

/// Measure vmmd boot, overhead, normal-mode save/restore and cpr-exec live updates.
#[derive(Debug, Parser)]
#[command(name = "cpr-bench")]
struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::All)]
    mode: Mode,
    /// save-restore: runs per size.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// cpr-exec: live updates per size, for vmmd and for QEMU (at least 10 for the figures that matter).
    #[arg(long, default_value_t = 10)]
    updates: usize,
    /// Guest RAM sizes, comma separated (default: 256M,1G).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<String>>,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Back guest RAM by a file in this directory instead of a memfd (e.g. /dev/shm).
    #[arg(long)]
    memory_dir: Option<std::path::PathBuf>,
    /// cpr-exec: seconds of undisturbed heartbeats for the steady-state gap distribution.
    #[arg(long, default_value_t = 2.0)]
    steady_secs: f64,
    /// cpr-exec: the QEMU (10.0 or newer) to measure as the peer, with cpr-transfer.
    #[arg(long, default_value = qemu::DEFAULT_BINARY)]
    qemu: std::path::PathBuf,
    /// cpr-exec: do not measure QEMU.
    #[arg(long)]
    no_qemu: bool,
}

/// One run's raw figures, in milliseconds unless named otherwise.
#[derive(Debug, Default, Serialize)]
struct Sample {
    api_ready_ms: f64,
    ready_line_ms: f64,
    first_heartbeat_ms: f64,
    console_connected_ms: f64,
    rss_excluding_guest_ram_kib: f64,
    save_wall_ms: f64,
    save: Value,
    restore_wall_ms: f64,
    restore_to_first_heartbeat_ms: f64,
    restore: Value,
}

/// Rounded to the microsecond: more digits would only be noise.
fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

fn ms(d: Duration) -> f64 {
    round3(d.as_secs_f64() * 1e3)
}

/// The figures vmmd reports for a migration, in milliseconds.
fn migration_figures(info: &MigrationInfo) -> Value {
    let phases: BTreeMap<_, _> = info
        .phases
        .iter()
        .map(|p| (p.name.clone(), round3(p.micros as f64 / 1e3)))
        .collect();
    json!({
        "total_ms": info.total_micros as f64 / 1e3,
        "downtime_ms": info.downtime_micros as f64 / 1e3,
        "ram_bytes": info.ram_bytes,
        "state_bytes": info.state_bytes,
        "phases_ms": phases,
    })
}

/// Removes a file-backed guest RAM file when a run ends, however it ends.
struct RemoveOnDrop(Option<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn one_run(size: &str, args: &Args) -> Result<Sample> {
    let dir = TestDir::new("bench");
    let mut opts = VmmdOptions::new(args.vcpus, size).in_dir(&dir);
    if let Some(mem_dir) = &args.memory_dir {
        opts = opts.memory_path(mem_dir.join(format!("cpr-bench-{}.ram", std::process::id())));
    }
    let _ram_file = RemoveOnDrop(opts.memory_path.clone());
    let mut s = Sample::default();

    // Boot and overhead.
    let (mut src, mut console) = VmmdProcess::spawn_with_console(opts.clone());
    let t0 = src.spawned_at;
    s.api_ready_ms = ms(src.api_ready_at - t0);
    s.console_connected_ms = ms(console.connected_at() - t0);
    let ready_line = console
        .try_wait_for_line("READY", READY_TIMEOUT)
        .context("the guest printed no READY line")?;
    let ready = Ready::parse(&ready_line).context("bad READY line")?;
    ensure!(
        ready.cpus == args.vcpus,
        "guest runs on {} vCPUs, not {}",
        ready.cpus,
        args.vcpus
    );
    s.ready_line_ms = ms(console
        .lines()
        .iter()
        .find(|l| l.text == ready_line)
        .map_or(Duration::ZERO, |l| l.at - t0));
    ensure!(
        console.wait_for_heartbeats(t0, 200, Duration::from_secs(60)),
        "no heartbeats after READY"
    );
    let first = console.first_heartbeat().context("no heartbeat recorded")?;
    s.first_heartbeat_ms = ms(first - t0);
    s.rss_excluding_guest_ram_kib =
        process_rss_excluding_guest_ram(src.pid(), opts.memory_path.as_deref())
            .context("reading vmmd's smaps")? as f64
            / 1024.0;
    s.rss_excluding_guest_ram_kib = round3(s.rss_excluding_guest_ram_kib);
    let hash = console.verify().expect_ok();

    // Save.
    let state = dir.join("vm.state");
    let uri = format!("file:{}", state.display());
    let start = Instant::now();
    let info = src.api().migrate(&uri).context("Migrate")?;
    s.save_wall_ms = ms(start.elapsed());
    ensure!(
        info.status == MigrationStatus::Completed as i32,
        "save failed: {info:?}"
    );
    s.save = migration_figures(&info);
    src.quit();
    drop(console);

    // Restore.
    let dst = VmmdProcess::spawn(opts.incoming("defer"));
    let mut console = dst.console();
    let start = Instant::now();
    let info = dst
        .api()
        .migrate_incoming(&uri)
        .context("MigrateIncoming")?;
    s.restore_wall_ms = ms(start.elapsed());
    ensure!(
        info.status == MigrationStatus::Completed as i32,
        "restore failed: {info:?}"
    );
    s.restore = migration_figures(&info);
    ensure!(
        console.wait_for_heartbeats(start, 1, Duration::from_secs(60)),
        "no heartbeat after the restore"
    );
    let first = console
        .first_heartbeat_since(start)
        .context("no heartbeat after the restore")?;
    s.restore_to_first_heartbeat_ms = ms(first - start);
    if console.verify().expect_ok() != hash {
        bail!("memory hash changed across save/restore");
    }
    ensure!(
        dst.api().run_state() == RunState::Running,
        "restored VM is not running"
    );
    Ok(s)
}

/// min/median/max of `values`.
fn stats(values: &[f64]) -> Value {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    json!({
        "min": round3(v[0]),
        "median": round3(median),
        "max": round3(v[v.len() - 1]),
        "n": v.len(),
    })
}

fn field_stats(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> Value {
    stats(&samples.iter().map(f).collect::<Vec<_>>())
}

fn migration_stats(samples: &[Sample], f: impl Fn(&Sample) -> &Value) -> Value {
    let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in samples {
        if let Some(map) = f(s)["phases_ms"].as_object() {
            for (name, v) in map {
                phases
                    .entry(name.clone())
                    .or_default()
                    .push(v.as_f64().unwrap_or(f64::NAN));
            }
        }
    }
    json!({
        "total_ms": stats(&samples.iter().map(|s| num(f(s), "total_ms")).collect::<Vec<_>>()),
        "downtime_ms": stats(&samples.iter().map(|s| num(f(s), "downtime_ms")).collect::<Vec<_>>()),
        "phases_ms": phases.iter().map(|(k, v)| (k.clone(), stats(v))).collect::<BTreeMap<_, _>>(),
        "ram_bytes": samples.first().map(|s| f(s)["ram_bytes"].clone()),
        "state_bytes": samples.first().map(|s| f(s)["state_bytes"].clone()),
    })
}

fn save_restore(args: &Args) -> Result<Value> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    let default = ["256M".to_owned(), "1G".to_owned()];
    let mut sizes = Vec::new();
    for size in args.sizes.as_deref().unwrap_or(&default) {
        let bytes = cpr_common::size::parse_size(size)
            .with_context(|| format!("bad size {size:?} in --sizes"))?;
        let mut samples = Vec::new();
        for run in 1..=args.runs {
            eprintln!("cpr-bench: {size} run {run}/{}", args.runs);
            let sample = one_run(size, args).with_context(|| format!("{size} run {run}"))?;
            eprintln!(
                "cpr-bench:   first heartbeat {:.1} ms, rss {:.0} KiB, save {:.1} ms, restore {:.1} ms",
                sample.first_heartbeat_ms,
                sample.rss_excluding_guest_ram_kib,
                sample.save_wall_ms,
                sample.restore_wall_ms
            );
            samples.push(sample);
        }
        sizes.push(json!({
            "size": size,
            "memory_bytes": bytes,
            "boot": {
                "api_ready_ms": field_stats(&samples, |s| s.api_ready_ms),
                "console_connected_ms": field_stats(&samples, |s| s.console_connected_ms),
                "ready_line_ms": field_stats(&samples, |s| s.ready_line_ms),
                "first_heartbeat_ms": field_stats(&samples, |s| s.first_heartbeat_ms),
            },
            "rss_excluding_guest_ram_kib": field_stats(&samples, |s| s.rss_excluding_guest_ram_kib),
            "save": {
                "wall_ms": field_stats(&samples, |s| s.save_wall_ms),
                "vmmd": migration_stats(&samples, |s| &s.save),
            },
            "restore": {
                "wall_ms": field_stats(&samples, |s| s.restore_wall_ms),
                "to_first_heartbeat_ms": field_stats(&samples, |s| s.restore_to_first_heartbeat_ms),
                "vmmd": migration_stats(&samples, |s| &s.restore),
            },
            "samples": samples,
        }));
    }
    Ok(json!({
        "benchmark": "vmmd boot, overhead and normal-mode save/restore",
        "runs": args.runs,
        "sizes": sizes,
    }))
}

/// One live update's figures, in milliseconds.
#[derive(Debug, Default, Serialize)]
struct UpdateSample {
    blackout_ms: f64,
    vmmd_pause_ms: f64,
    total_ms: f64,
    phases_ms: BTreeMap<String, f64>,
}

/// Live-updates one guest of `size` `args.updates` times.
fn cpr_exec_size(size: &str, args: &Args) -> Result<Value> {
    let dir = TestDir::new("bench-cpr");
    let mut opts = VmmdOptions::new(args.vcpus, size).in_dir(&dir);
    if let Some(mem_dir) = &args.memory_dir {
        opts = opts.memory_path(mem_dir.join(format!("cpr-bench-{}.ram", std::process::id())));
    }
    let _ram_file = RemoveOnDrop(opts.memory_path.clone());
    let (vmm, mut console) = VmmdProcess::spawn_with_console(opts);
    console
        .try_wait_for_line("READY", READY_TIMEOUT)
        .context("the guest printed no READY line")?;
    ensure!(
        console.wait_for_heartbeats(vmm.spawned_at, 500, Duration::from_secs(60)),
        "no heartbeats after READY"
    );
    let hash = console.verify().expect_ok();
    let before = console.counters();
    // The steady state, for comparison: the gaps between heartbeats without an update.
    let quiet = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.steady_secs));
    let steady = qemu::gap_distribution(&qemu::gaps_ms(
        &heartbeat_times(&console),
        quiet,
        Instant::now(),
    ));

    let binary = cpr_tests::bins::vmmd();
    let mut samples = Vec::new();
    for n in 1..=args.updates {
        let from = Instant::now();
        let report = update_in_process(&vmm.api_socket, &UpdateArgs::new(binary.clone()))
            .map_err(|f| anyhow::anyhow!("update {n}: {f}; report {:?}", f.report))?;
        let to = Instant::now();
        ensure!(
            console.wait_for_heartbeats(to, 200, Duration::from_secs(60)),
            "no heartbeats after update {n}"
        );
        let sample = UpdateSample {
            blackout_ms: ms(console.max_heartbeat_gap_across(from, to)),
            vmmd_pause_ms: round3(report.vmmd_pause_micros.unwrap_or(0) as f64 / 1e3),
            total_ms: round3(report.total_micros as f64 / 1e3),
            phases_ms: report
                .phases
                .iter()
                .map(|p| (p.name.clone(), round3(p.micros as f64 / 1e3)))
                .collect(),
        };
        eprintln!(
            "cpr-bench:   {size} update {n}/{}: blackout {:.2} ms, vmmd pause {:.2} ms, total {:.1} ms",
            args.updates, sample.blackout_ms, sample.vmmd_pause_ms, sample.total_ms
        );
        samples.push(sample);
    }
    ensure!(
        console.verify().expect_ok() == hash,
        "memory hash changed across the updates"
    );
    console.counters().assert_continues(&before);
    ensure!(
        console.failures().is_empty(),
        "the guest reported failures: {:?}",
        console.failures()
    );
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in &samples {
        for (name, v) in &s.phases_ms {
            phases.entry(name.clone()).or_default().push(*v);
        }
    }
    Ok(json!({
        "size": size,
        "memory_bytes": cpr_common::size::parse_size(size)?,
        "steady_state_gaps_ms": steady,
        "blackout_ms": field_stats_of(&samples, |s| s.blackout_ms),
        "vmmd_pause_ms": field_stats_of(&samples, |s| s.vmmd_pause_ms),
        "update_total_ms": field_stats_of(&samples, |s| s.total_ms),
        "phases_ms": phases.iter().map(|(k, v)| (k.clone(), stats(v))).collect::<BTreeMap<_, _>>(),
        "samples": samples,
    }))
}

/// When each heartbeat byte arrived (the time of the read that brought it).
fn heartbeat_times(console: &cpr_tests::Console) -> Vec<Instant> {
    let (raw, reads) = console.raw();
    let mut splitter = cpr_tests::console::LineSplitter::default();
    let mut out = Vec::new();
    for (i, &(at, offset)) in reads.iter().enumerate() {
        let end = reads.get(i + 1).map_or(raw.len(), |r| r.1);
        for &b in &raw[offset..end] {
            if let Some(cpr_tests::console::Token::Heartbeat) = splitter.push(b) {
                out.push(at);
            }
        }
    }
    out
}

/// One QEMU cpr-transfer's figures, in milliseconds.
#[derive(Debug, Default, Serialize)]
struct QemuSample {
    blackout_ms: f64,
    /// `migrate` issued on the old QEMU → the new one reports `running`.
    migrate_to_running_ms: f64,
    /// New QEMU spawned → it reports `running`.
    total_ms: f64,
    /// New QEMU spawned → old QEMU quit and reaped.
    total_with_quit_ms: f64,
    /// QEMU's own `downtime` and `total-time` (`query-migrate`, whole milliseconds).
    qemu_downtime_ms: f64,
    qemu_total_time_ms: f64,
}

/// Boots the test guest under QEMU with `size` of RAM and cpr-transfers it `args.updates` times.
fn qemu_size(size: &str, args: &Args) -> Result<Value> {
    let memory_bytes = cpr_common::size::parse_size(size)?;
    let dir = TestDir::new("bench-qemu");
    let mut console = ConsoleServer::bind(&dir.join("com1.sock"))?;
    let config = QemuConfig {
        binary: args.qemu.clone(),
        kernel: cpr_tests::bins::testguest(),
        vcpus: args.vcpus,
        memory_bytes,
        dir: dir.path().to_path_buf(),
        console: console.path().to_path_buf(),
    };
    let boot = Instant::now();
    let mut vm = QemuProcess::boot(&config)?;
    let ready = console
        .wait_for_line("READY", READY_TIMEOUT)
        .with_context(|| format!("no READY line under QEMU; last lines {:?}", console.tail()))?;
    let ready = Ready::parse(&ready.text).context("bad READY line")?;
    ensure!(
        ready.cpus == args.vcpus,
        "guest runs on {} vCPUs under QEMU, not {}",
        ready.cpus,
        args.vcpus
    );
    ensure!(
        console.wait_for_heartbeats(boot, 500, Duration::from_secs(60)),
        "no heartbeats after READY under QEMU"
    );
    let first_heartbeat_ms = console
        .heartbeats()
        .first()
        .map_or(f64::NAN, |&t| ms(t - boot));
    let hash = console.verify()?;
    let (c0, received0) = console.counters()?;
    let quiet = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.steady_secs));
    let steady =
        qemu::gap_distribution(&qemu::gaps_ms(&console.heartbeats(), quiet, Instant::now()));

    let mut samples = Vec::new();
    for n in 1..=args.updates {
        let (next, t) = vm
            .cpr_transfer(&config)
            .with_context(|| format!("QEMU cpr-transfer {n}"))?;
        vm = next;
        ensure!(
            console.wait_for_heartbeats(t.running, 200, Duration::from_secs(60)),
            "no heartbeats after QEMU cpr-transfer {n}"
        );
        let num = |k: &str| t.info[k].as_f64().unwrap_or(f64::NAN);
        let sample = QemuSample {
            blackout_ms: ms(qemu::blackout(&console.heartbeats(), t.migrate, t.running)),
            migrate_to_running_ms: ms(t.running - t.migrate),
            total_ms: ms(t.running - t.spawned),
            total_with_quit_ms: ms(t.old_quit - t.spawned),
            qemu_downtime_ms: num("downtime"),
            qemu_total_time_ms: num("total-time"),
        };
        eprintln!(
            "cpr-bench:   {size} QEMU cpr-transfer {n}/{}: blackout {:.2} ms, migrate→running {:.2} ms, total {:.1} ms",
            args.updates, sample.blackout_ms, sample.migrate_to_running_ms, sample.total_ms
        );
        samples.push(sample);
    }
    ensure!(
        console.verify()? == hash,
        "memory hash changed across QEMU's cpr-transfers"
    );
    let (c1, received1) = console.counters()?;
    ensure!(
        console.failures().is_empty(),
        "the guest reported failures under QEMU: {:?}",
        console.failures()
    );
    vm.quit();
    // Heartbeats the guest counted but the console never delivered (e.g. emitted while no QEMU
    // chardev was connected): they would hide part of a blackout. Expected 0.
    let lost = (c1.hb - c0.hb) as i64 - (received1 - received0) as i64;
    Ok(json!({
        "version": qemu::version(&args.qemu).map(|(a, b, c)| format!("{a}.{b}.{c}")).unwrap_or_default(),
        "mode": "cpr-transfer",
        "first_heartbeat_ms": first_heartbeat_ms,
        "steady_state_gaps_ms": steady,
        "blackout_ms": field_stats_of(&samples, |s| s.blackout_ms),
        "migrate_to_running_ms": field_stats_of(&samples, |s| s.migrate_to_running_ms),
        "update_total_ms": field_stats_of(&samples, |s| s.total_ms),
        "update_total_with_quit_ms": field_stats_of(&samples, |s| s.total_with_quit_ms),
        "qemu_downtime_ms": field_stats_of(&samples, |s| s.qemu_downtime_ms),
        "qemu_total_time_ms": field_stats_of(&samples, |s| s.qemu_total_time_ms),
        "heartbeats_lost": lost,
        "console_connections": console.connections(),
        "samples": samples,
    }))
}

/// Whether QEMU can be the peer; the reason (and how to install it) when it cannot.
fn qemu_usable(args: &Args) -> std::result::Result<(), String> {
    if args.no_qemu {
        return Err("--no-qemu".into());
    }
    match qemu::version(&args.qemu) {
        Ok((major, ..)) if major >= 10 => Ok(()),
        Ok((a, b, c)) => Err(format!(
            "{} is QEMU {a}.{b}.{c}, without cpr-transfer. {}",
            args.qemu.display(),
            qemu::INSTALL_HINT
        )),
        Err(e) => Err(format!("{e:#}. {}", qemu::INSTALL_HINT)),
    }
}

/// `vmmd[key].median / qemu[key].median`.
fn ratio(vmmd: &Value, qemu: &Value, key: &str, stat: &str) -> Value {
    match (vmmd[key][stat].as_f64(), qemu[key][stat].as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!(round3(a / b)),
        _ => Value::Null,
    }
}

fn field_stats_of<T>(samples: &[T], f: impl Fn(&T) -> f64) -> Value {
    stats(&samples.iter().map(f).collect::<Vec<_>>())
}

/// `median(largest) / median(smallest)` of `key` over the sizes (first and last given).
fn flatness(sizes: &[Value], key: &str) -> Value {
    let median = |v: &Value| v[key]["median"].as_f64();
    match (sizes.first(), sizes.last()) {
        (Some(a), Some(b)) if sizes.len() > 1 => match (median(a), median(b)) {
            (Some(x), Some(y)) if x > 0.0 => json!({
                "ratio": round3(y / x),
                "of": format!("{} / {}", b["size"].as_str().unwrap_or("?"), a["size"].as_str().unwrap_or("?")),
            }),
            _ => Value::Null,
        },
        _ => Value::Null,
    }
}

fn cpr_exec(args: &Args) -> Result<Value> {
    ensure!(args.updates > 0, "--updates must be at least 1");
    let default = ["256M".to_owned(), "1G".to_owned()];
    let peer = qemu_usable(args);
    if let Err(why) = &peer {
        eprintln!("cpr-bench: not measuring QEMU: {why}");
    }
    let mut sizes = Vec::new();
    let mut vmmd_sizes = Vec::new();
    let mut qemu_sizes = Vec::new();
    for size in args.sizes.as_deref().unwrap_or(&default) {
        let memory_bytes = cpr_common::size::parse_size(size)
            .with_context(|| format!("bad size {size:?} in --sizes"))?;
        eprintln!("cpr-bench: cpr-exec, {size}: booting vmmd");
        let vmmd = cpr_exec_size(size, args).with_context(|| format!("cpr-exec {size}"))?;
        let qemu = match &peer {
            Ok(()) => {
                eprintln!("cpr-bench: QEMU cpr-transfer, {size}: booting QEMU");
                let mut q =
                    qemu_size(size, args).with_context(|| format!("QEMU cpr-transfer {size}"))?;
                q["size"] = json!(size);
                qemu_sizes.push(q.clone());
                q
            }
            Err(why) => json!({ "skipped": why }),
        };
        let ratios = json!({
            "blackout_median": ratio(&vmmd, &qemu, "blackout_ms", "median"),
            "blackout_min": ratio(&vmmd, &qemu, "blackout_ms", "min"),
            "blackout_max": ratio(&vmmd, &qemu, "blackout_ms", "max"),
            "update_total_median": ratio(&vmmd, &qemu, "update_total_ms", "median"),
            "steady_state_gap_max": match (vmmd["steady_state_gaps_ms"]["max"].as_f64(), qemu["steady_state_gaps_ms"]["max"].as_f64()) {
                (Some(a), Some(b)) if b > 0.0 => json!(round3(a / b)),
                _ => Value::Null,
            },
        });
        if let Some(r) = ratios["blackout_median"].as_f64() {
            eprintln!("cpr-bench: {size}: blackout median vmmd / QEMU = {r:.3}");
        }
        vmmd_sizes.push(vmmd.clone());
        sizes.push(json!({
            "size": size,
            "memory_bytes": memory_bytes,
            "vmmd": vmmd,
            "qemu": qemu,
            "ratio_vmmd_over_qemu": ratios,
        }));
    }
    Ok(json!({
        "benchmark": "cpr-exec live update (cprctl update, same binary) vs QEMU cpr-transfer",
        "updates": args.updates,
        "steady_secs": args.steady_secs,
        "flatness": {
            "blackout": flatness(&vmmd_sizes, "blackout_ms"),
            "vmmd_pause": flatness(&vmmd_sizes, "vmmd_pause_ms"),
            "qemu_blackout": flatness(&qemu_sizes, "blackout_ms"),
        },
        "sizes": sizes,
    }))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut doc = json!({
        "vcpus": args.vcpus,
        "memory_backing": if args.memory_dir.is_some() { "file" } else { "memfd" },
        "binaries": cpr_tests::bins::bin_dir().display().to_string(),
        "host": {
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        },
    });
    if matches!(args.mode, Mode::SaveRestore | Mode::All) {
        doc["save_restore"] = save_restore(&args)?;
    }
    if matches!(args.mode, Mode::CprExec | Mode::All) {
        doc["cpr_exec"] = cpr_exec(&args)?;
    }
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_min_median_max() {
        assert_eq!(
            stats(&[5.0, 1.0, 3.0]),
            json!({"min": 1.0, "median": 3.0, "max": 5.0, "n": 3})
        );
        assert_eq!(stats(&[4.0, 1.0])["median"], 2.5);
        assert_eq!(stats(&[f64::NAN]), Value::Null);
    }

    #[test]
    fn sizes_and_runs_parse() {
        let a = Args::try_parse_from(["cpr-bench", "--runs", "3", "--sizes", "256M,1G"])
            .expect("parses");
        assert_eq!(a.runs, 3);
        assert_eq!(
            a.sizes.as_deref(),
            Some(&["256M".to_owned(), "1G".to_owned()][..])
        );
        assert_eq!(a.mode, Mode::All);
        let a = Args::try_parse_from(["cpr-bench", "--mode", "cpr-exec", "--updates", "12"])
            .expect("parses");
        assert_eq!(a.mode, Mode::CprExec);
        assert_eq!(a.updates, 12);
        assert!(a.sizes.is_none());
        assert!(!a.no_qemu);
        assert_eq!(a.qemu, std::path::Path::new(qemu::DEFAULT_BINARY));
        let a = Args::try_parse_from([
            "cpr-bench",
            "--no-qemu",
            "--qemu",
            "/opt/q",
            "--steady-secs",
            "0.5",
        ])
        .expect("parses");
        assert!(a.no_qemu);
        assert_eq!(a.qemu, std::path::Path::new("/opt/q"));
        assert_eq!(a.steady_secs, 0.5);
        assert_eq!(qemu_usable(&a), Err("--no-qemu".to_owned()));
    }

    #[test]
    fn flatness_is_largest_over_smallest_median() {
        let sizes = [
            json!({"size": "256M", "blackout_ms": {"median": 2.0}}),
            json!({"size": "1G", "blackout_ms": {"median": 9.0}}),
            json!({"size": "4G", "blackout_ms": {"median": 2.5}}),
        ];
        assert_eq!(
            flatness(&sizes, "blackout_ms"),
            json!({"ratio": 1.25, "of": "4G / 256M"})
        );
        assert_eq!(flatness(&sizes[..1], "blackout_ms"), Value::Null);
    }

    #[test]
    fn ratio_is_vmmd_over_qemu() {
        let v = json!({"blackout_ms": {"median": 2.0}});
        let q = json!({"blackout_ms": {"median": 4.0}});
        assert_eq!(ratio(&v, &q, "blackout_ms", "median"), json!(0.5));
        assert_eq!(
            ratio(&v, &json!({"skipped": "x"}), "blackout_ms", "median"),
            Value::Null
        );
    }
}
