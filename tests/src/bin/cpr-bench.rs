//! `cpr-bench`: the project's figures as one JSON document on stdout (progress on stderr).
//!
//! `--mode save-restore`: per guest size and run, vmmd start → API ready / READY line / first
//! heartbeat; vmmd's resident memory without guest RAM; normal-mode save (Migrate `file:`) and
//! restore (`--incoming defer` + MigrateIncoming) as vmmd reports them (total, downtime, phases) and
//! by wall clock; min/median/max over `--runs`. With QEMU (below), the same guest under QEMU saved
//! to a file with the `mapped-ram` capability (`stop`, `migrate file:`) and restored into a fresh
//! QEMU (`-incoming defer`, `migrate-incoming file:`, `cont`), `--runs` times in a chain; `ratio`
//! = vmmd's median save (restore) wall time ÷ QEMU's.
//!
//! `--mode cpr-exec`: per guest size, one guest live-updated `--updates` times with `cprctl update`'s
//! workflow (same binary). Per update: the guest-visible blackout (longest gap between heartbeat
//! bytes on the console from the last one before the update to the first one after it, host
//! monotonic clock), vmmd's pause and per-phase timings, and the update's total; min/median/max over
//! the updates, and flatness = median at the largest size / median at the smallest. Before the
//! updates, the steady-state heartbeat gap distribution (p50/p99/max over `--steady-secs` without
//! an update), the noise floor the blackout must be read against.
//!
//! `--mode cpr-reboot`: per guest size, one guest with RAM in a file (`--memory-dir`, default
//! /dev/shm) taken `--updates` times through a host reboot without the reboot: set mode
//! cpr-reboot, `Migrate file:` (the VM stops, RAM stays in its file), Quit, a fresh vmmd with
//! `--incoming defer` on the same RAM file, `MigrateIncoming file:`. Per cycle: the blackout (the
//! longest heartbeat gap across the cycle, the two vmmd processes' console connections merged) and
//! its split: save, quit (saved → old process reaped), start (spawn → API answers), load.
//!
//! Brownout (cpr-exec, cpr-reboot, vmmd and QEMU alike, unless `--brownout-secs 0`): for
//! `--brownout-secs` before each update and after it, the heartbeat rate, and the guest's
//! memory-sweep rate (its work-loop iterations, from COUNTERS answers polled every
//! `--brownout-poll-ms`); the brownout is how long after the resume the rate is back within 10 %
//! of the rate before (see `cpr_tests::brownout`).
//!
//! With `qemu-system-x86_64` 10.0 or newer installed (`--qemu` names another binary, `--no-qemu`
//! skips it), each size is then measured again in the same run with QEMU as the peer: the same
//! test guest (`-kernel`), RAM size and vCPU count. cpr-exec's peer is cpr-transfer: RAM in a
//! shared memfd, live-updated `--updates` times into a freshly started QEMU (see
//! `cpr_tests::qemu` for the command line and how the console survives). Per update: the
//! blackout by the same definition, `migrate` → new QEMU `running`, new QEMU spawned → `running`
//! (QEMU's update total: unlike cpr-exec, the new process starts before the pause), QEMU's own
//! `downtime`; and the steady-state gap distribution under QEMU. cpr-reboot's peer is QEMU's
//! cpr-reboot: RAM in a shared file on the same directory, `mode=cpr-reboot` + `x-ignore-shared`,
//! `migrate file:`, quit, a new QEMU with `-incoming defer`, `migrate-incoming file:`, split the
//! same way. `ratio` = vmmd's median ÷ QEMU's median.
//!
//! `--plots DIR` writes SVG files there: each mode's figure against guest RAM size (min / median /
//! max, vmmd and QEMU) and, per size, the heartbeat gaps from 300 ms before to 700 ms after the
//! resume of the update with the median blackout (vmmd and QEMU on one chart).
//!
//! `--mode all` (default) does all three. Run it from release binaries (`cargo run --release --bin
//! cpr-bench`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use cpr_tests::brownout::{self, Brownout, BrownoutSample, SweepSample};
use cpr_tests::cpr::update_in_process;
use cpr_tests::qemu::{self, ConsoleServer, QemuConfig, QemuProcess, QemuRam};
use cpr_tests::smaps::process_rss_excluding_guest_ram;
use cpr_tests::svg;
use cpr_tests::vmmd::READY_TIMEOUT;
use cpr_tests::{
    MigrationInfo, MigrationMode, MigrationStatus, Ready, RunState, TestDir, VmmdOptions,
    VmmdProcess,
};
use cprctl::update::UpdateArgs;
use serde::Serialize;
use serde_json::{json, Value};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// Boot, overhead, normal-mode save/restore.
    SaveRestore,
    /// Live update (cpr-exec): blackout, vmmd's pause and phases, flatness, brownout.
    CprExec,
    /// Host reboot without the reboot (cpr-reboot): save, quit, a fresh vmmd on the same RAM file,
    /// load; blackout and its split, brownout.
    CprReboot,
    /// All three.
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
    /// Do not measure QEMU.
    #[arg(long)]
    no_qemu: bool,
    /// cpr-exec, cpr-reboot: seconds before and after each update over which the brownout is
    /// judged (0: not measured).
    #[arg(long, default_value_t = 1.0)]
    brownout_secs: f64,
    /// cpr-exec, cpr-reboot: milliseconds between the guest's COUNTERS answers polled for the
    /// memory-sweep rate during the brownout windows (0: heartbeat rate only). Each answer costs
    /// the guest ≈ 2 ms of console output, before and after alike.
    #[arg(long, default_value_t = 100)]
    brownout_poll_ms: u64,
    /// cpr-exec, cpr-reboot: also time the guest's `v` (it reads all of its RAM) at the start of
    /// the window before each update and right after the resume: the full-RAM sweep that pays
    /// for re-faulting guest RAM. Off by default: it also slows the heartbeats in both windows.
    #[arg(long)]
    brownout_verify: bool,
    /// Write SVG plots here (blackout against guest RAM size, heartbeat gaps around one update).
    #[arg(long)]
    plots: Option<std::path::PathBuf>,
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

fn save_restore(args: &Args, plots: &mut Plots) -> Result<Value> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    let peer = qemu_usable(args);
    if let Err(why) = &peer {
        eprintln!("cpr-bench: not measuring QEMU: {why}");
    }
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
        let qemu = match &peer {
            Ok(()) => {
                eprintln!("cpr-bench: QEMU mapped-ram save/restore, {size}: booting QEMU");
                qemu_mapped_ram_size(size, args)
                    .with_context(|| format!("QEMU mapped-ram {size}"))?
            }
            Err(why) => json!({ "skipped": why }),
        };
        let wall = |v: &Value, k: &str| v[k]["wall_ms"]["median"].as_f64();
        let vmmd_figs = json!({
            "save": { "wall_ms": field_stats(&samples, |s| s.save_wall_ms) },
            "restore": { "wall_ms": field_stats(&samples, |s| s.restore_wall_ms) },
        });
        let r = |k: &str| match (wall(&vmmd_figs, k), wall(&qemu, k)) {
            (Some(a), Some(b)) if b > 0.0 => json!(round3(a / b)),
            _ => Value::Null,
        };
        let ratios = json!({
            "save_wall_median": r("save"),
            "restore_wall_median": r("restore"),
        });
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
            "qemu_mapped_ram": qemu,
            "ratio_vmmd_over_qemu_mapped_ram": ratios,
        }));
    }
    plots.against_ram(
        "save-restore-vs-ram",
        "Normal-mode save and restore to a file: vmmd vs QEMU mapped-ram",
        &sizes,
        &[
            ("vmmd save", "/save/wall_ms"),
            ("vmmd restore", "/restore/wall_ms"),
            ("QEMU save", "/qemu_mapped_ram/save/wall_ms"),
            ("QEMU restore", "/qemu_mapped_ram/restore/wall_ms"),
        ],
    );
    Ok(json!({
        "benchmark": "vmmd boot, overhead and normal-mode save/restore vs QEMU migration to a file with mapped-ram",
        "runs": args.runs,
        "sizes": sizes,
    }))
}

/// One QEMU save/restore through a file with `mapped-ram`, in milliseconds.
#[derive(Debug, Default, Serialize)]
struct MappedRamSample {
    /// `stop` → migration completed (the state and all RAM in the file).
    save_wall_ms: f64,
    /// `migrate` → completed.
    save_migrate_ms: f64,
    /// New QEMU's `migrate-incoming` → the guest runs (after `cont`).
    restore_wall_ms: f64,
    /// `migrate-incoming` → the load completed.
    restore_load_ms: f64,
    /// `migrate-incoming` → the first heartbeat.
    restore_to_first_heartbeat_ms: f64,
    /// New QEMU spawned → its monitor answers.
    restore_start_ms: f64,
    /// The old QEMU's `query-migrate`: `total-time`, `downtime`.
    qemu_save_total_time_ms: f64,
    qemu_save_downtime_ms: f64,
    file_bytes: u64,
}

/// Boots the test guest under QEMU (RAM in a shared memfd) and saves it to a file with
/// `mapped-ram` and restores it into a fresh QEMU, `args.runs` times in a chain.
fn qemu_mapped_ram_size(size: &str, args: &Args) -> Result<Value> {
    let mut g = qemu_boot(size, args, |_| QemuRam::Memfd {
        aux_ram_share: false,
    })?;
    let state = g.dir.join("vm.mapped-ram");
    let mut samples = Vec::new();
    for run in 1..=args.runs {
        let save =
            g.vm.save_mapped_ram(&state)
                .with_context(|| format!("QEMU mapped-ram save {run}"))?;
        let file_bytes = std::fs::metadata(&state).map_or(0, |m| m.len());
        g.vm.quit();
        let generation = g.vm.generation() + 1;
        let (new, r) = QemuProcess::restore_mapped_ram(&g.config, generation, &state)
            .with_context(|| format!("QEMU mapped-ram restore {run}"))?;
        g.vm = new;
        ensure!(
            g.console
                .wait_for_heartbeats(r.incoming, 1, Duration::from_secs(60)),
            "no heartbeat after QEMU mapped-ram restore {run}"
        );
        let hb = g.console.heartbeats();
        let first = hb[hb.partition_point(|&t| t < r.incoming)];
        let num = |k: &str| save.info[k].as_f64().unwrap_or(f64::NAN);
        let sample = MappedRamSample {
            save_wall_ms: ms(save.completed - save.start),
            save_migrate_ms: ms(save.completed - save.migrate),
            restore_wall_ms: ms(r.running - r.incoming),
            restore_load_ms: ms(r.loaded - r.incoming),
            restore_to_first_heartbeat_ms: ms(first - r.incoming),
            restore_start_ms: ms(r.monitor - r.spawned),
            qemu_save_total_time_ms: num("total-time"),
            qemu_save_downtime_ms: num("downtime"),
            file_bytes,
        };
        eprintln!(
            "cpr-bench:   {size} QEMU mapped-ram run {run}/{}: save {:.1} ms, restore {:.1} ms",
            args.runs, sample.save_wall_ms, sample.restore_wall_ms
        );
        let _ = std::fs::remove_file(&state);
        samples.push(sample);
    }
    let lost = g.finish("mapped-ram save/restores")?;
    Ok(json!({
        "version": qemu_version(args),
        "mode": "migrate file: with mapped-ram (stop, migrate; new QEMU -incoming defer, migrate-incoming, cont)",
        "save": {
            "wall_ms": field_stats_of(&samples, |s| s.save_wall_ms),
            "migrate_ms": field_stats_of(&samples, |s| s.save_migrate_ms),
            "qemu_total_time_ms": field_stats_of(&samples, |s| s.qemu_save_total_time_ms),
            "qemu_downtime_ms": field_stats_of(&samples, |s| s.qemu_save_downtime_ms),
        },
        "restore": {
            "wall_ms": field_stats_of(&samples, |s| s.restore_wall_ms),
            "load_ms": field_stats_of(&samples, |s| s.restore_load_ms),
            "to_first_heartbeat_ms": field_stats_of(&samples, |s| s.restore_to_first_heartbeat_ms),
            "start_ms": field_stats_of(&samples, |s| s.restore_start_ms),
        },
        "heartbeats_lost": lost,
        "samples": samples,
    }))
}

/// A guest console the brownout is measured on: vmmd's ([`cpr_tests::Console`]) or QEMU's
/// ([`ConsoleServer`]).
trait Probe {
    /// Waits until `n` heartbeats arrived at or after `since`.
    fn wait_heartbeats(&self, since: Instant, n: usize, timeout: Duration) -> bool;
    /// Sends `c`: when the answer came and the iterations summed over the vCPUs.
    fn sweep_sample(&mut self) -> Result<SweepSample>;
    /// Sends `v` (the guest reads all of its RAM) and times it until the answer.
    fn timed_verify(&mut self) -> Result<Duration>;
}

impl Probe for cpr_tests::Console {
    fn wait_heartbeats(&self, since: Instant, n: usize, timeout: Duration) -> bool {
        self.wait_for_heartbeats(since, n, timeout)
    }

    fn sweep_sample(&mut self) -> Result<SweepSample> {
        let c = self.counters();
        Ok(SweepSample {
            at: Instant::now(),
            iters: c.iters.iter().sum(),
        })
    }

    fn timed_verify(&mut self) -> Result<Duration> {
        let t = Instant::now();
        self.verify().expect_ok();
        Ok(t.elapsed())
    }
}

impl Probe for ConsoleServer {
    fn wait_heartbeats(&self, since: Instant, n: usize, timeout: Duration) -> bool {
        self.wait_for_heartbeats(since, n, timeout)
    }

    fn sweep_sample(&mut self) -> Result<SweepSample> {
        let (c, _) = self.counters()?;
        Ok(SweepSample {
            at: Instant::now(),
            iters: c.iters.iter().sum(),
        })
    }

    fn timed_verify(&mut self) -> Result<Duration> {
        let t = Instant::now();
        self.verify()?;
        Ok(t.elapsed())
    }
}

/// A stretch of undisturbed running next to an update, with the COUNTERS polled in it.
#[derive(Debug, Default)]
struct Window {
    from: Option<Instant>,
    to: Option<Instant>,
    sweep: Vec<SweepSample>,
    /// `--brownout-verify`: how long the guest's `v` at the start of the window took.
    verify: Option<Duration>,
}

/// `--brownout-secs` of running, polling COUNTERS every `--brownout-poll-ms`; nothing when the
/// brownout is not measured.
fn brownout_window(probe: &mut dyn Probe, args: &Args) -> Result<Window> {
    if args.brownout_secs <= 0.0 {
        return Ok(Window::default());
    }
    let from = Instant::now();
    let verify = if args.brownout_verify {
        Some(probe.timed_verify()?)
    } else {
        None
    };
    let end = from + Duration::from_secs_f64(args.brownout_secs);
    let mut sweep = Vec::new();
    if args.brownout_poll_ms == 0 {
        std::thread::sleep(end - from);
    } else {
        let poll = Duration::from_millis(args.brownout_poll_ms);
        loop {
            let next = Instant::now() + poll;
            sweep.push(probe.sweep_sample()?);
            let now = Instant::now();
            if now >= end {
                break;
            }
            if next > now {
                std::thread::sleep(next - now);
            }
        }
    }
    Ok(Window {
        from: Some(from),
        to: Some(Instant::now()),
        sweep,
        verify,
    })
}

/// The window after an update that ended at `to`: from the guest's first heartbeats after it.
fn brownout_after(probe: &mut dyn Probe, to: Instant, args: &Args) -> Result<Window> {
    if args.brownout_secs > 0.0 {
        ensure!(
            probe.wait_heartbeats(to, 5, Duration::from_secs(60)),
            "no heartbeats after the update"
        );
    }
    brownout_window(probe, args)
}

/// The brownout of the update in `[from, to]` between the windows `pre` and `post`.
fn brownout_of(
    heartbeats: &[Instant],
    pre: &Window,
    from: Instant,
    to: Instant,
    post: &Window,
) -> Option<BrownoutSample> {
    let (pre_from, pre_to, post_to) = (pre.from?, pre.to?, post.to?);
    let judge = Brownout::default();
    let resume = brownout::resume_instant(heartbeats, from, to)?;
    let base = brownout::heartbeat_rate(heartbeats, pre_from, pre_to);
    let base_sweep = brownout::sweep_rate(&pre.sweep);
    let dur_ms = |d: Duration| ms(d);
    Some(BrownoutSample {
        baseline_heartbeats_per_s: round3(base),
        heartbeat_ms: judge
            .heartbeats(heartbeats, resume, post_to, base)
            .map(dur_ms),
        baseline_sweep_per_s: base_sweep.map(round3),
        sweep_ms: base_sweep
            .and_then(|b| judge.sweep(&post.sweep, resume, b))
            .map(dur_ms),
        sweep_first_sample_ms: post
            .sweep
            .first()
            .map(|s| ms(s.at.saturating_duration_since(resume))),
        observed_ms: ms(post_to.saturating_duration_since(resume)),
        verify_before_ms: pre.verify.map(ms),
        verify_after_ms: post.verify.map(ms),
    })
}

/// The brownout figures over the updates: min/median/max, and how often the rate was not back
/// within the window.
fn brownout_stats(samples: &[Option<&BrownoutSample>]) -> Value {
    let b: Vec<&BrownoutSample> = samples.iter().flatten().copied().collect();
    if b.is_empty() {
        return Value::Null;
    }
    let judge = Brownout::default();
    let of = |f: &dyn Fn(&BrownoutSample) -> Option<f64>| {
        stats(&b.iter().filter_map(|s| f(s)).collect::<Vec<_>>())
    };
    json!({
        "heartbeat_ms": of(&|s| s.heartbeat_ms),
        "heartbeat_not_back": b.iter().filter(|s| s.heartbeat_ms.is_none()).count(),
        "sweep_ms": of(&|s| s.sweep_ms),
        "sweep_not_back": b.iter().filter(|s| s.baseline_sweep_per_s.is_some() && s.sweep_ms.is_none()).count(),
        "sweep_first_sample_ms": of(&|s| s.sweep_first_sample_ms),
        "baseline_heartbeats_per_s": of(&|s| Some(s.baseline_heartbeats_per_s)),
        "baseline_sweep_per_s": of(&|s| s.baseline_sweep_per_s),
        "observed_ms": of(&|s| Some(s.observed_ms)),
        "verify_before_ms": of(&|s| s.verify_before_ms),
        "verify_after_ms": of(&|s| s.verify_after_ms),
        "tolerance": judge.tolerance,
        "heartbeat_window_ms": ms(judge.window),
    })
}

/// Every heartbeat of one guest and the updates done to it, for the timeline plot.
#[derive(Debug, Default)]
struct Timeline {
    heartbeats: Vec<Instant>,
    /// `(from, to, blackout_ms)` per update.
    updates: Vec<(Instant, Instant, f64)>,
}

impl Timeline {
    /// The update with the median blackout and the heartbeat gaps around it: `(update number,
    /// [(ms since the resume, gap ms)])` from 300 ms before the resume to 700 ms after.
    fn around_median(&self) -> Option<(usize, Vec<(f64, f64)>)> {
        let mut order: Vec<usize> = (0..self.updates.len()).collect();
        order.sort_by(|&a, &b| self.updates[a].2.total_cmp(&self.updates[b].2));
        let i = *order.get(order.len() / 2)?;
        let (from, to, _) = self.updates[i];
        let resume = brownout::resume_instant(&self.heartbeats, from, to)?;
        let lo = resume.checked_sub(Duration::from_millis(300))?;
        let hi = resume + Duration::from_millis(700);
        let start = self.heartbeats.partition_point(|&t| t < lo);
        let end = self.heartbeats.partition_point(|&t| t <= hi);
        let rel = |t: Instant| {
            if t >= resume {
                (t - resume).as_secs_f64() * 1e3
            } else {
                -(resume - t).as_secs_f64() * 1e3
            }
        };
        let points = self.heartbeats[start..end]
            .windows(2)
            .map(|w| (round3(rel(w[1])), ms(w[1] - w[0])))
            .collect();
        Some((i + 1, points))
    }
}

/// One live update's figures, in milliseconds.
#[derive(Debug, Default, Serialize)]
struct UpdateSample {
    blackout_ms: f64,
    /// The guest's own largest stall (TSC gap between two loop iterations, any vCPU) from just
    /// before the update to after the brownout window: a figure no host-side reader distorts.
    guest_stall_ms: f64,
    vmmd_pause_ms: f64,
    total_ms: f64,
    phases_ms: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    brownout: Option<BrownoutSample>,
}

/// Live-updates one guest of `size` `args.updates` times.
fn cpr_exec_size(size: &str, args: &Args) -> Result<(Value, Timeline)> {
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
    let mut timeline = Timeline::default();
    for n in 1..=args.updates {
        let pre = brownout_window(&mut console, args)?;
        console.reset_gaps();
        let from = Instant::now();
        let report = update_in_process(&vmm.api_socket, &UpdateArgs::new(binary.clone()))
            .map_err(|f| anyhow::anyhow!("update {n}: {f}; report {:?}", f.report))?;
        let to = Instant::now();
        let post = brownout_after(&mut console, to, args)?;
        ensure!(
            console.wait_for_heartbeats(to, 200, Duration::from_secs(60)),
            "no heartbeats after update {n}"
        );
        let hb = heartbeat_times(&console);
        let stall_us = console.counters().maxgap_us.into_iter().max().unwrap_or(0);
        let sample = UpdateSample {
            blackout_ms: ms(console.max_heartbeat_gap_across(from, to)),
            guest_stall_ms: round3(stall_us as f64 / 1e3),
            vmmd_pause_ms: round3(report.vmmd_pause_micros.unwrap_or(0) as f64 / 1e3),
            total_ms: round3(report.total_micros as f64 / 1e3),
            phases_ms: report
                .phases
                .iter()
                .map(|p| (p.name.clone(), round3(p.micros as f64 / 1e3)))
                .collect(),
            brownout: brownout_of(&hb, &pre, from, to, &post),
        };
        eprintln!(
            "cpr-bench:   {size} update {n}/{}: blackout {:.2} ms, guest stall {:.2} ms, vmmd pause {:.2} ms, total {:.1} ms{}",
            args.updates,
            sample.blackout_ms,
            sample.guest_stall_ms,
            sample.vmmd_pause_ms,
            sample.total_ms,
            brownout_note(sample.brownout.as_ref())
        );
        timeline.updates.push((from, to, sample.blackout_ms));
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
    timeline.heartbeats = heartbeat_times(&console);
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in &samples {
        for (name, v) in &s.phases_ms {
            phases.entry(name.clone()).or_default().push(*v);
        }
    }
    Ok((
        json!({
            "size": size,
            "memory_bytes": cpr_common::size::parse_size(size)?,
            "steady_state_gaps_ms": steady,
            "blackout_ms": field_stats_of(&samples, |s| s.blackout_ms),
            "guest_stall_ms": field_stats_of(&samples, |s| s.guest_stall_ms),
            "vmmd_pause_ms": field_stats_of(&samples, |s| s.vmmd_pause_ms),
            "update_total_ms": field_stats_of(&samples, |s| s.total_ms),
            "phases_ms": phases.iter().map(|(k, v)| (k.clone(), stats(v))).collect::<BTreeMap<_, _>>(),
            "brownout": brownout_stats(&samples.iter().map(|s| s.brownout.as_ref()).collect::<Vec<_>>()),
            "samples": samples,
        }),
        timeline,
    ))
}

/// `, brownout … ms` for the progress line.
fn brownout_note(b: Option<&BrownoutSample>) -> String {
    let Some(b) = b else {
        return String::new();
    };
    let f = |v: Option<f64>| v.map_or_else(|| "not back".to_owned(), |v| format!("{v:.0} ms"));
    let verify = match (b.verify_before_ms, b.verify_after_ms) {
        (Some(x), Some(y)) => format!(", v {x:.1} → {y:.1} ms"),
        _ => String::new(),
    };
    format!(
        ", brownout: heartbeats {}, sweep {}{verify}",
        f(b.heartbeat_ms),
        if b.baseline_sweep_per_s.is_some() {
            f(b.sweep_ms)
        } else {
            "-".to_owned()
        }
    )
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
    #[serde(skip_serializing_if = "Option::is_none")]
    brownout: Option<BrownoutSample>,
}

/// The test guest booted under QEMU, with what it showed before anything was done to it.
struct QemuGuest {
    vm: QemuProcess,
    console: ConsoleServer,
    config: QemuConfig,
    dir: std::sync::Arc<TestDir>,
    first_heartbeat_ms: f64,
    hash: String,
    counters: cpr_tests::Counters,
    received: usize,
}

/// Boots the test guest under QEMU with `size` of RAM backed as `ram` says.
fn qemu_boot(size: &str, args: &Args, ram: impl FnOnce(&TestDir) -> QemuRam) -> Result<QemuGuest> {
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
        ram: ram(&dir),
    };
    let boot = Instant::now();
    let vm = QemuProcess::boot(&config)?;
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
    let (counters, received) = console.counters()?;
    Ok(QemuGuest {
        vm,
        console,
        config,
        dir,
        first_heartbeat_ms,
        hash,
        counters,
        received,
    })
}

impl QemuGuest {
    /// The steady-state gap distribution over `--steady-secs`.
    fn steady(&self, args: &Args) -> Value {
        let quiet = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(args.steady_secs));
        qemu::gap_distribution(&qemu::gaps_ms(
            &self.console.heartbeats(),
            quiet,
            Instant::now(),
        ))
    }

    /// Checks the guest is intact (memory hash, counters, no failure) and quits QEMU; returns the
    /// heartbeats the guest counted but the console never delivered (expected 0: they would hide
    /// part of a blackout).
    fn finish(mut self, what: &str) -> Result<i64> {
        ensure!(
            self.console.verify()? == self.hash,
            "memory hash changed across QEMU's {what}"
        );
        let (c1, received1) = self.console.counters()?;
        c1.assert_continues(&self.counters);
        ensure!(
            self.console.failures().is_empty(),
            "the guest reported failures under QEMU: {:?}",
            self.console.failures()
        );
        self.vm.quit();
        Ok((c1.hb - self.counters.hb) as i64 - (received1 - self.received) as i64)
    }
}

/// Boots the test guest under QEMU with `size` of RAM and cpr-transfers it `args.updates` times.
fn qemu_size(size: &str, args: &Args) -> Result<(Value, Timeline)> {
    let mut g = qemu_boot(size, args, |_| QemuRam::Memfd {
        aux_ram_share: true,
    })?;
    let steady = g.steady(args);
    let mut samples = Vec::new();
    let mut timeline = Timeline::default();
    for n in 1..=args.updates {
        let pre = brownout_window(&mut g.console, args)?;
        let (next, t) =
            g.vm.cpr_transfer(&g.config)
                .with_context(|| format!("QEMU cpr-transfer {n}"))?;
        g.vm = next;
        let post = brownout_after(&mut g.console, t.running, args)?;
        ensure!(
            g.console
                .wait_for_heartbeats(t.running, 200, Duration::from_secs(60)),
            "no heartbeats after QEMU cpr-transfer {n}"
        );
        let hb = g.console.heartbeats();
        let num = |k: &str| t.info[k].as_f64().unwrap_or(f64::NAN);
        let sample = QemuSample {
            blackout_ms: ms(qemu::blackout(&hb, t.migrate, t.running)),
            migrate_to_running_ms: ms(t.running - t.migrate),
            total_ms: ms(t.running - t.spawned),
            total_with_quit_ms: ms(t.old_quit - t.spawned),
            qemu_downtime_ms: num("downtime"),
            qemu_total_time_ms: num("total-time"),
            brownout: brownout_of(&hb, &pre, t.migrate, t.running, &post),
        };
        eprintln!(
            "cpr-bench:   {size} QEMU cpr-transfer {n}/{}: blackout {:.2} ms, migrate→running {:.2} ms, total {:.1} ms{}",
            args.updates,
            sample.blackout_ms,
            sample.migrate_to_running_ms,
            sample.total_ms,
            brownout_note(sample.brownout.as_ref())
        );
        timeline
            .updates
            .push((t.migrate, t.running, sample.blackout_ms));
        samples.push(sample);
    }
    timeline.heartbeats = g.console.heartbeats();
    let connections = g.console.connections();
    let first_heartbeat_ms = g.first_heartbeat_ms;
    let lost = g.finish("cpr-transfers")?;
    Ok((
        json!({
            "version": qemu_version(args),
            "mode": "cpr-transfer",
            "first_heartbeat_ms": first_heartbeat_ms,
            "steady_state_gaps_ms": steady,
            "blackout_ms": field_stats_of(&samples, |s| s.blackout_ms),
            "migrate_to_running_ms": field_stats_of(&samples, |s| s.migrate_to_running_ms),
            "update_total_ms": field_stats_of(&samples, |s| s.total_ms),
            "update_total_with_quit_ms": field_stats_of(&samples, |s| s.total_with_quit_ms),
            "qemu_downtime_ms": field_stats_of(&samples, |s| s.qemu_downtime_ms),
            "qemu_total_time_ms": field_stats_of(&samples, |s| s.qemu_total_time_ms),
            "brownout": brownout_stats(&samples.iter().map(|s| s.brownout.as_ref()).collect::<Vec<_>>()),
            "heartbeats_lost": lost,
            "console_connections": connections,
            "samples": samples,
        }),
        timeline,
    ))
}

fn qemu_version(args: &Args) -> String {
    qemu::version(&args.qemu)
        .map(|(a, b, c)| format!("{a}.{b}.{c}"))
        .unwrap_or_default()
}

/// One cpr-reboot's figures (vmmd or QEMU), in milliseconds.
#[derive(Debug, Default, Serialize)]
struct RebootSample {
    /// The longest heartbeat gap across the whole cycle.
    blackout_ms: f64,
    /// `migrate file:` issued → the state is saved (the VM is stopped inside).
    save_ms: f64,
    /// Saved → the old process has exited (quit, reaped).
    quit_ms: f64,
    /// New process spawned → its API (QMP) answers.
    start_ms: f64,
    /// `migrate-incoming` issued → the guest runs (QEMU: after setting the mode and capability).
    load_ms: f64,
    /// `migrate` → the guest runs again.
    total_ms: f64,
    /// vmmd: its own downtime of the save, and its save/load phases; QEMU: `query-migrate`'s
    /// `downtime` and `total-time` on the old QEMU.
    own_save_downtime_ms: f64,
    own_save_total_ms: f64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    phases_ms: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    brownout: Option<BrownoutSample>,
}

fn reboot_figures(samples: &[RebootSample]) -> Value {
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in samples {
        for (name, v) in &s.phases_ms {
            phases.entry(name.clone()).or_default().push(*v);
        }
    }
    json!({
        "blackout_ms": field_stats_of(samples, |s| s.blackout_ms),
        "save_ms": field_stats_of(samples, |s| s.save_ms),
        "quit_ms": field_stats_of(samples, |s| s.quit_ms),
        "start_ms": field_stats_of(samples, |s| s.start_ms),
        "load_ms": field_stats_of(samples, |s| s.load_ms),
        "update_total_ms": field_stats_of(samples, |s| s.total_ms),
        "own_save_downtime_ms": field_stats_of(samples, |s| s.own_save_downtime_ms),
        "own_save_total_ms": field_stats_of(samples, |s| s.own_save_total_ms),
        "phases_ms": phases.iter().map(|(k, v)| (k.clone(), stats(v))).collect::<BTreeMap<_, _>>(),
        "brownout": brownout_stats(&samples.iter().map(|s| s.brownout.as_ref()).collect::<Vec<_>>()),
    })
}

fn reboot_note(s: &RebootSample) -> String {
    format!(
        "blackout {:.1} ms (save {:.1}, quit {:.1}, start {:.1}, load {:.1}){}",
        s.blackout_ms,
        s.save_ms,
        s.quit_ms,
        s.start_ms,
        s.load_ms,
        brownout_note(s.brownout.as_ref())
    )
}

/// The directory guest RAM files go to for cpr-reboot: `--memory-dir`, else /dev/shm.
fn reboot_ram_dir(args: &Args) -> std::path::PathBuf {
    args.memory_dir
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("/dev/shm"))
}

/// Boots one guest of `size` with RAM in a file and takes it through `args.updates` cpr-reboot
/// cycles without the reboot: set mode cpr-reboot, `Migrate file:STATE` (vmmd stops the VM),
/// Quit, wait for the exit, start a fresh vmmd with `--incoming defer` on the same RAM file (the
/// console reconnected from its start), `MigrateIncoming file:STATE`. Driven over the API as QEMU
/// is over QMP; `cprctl reboot-prep`/`reboot-resume` do the same plus their checks and markers
/// (and poll for the exit every 20 ms).
fn vmmd_reboot_size(size: &str, args: &Args) -> Result<(Value, Timeline)> {
    let dir = TestDir::new("bench-reboot");
    let ram = reboot_ram_dir(args).join(format!("cpr-bench-{}-reboot.ram", std::process::id()));
    let _ram_file = RemoveOnDrop(Some(ram.clone()));
    let opts = VmmdOptions::new(args.vcpus, size)
        .in_dir(&dir)
        .memory_path(ram);
    let state = dir.join("vm.state");
    let uri = format!("file:{}", state.display());
    let poll = Duration::from_millis(1);
    let (mut vmm, mut console) = VmmdProcess::spawn_with_console_polling(opts.clone(), poll);
    console
        .try_wait_for_line("READY", READY_TIMEOUT)
        .context("the guest printed no READY line")?;
    ensure!(
        console.wait_for_heartbeats(vmm.spawned_at, 500, Duration::from_secs(60)),
        "no heartbeats after READY"
    );
    let hash = console.verify().expect_ok();
    let before = console.counters();
    let quiet = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.steady_secs));
    let steady = qemu::gap_distribution(&qemu::gaps_ms(
        &heartbeat_times(&console),
        quiet,
        Instant::now(),
    ));

    // Heartbeats of the vmmd processes gone so far (each had its own console connection).
    let mut earlier: Vec<Instant> = Vec::new();
    let mut samples = Vec::new();
    let mut timeline = Timeline::default();
    for n in 1..=args.updates {
        let pre = brownout_window(&mut console, args)?;
        vmm.api()
            .set_mode(MigrationMode::CprReboot)
            .context("set mode cpr-reboot")?;
        let from = Instant::now();
        let saved_info = vmm.api().migrate(&uri).context("Migrate (cpr-reboot)")?;
        let saved = Instant::now();
        ensure!(
            saved_info.status == MigrationStatus::Completed as i32,
            "cpr-reboot save {n} failed: {saved_info:?}"
        );
        // vmmd may be gone before its answer arrives: the exit is what counts.
        let _ = vmm.api().quit();
        let status = vmm
            .wait_exit(Duration::from_secs(30))
            .with_context(|| format!("vmmd did not exit after the save of cycle {n}"))?;
        let exited = Instant::now();
        ensure!(status.success(), "vmmd exited with {status} after Quit");
        ensure!(
            console.wait_closed(Duration::from_secs(10)),
            "the console stayed open after vmmd exited"
        );
        earlier.extend(heartbeat_times(&console));
        drop(console);
        drop(vmm);

        let mut next = opts.clone();
        next.incoming = Some("defer".to_owned());
        let (new, new_console) = VmmdProcess::spawn_with_console_polling(next, poll);
        let incoming = Instant::now();
        let loaded_info = new
            .api()
            .migrate_incoming(&uri)
            .context("MigrateIncoming (cpr-reboot)")?;
        let to = Instant::now();
        ensure!(
            loaded_info.status == MigrationStatus::Completed as i32,
            "cpr-reboot load {n} failed: {loaded_info:?}"
        );
        vmm = new;
        console = new_console;
        ensure!(
            vmm.api().run_state() == RunState::Running,
            "the guest does not run after load {n}"
        );
        let post = brownout_after(&mut console, to, args)?;
        ensure!(
            console.wait_for_heartbeats(to, 200, Duration::from_secs(60)),
            "no heartbeats after cpr-reboot {n}"
        );
        let mut hb = earlier.clone();
        hb.extend(heartbeat_times(&console));
        let mut phases_ms: BTreeMap<String, f64> = BTreeMap::new();
        for (prefix, info) in [("save.", &saved_info), ("load.", &loaded_info)] {
            for p in &info.phases {
                phases_ms.insert(format!("{prefix}{}", p.name), round3(p.micros as f64 / 1e3));
            }
        }
        let sample = RebootSample {
            blackout_ms: ms(qemu::blackout(&hb, from, to)),
            save_ms: ms(saved - from),
            quit_ms: ms(exited - saved),
            start_ms: ms(vmm.api_ready_at - vmm.spawned_at),
            load_ms: ms(to - incoming),
            total_ms: ms(to - from),
            own_save_downtime_ms: round3(saved_info.downtime_micros as f64 / 1e3),
            own_save_total_ms: round3(saved_info.total_micros as f64 / 1e3),
            phases_ms,
            brownout: brownout_of(&hb, &pre, from, to, &post),
        };
        eprintln!(
            "cpr-bench:   {size} vmmd cpr-reboot {n}/{}: {}",
            args.updates,
            reboot_note(&sample)
        );
        timeline.updates.push((from, to, sample.blackout_ms));
        samples.push(sample);
    }
    ensure!(
        console.verify().expect_ok() == hash,
        "memory hash changed across the cpr-reboots"
    );
    console.counters().assert_continues(&before);
    ensure!(
        console.failures().is_empty(),
        "the guest reported failures: {:?}",
        console.failures()
    );
    timeline.heartbeats = earlier;
    timeline.heartbeats.extend(heartbeat_times(&console));
    let mut out = json!({
        "size": size,
        "memory_bytes": cpr_common::size::parse_size(size)?,
        "steady_state_gaps_ms": steady,
    });
    merge(&mut out, reboot_figures(&samples));
    out["samples"] = json!(samples);
    Ok((out, timeline))
}

/// Adds `from`'s keys to the object `into`.
fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

/// The same cycles under QEMU: RAM in a shared file, `mode=cpr-reboot` + `x-ignore-shared`,
/// `migrate file:`, quit, a new QEMU with `-incoming defer`, `migrate-incoming file:`.
fn qemu_reboot_size(size: &str, args: &Args) -> Result<(Value, Timeline)> {
    let ram = reboot_ram_dir(args).join(format!("cpr-bench-{}-qemu.ram", std::process::id()));
    let _ram_file = RemoveOnDrop(Some(ram.clone()));
    let _ = std::fs::remove_file(&ram);
    let mut g = qemu_boot(size, args, |_| QemuRam::File(ram.clone()))?;
    let steady = g.steady(args);
    let state = g.dir.join("vm.state");
    let mut samples = Vec::new();
    let mut timeline = Timeline::default();
    for n in 1..=args.updates {
        let pre = brownout_window(&mut g.console, args)?;
        let (next, r) =
            g.vm.cpr_reboot(&g.config, &state)
                .with_context(|| format!("QEMU cpr-reboot {n}"))?;
        g.vm = next;
        let post = brownout_after(&mut g.console, r.running, args)?;
        ensure!(
            g.console
                .wait_for_heartbeats(r.running, 200, Duration::from_secs(60)),
            "no heartbeats after QEMU cpr-reboot {n}"
        );
        let hb = g.console.heartbeats();
        let num = |k: &str| r.info[k].as_f64().unwrap_or(f64::NAN);
        let sample = RebootSample {
            blackout_ms: ms(qemu::blackout(&hb, r.migrate, r.running)),
            save_ms: ms(r.saved - r.migrate),
            quit_ms: ms(r.exited - r.saved),
            start_ms: ms(r.monitor - r.spawned),
            load_ms: ms(r.running - r.monitor),
            total_ms: ms(r.running - r.migrate),
            own_save_downtime_ms: num("downtime"),
            own_save_total_ms: num("total-time"),
            phases_ms: BTreeMap::new(),
            brownout: brownout_of(&hb, &pre, r.migrate, r.running, &post),
        };
        eprintln!(
            "cpr-bench:   {size} QEMU cpr-reboot {n}/{}: {}",
            args.updates,
            reboot_note(&sample)
        );
        timeline
            .updates
            .push((r.migrate, r.running, sample.blackout_ms));
        samples.push(sample);
    }
    timeline.heartbeats = g.console.heartbeats();
    let connections = g.console.connections();
    let first_heartbeat_ms = g.first_heartbeat_ms;
    let lost = g.finish("cpr-reboots")?;
    let mut out = json!({
        "version": qemu_version(args),
        "mode": "cpr-reboot (x-ignore-shared, RAM in a shared file)",
        "first_heartbeat_ms": first_heartbeat_ms,
        "steady_state_gaps_ms": steady,
    });
    merge(&mut out, reboot_figures(&samples));
    out["heartbeats_lost"] = json!(lost);
    out["console_connections"] = json!(connections);
    out["samples"] = json!(samples);
    Ok((out, timeline))
}

fn cpr_reboot(args: &Args, plots: &mut Plots) -> Result<Value> {
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
        eprintln!("cpr-bench: cpr-reboot, {size}: booting vmmd");
        let (vmmd, vmmd_timeline) =
            vmmd_reboot_size(size, args).with_context(|| format!("vmmd cpr-reboot {size}"))?;
        let (qemu, qemu_timeline) = match &peer {
            Ok(()) => {
                eprintln!("cpr-bench: QEMU cpr-reboot, {size}: booting QEMU");
                let (mut q, t) = qemu_reboot_size(size, args)
                    .with_context(|| format!("QEMU cpr-reboot {size}"))?;
                q["size"] = json!(size);
                qemu_sizes.push(q.clone());
                (q, Some(t))
            }
            Err(why) => (json!({ "skipped": why }), None),
        };
        let ratios = json!({
            "blackout_median": ratio(&vmmd, &qemu, "blackout_ms", "median"),
            "blackout_min": ratio(&vmmd, &qemu, "blackout_ms", "min"),
            "blackout_max": ratio(&vmmd, &qemu, "blackout_ms", "max"),
            "save_median": ratio(&vmmd, &qemu, "save_ms", "median"),
            "quit_median": ratio(&vmmd, &qemu, "quit_ms", "median"),
            "start_median": ratio(&vmmd, &qemu, "start_ms", "median"),
            "load_median": ratio(&vmmd, &qemu, "load_ms", "median"),
            "update_total_median": ratio(&vmmd, &qemu, "update_total_ms", "median"),
        });
        if let Some(r) = ratios["blackout_median"].as_f64() {
            eprintln!("cpr-bench: {size}: cpr-reboot blackout median vmmd / QEMU = {r:.3}");
        }
        plots.timeline(
            "cpr-reboot",
            size,
            &[
                ("vmmd", Some(&vmmd_timeline)),
                ("QEMU", qemu_timeline.as_ref()),
            ],
        );
        vmmd_sizes.push(vmmd.clone());
        sizes.push(json!({
            "size": size,
            "memory_bytes": memory_bytes,
            "vmmd": vmmd,
            "qemu": qemu,
            "ratio_vmmd_over_qemu": ratios,
        }));
    }
    plots.against_ram(
        "cpr-reboot-blackout-vs-ram",
        "cpr-reboot (no reboot): guest-visible blackout",
        &sizes,
        &[("vmmd", "/vmmd/blackout_ms"), ("QEMU", "/qemu/blackout_ms")],
    );
    Ok(json!({
        "benchmark": "cpr-reboot without the reboot (save, quit, fresh process on the same RAM file, load): vmmd vs QEMU",
        "updates": args.updates,
        "steady_secs": args.steady_secs,
        "ram_dir": reboot_ram_dir(args).display().to_string(),
        "flatness": {
            "blackout": flatness(&vmmd_sizes, "blackout_ms"),
            "qemu_blackout": flatness(&qemu_sizes, "blackout_ms"),
        },
        "sizes": sizes,
    }))
}

/// `--plots`: where the SVG files go, and those written.
#[derive(Debug, Default)]
struct Plots {
    dir: Option<std::path::PathBuf>,
    written: Vec<String>,
}

impl Plots {
    fn new(dir: Option<&std::path::Path>) -> Result<Self> {
        if let Some(d) = dir {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        Ok(Self {
            dir: dir.map(std::path::Path::to_path_buf),
            written: Vec::new(),
        })
    }

    fn write(&mut self, name: &str, svg: &str) {
        let Some(dir) = &self.dir else { return };
        let path = dir.join(name);
        match std::fs::write(&path, svg) {
            Ok(()) => {
                eprintln!("cpr-bench: wrote {}", path.display());
                self.written.push(path.display().to_string());
            }
            Err(e) => eprintln!("cpr-bench: cannot write {}: {e}", path.display()),
        }
    }

    /// The heartbeat gaps around the median-blackout update of each series (`<mode>-timeline-<size>.svg`).
    fn timeline(&mut self, mode: &str, size: &str, series: &[(&str, Option<&Timeline>)]) {
        if self.dir.is_none() {
            return;
        }
        let lines: Vec<svg::LineSeries> = series
            .iter()
            .filter_map(|(name, t)| {
                let (n, points) = (*t)?.around_median()?;
                Some(svg::LineSeries {
                    name: format!("{name} (update {n})"),
                    points,
                })
            })
            .collect();
        if lines.is_empty() {
            return;
        }
        let chart = svg::line_chart(
            &format!("Heartbeat gaps around the median-blackout {mode}, {size} guest"),
            "time since the guest resumed (ms)",
            "gap since the previous heartbeat (ms)",
            &lines,
        );
        self.write(&format!("{mode}-timeline-{size}.svg"), &chart);
    }

    /// min/median/max against guest RAM size: per series `(legend, JSON pointer into each size's
    /// entry to a stats object)` (`<name>.svg`).
    fn against_ram(&mut self, name: &str, title: &str, sizes: &[Value], series: &[(&str, &str)]) {
        if self.dir.is_none() || sizes.is_empty() {
            return;
        }
        let categories: Vec<String> = sizes
            .iter()
            .map(|s| s["size"].as_str().unwrap_or("?").to_owned())
            .collect();
        let ranges: Vec<svg::RangeSeries> = series
            .iter()
            .map(|(legend, pointer)| svg::RangeSeries {
                name: (*legend).to_owned(),
                points: sizes
                    .iter()
                    .map(|s| {
                        let st = s.pointer(pointer)?;
                        Some((
                            st["min"].as_f64()?,
                            st["median"].as_f64()?,
                            st["max"].as_f64()?,
                        ))
                    })
                    .collect(),
            })
            .filter(|r| r.points.iter().any(Option::is_some))
            .collect();
        let chart = svg::range_chart(
            title,
            "guest RAM",
            "ms (min / median / max)",
            &categories,
            &ranges,
        );
        self.write(&format!("{name}.svg"), &chart);
    }
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

fn cpr_exec(args: &Args, plots: &mut Plots) -> Result<Value> {
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
        let (vmmd, vmmd_timeline) =
            cpr_exec_size(size, args).with_context(|| format!("cpr-exec {size}"))?;
        let (qemu, qemu_timeline) = match &peer {
            Ok(()) => {
                eprintln!("cpr-bench: QEMU cpr-transfer, {size}: booting QEMU");
                let (mut q, t) =
                    qemu_size(size, args).with_context(|| format!("QEMU cpr-transfer {size}"))?;
                q["size"] = json!(size);
                qemu_sizes.push(q.clone());
                (q, Some(t))
            }
            Err(why) => (json!({ "skipped": why }), None),
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
            "brownout_heartbeat_median": match (vmmd["brownout"]["heartbeat_ms"]["median"].as_f64(), qemu["brownout"]["heartbeat_ms"]["median"].as_f64()) {
                (Some(a), Some(b)) if b > 0.0 => json!(round3(a / b)),
                _ => Value::Null,
            },
        });
        if let Some(r) = ratios["blackout_median"].as_f64() {
            eprintln!("cpr-bench: {size}: blackout median vmmd / QEMU = {r:.3}");
        }
        plots.timeline(
            "cpr-exec",
            size,
            &[
                ("vmmd cpr-exec", Some(&vmmd_timeline)),
                ("QEMU cpr-transfer", qemu_timeline.as_ref()),
            ],
        );
        vmmd_sizes.push(vmmd.clone());
        sizes.push(json!({
            "size": size,
            "memory_bytes": memory_bytes,
            "vmmd": vmmd,
            "qemu": qemu,
            "ratio_vmmd_over_qemu": ratios,
        }));
    }
    plots.against_ram(
        "cpr-exec-blackout-vs-ram",
        "Live update: guest-visible blackout (vmmd cpr-exec, QEMU cpr-transfer)",
        &sizes,
        &[
            ("vmmd blackout", "/vmmd/blackout_ms"),
            ("vmmd own pause", "/vmmd/vmmd_pause_ms"),
            ("QEMU blackout", "/qemu/blackout_ms"),
        ],
    );
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
    let mut plots = Plots::new(args.plots.as_deref())?;
    if matches!(args.mode, Mode::SaveRestore | Mode::All) {
        doc["save_restore"] = save_restore(&args, &mut plots)?;
    }
    if matches!(args.mode, Mode::CprExec | Mode::All) {
        doc["cpr_exec"] = cpr_exec(&args, &mut plots)?;
    }
    if matches!(args.mode, Mode::CprReboot | Mode::All) {
        doc["cpr_reboot"] = cpr_reboot(&args, &mut plots)?;
    }
    if plots.dir.is_some() {
        doc["plots"] = json!(plots.written);
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
        assert_eq!(a.brownout_secs, 1.0);
        assert_eq!(a.brownout_poll_ms, 100);
        assert!(!a.brownout_verify && a.plots.is_none());
        let a = Args::try_parse_from([
            "cpr-bench",
            "--mode",
            "cpr-reboot",
            "--plots",
            "/tmp/p",
            "--brownout-secs",
            "0.5",
            "--brownout-poll-ms",
            "0",
            "--brownout-verify",
        ])
        .expect("parses");
        assert_eq!(a.mode, Mode::CprReboot);
        assert_eq!(a.plots.as_deref(), Some(std::path::Path::new("/tmp/p")));
        assert_eq!(a.brownout_secs, 0.5);
        assert_eq!(a.brownout_poll_ms, 0);
        assert!(a.brownout_verify);
    }

    #[test]
    fn brownout_is_measured_from_the_resume() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 1 kHz, a 20 ms blackout at 1000 ms, 1 kHz again.
        let hb: Vec<Instant> = (0..1000).chain(1020..2100).map(at).collect();
        let pre = Window {
            from: Some(at(0)),
            to: Some(at(1000)),
            ..Window::default()
        };
        let post = Window {
            from: Some(at(1030)),
            to: Some(at(2100)),
            ..Window::default()
        };
        let b = brownout_of(&hb, &pre, at(1001), at(1010), &post).expect("measured");
        assert_eq!(b.heartbeat_ms, Some(0.0));
        assert_eq!(b.baseline_heartbeats_per_s, 1000.0);
        assert_eq!(b.baseline_sweep_per_s, None);
        assert_eq!(b.observed_ms, 1080.0);
        assert!(brownout_of(&hb, &Window::default(), at(1001), at(1010), &post).is_none());
        let t = Timeline {
            heartbeats: hb,
            updates: vec![(at(1001), at(1010), 20.0)],
        };
        let (n, points) = t.around_median().expect("a timeline");
        assert_eq!(n, 1);
        assert!(points.contains(&(0.0, 21.0)), "{points:?}");
        assert_eq!(points.first().map(|p| p.0), Some(-299.0));
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
