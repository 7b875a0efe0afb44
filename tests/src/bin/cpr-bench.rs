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
//! the updates, and flatness = median at the largest size / median at the smallest.
//!
//! `--mode all` (default) does both. Run it from release binaries (`cargo run --release --bin
//! cpr-bench`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use cpr_tests::cpr::update_in_process;
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
    /// cpr-exec: live updates per size (at least 10 for the figures that matter).
    #[arg(long, default_value_t = 10)]
    updates: usize,
    /// Guest RAM sizes, comma separated (default: 256M,1G for save-restore, 256M,1G,4G for cpr-exec).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<String>>,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Back guest RAM by a file in this directory instead of a memfd (e.g. /dev/shm).
    #[arg(long)]
    memory_dir: Option<std::path::PathBuf>,
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
    // The steady state, for comparison: the longest gap in a second without an update.
    let quiet = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let steady_ms = ms(console.max_heartbeat_gap(quiet, Instant::now()));

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
        "steady_state_max_gap_ms": steady_ms,
        "blackout_ms": field_stats_of(&samples, |s| s.blackout_ms),
        "vmmd_pause_ms": field_stats_of(&samples, |s| s.vmmd_pause_ms),
        "update_total_ms": field_stats_of(&samples, |s| s.total_ms),
        "phases_ms": phases.iter().map(|(k, v)| (k.clone(), stats(v))).collect::<BTreeMap<_, _>>(),
        "samples": samples,
    }))
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
    let default = ["256M".to_owned(), "1G".to_owned(), "4G".to_owned()];
    let mut sizes = Vec::new();
    for size in args.sizes.as_deref().unwrap_or(&default) {
        cpr_common::size::parse_size(size)
            .with_context(|| format!("bad size {size:?} in --sizes"))?;
        eprintln!("cpr-bench: cpr-exec, {size}: booting");
        sizes.push(cpr_exec_size(size, args).with_context(|| format!("cpr-exec {size}"))?);
    }
    Ok(json!({
        "benchmark": "cpr-exec live update (cprctl update, same binary)",
        "updates": args.updates,
        "flatness": {
            "blackout": flatness(&sizes, "blackout_ms"),
            "vmmd_pause": flatness(&sizes, "vmmd_pause_ms"),
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
}
