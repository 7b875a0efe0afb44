//! `cpr-bench`: issue 2's figures as one JSON document on stdout (progress on stderr).
//!
//! Per guest size and run: vmmd start → API ready / READY line / first heartbeat; vmmd's resident
//! memory without guest RAM; normal-mode save (Migrate `file:`) and restore (`--incoming defer` +
//! MigrateIncoming) as vmmd reports them (total, downtime, phases) and by wall clock.
//! Each figure is reported as min/median/max over `--runs`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use cpr_tests::smaps::process_rss_excluding_guest_ram;
use cpr_tests::vmmd::READY_TIMEOUT;
use cpr_tests::{
    MigrationInfo, MigrationStatus, Ready, RunState, TestDir, VmmdOptions, VmmdProcess,
};
use serde::Serialize;
use serde_json::{json, Value};

/// Measure vmmd boot, overhead and normal-mode save/restore.
#[derive(Debug, Parser)]
#[command(name = "cpr-bench")]
struct Args {
    /// Runs per size.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Guest RAM sizes, comma separated.
    #[arg(long, default_value = "256M,1G", value_delimiter = ',')]
    sizes: Vec<String>,
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

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.runs > 0, "--runs must be at least 1");
    let mut sizes = Vec::new();
    for size in &args.sizes {
        let bytes = cpr_common::size::parse_size(size)
            .with_context(|| format!("bad size {size:?} in --sizes"))?;
        let mut samples = Vec::new();
        for run in 1..=args.runs {
            eprintln!("cpr-bench: {size} run {run}/{}", args.runs);
            let sample = one_run(size, &args).with_context(|| format!("{size} run {run}"))?;
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
    let doc = json!({
        "benchmark": "vmmd boot, overhead and normal-mode save/restore",
        "vcpus": args.vcpus,
        "runs": args.runs,
        "memory_backing": if args.memory_dir.is_some() { "file" } else { "memfd" },
        "host": {
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        },
        "sizes": sizes,
    });
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
        assert_eq!(a.sizes, ["256M", "1G"]);
    }
}
