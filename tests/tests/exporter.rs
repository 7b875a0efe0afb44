//! `cprctl exporter` scraped by a real Prometheus: a live update shows up in PromQL as
//! `vmmd_updates_total{result="updated"}` going from 0 to 1, and the counters (updated, failed,
//! rolled back, the pause histogram) survive the updates that follow.
//!
//! Needs the `prometheus` binary (Debian: `apt-get install -y prometheus`; `.ci/run` installs it).
//! The test runs it itself on a free port with a temporary configuration and TSDB; the Debian
//! service is not used.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cpr_tests::cpr::{cprctl_update, vmmd_copy, vmmd_with_missing_interpreter, wait_settled};
use cpr_tests::{Api, MigrationMode, TestDir, VmmdOptions, VmmdProcess};
use cprctl::update::{new_command_line, Load};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);
const INSTALL: &str = "apt-get install -y prometheus";

/// A child process killed (and reaped) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// The `prometheus` binary: `$PROMETHEUS`, else on `$PATH`; panics with the install command.
fn prometheus_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMETHEUS") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the `prometheus` binary is missing: install it with `{INSTALL}` (CI's .ci/run \
                 does), or point $PROMETHEUS at one"
            )
        })
}

/// One HTTP/1.0 GET on 127.0.0.1; (status, body).
fn http_get(addr: SocketAddr, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// Percent-encodes a query parameter.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus of our own, scraping `target` every second.
struct Prometheus {
    addr: SocketAddr,
    _child: Killed,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, target: SocketAddr) -> Prometheus {
        let binary = prometheus_binary();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: vmmd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let addr = free_port();
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).expect("create prometheus.log");
        let err = out.try_clone().expect("clone log");
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e} (install it with `{INSTALL}`)",
                    binary.display()
                )
            });
        let p = Prometheus {
            addr,
            _child: Killed(child),
            log,
        };
        p.wait_until(
            || matches!(http_get(addr, "/-/ready"), Ok((200, _))),
            "ready",
        );
        p
    }

    /// The instant vector of `query`: (labels, value) per series.
    fn query(&self, query: &str) -> Vec<(Value, String)> {
        let path = format!("/api/v1/query?query={}", encode(query));
        let Ok((200, body)) = http_get(self.addr, &path) else {
            return Vec::new();
        };
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let value = r["value"][1].as_str().unwrap_or("").to_owned();
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// Polls `query` until its only series has `value`; prints and returns that series.
    fn await_value(&self, query: &str, value: &str) -> (Value, String) {
        let mut last = Vec::new();
        let found = self.wait_until(
            || {
                last = self.query(query);
                matches!(last.as_slice(), [(_, v)] if v == value)
            },
            &format!("{query} == {value}"),
        );
        assert!(found);
        let (labels, v) = last.remove(0);
        println!("PromQL {query} -> {v} {labels}");
        (labels, v)
    }

    fn wait_until(&self, mut ok: impl FnMut() -> bool, what: &str) -> bool {
        let deadline = Instant::now() + DEADLINE;
        while !ok() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!("Prometheus: not {what} within {DEADLINE:?}; its log ends:\n{tail:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        true
    }
}

/// `cprctl exporter` on a free port for the sockets in `socket_dir`.
fn start_exporter(socket_dir: &Path) -> (SocketAddr, Killed) {
    let addr = free_port();
    let child = Command::new(cpr_tests::bins::cprctl())
        .arg("exporter")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--socket-dir")
        .arg(socket_dir)
        .stdin(Stdio::null())
        .spawn()
        .expect("cannot run cprctl exporter");
    let exporter = Killed(child);
    let deadline = Instant::now() + DEADLINE;
    while !matches!(http_get(addr, "/"), Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "cprctl exporter does not answer on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (addr, exporter)
}

/// The lines of the exporter's `/metrics` that mention `vm="vm1"`.
fn scrape(exporter: SocketAddr) -> Vec<String> {
    let (status, body) = http_get(exporter, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| l.contains("vm=\"vm1\""))
        .map(str::to_owned)
        .collect()
}

fn assert_line(lines: &[String], line: &str) {
    assert!(
        lines.iter().any(|l| l == line),
        "no {line:?} in:\n{}",
        lines.join("\n")
    );
}

#[test]
fn prometheus_sees_a_live_update_and_the_counters_survive_updates() {
    let prometheus_bin = prometheus_binary();
    println!("using {}", prometheus_bin.display());
    let dir = TestDir::new("exporter");
    let run = dir.join("run");
    std::fs::create_dir_all(&run).expect("create socket dir");
    // A socket nobody serves: vmmd_up 0.
    drop(std::os::unix::net::UnixListener::bind(run.join("dead.sock")).expect("bind"));
    let opts = VmmdOptions::new(1, "64M")
        .in_dir(&dir)
        .api_socket(run.join("vm1.sock"));
    let (vmm, _console, _ready) = VmmdProcess::boot(opts);
    let (exporter, _exporter_child) = start_exporter(&run);
    let before = scrape(exporter);
    assert_line(&before, "vmmd_up{vm=\"vm1\"} 1");
    assert_line(
        &before,
        "vmmd_updates_total{vm=\"vm1\",result=\"updated\"} 0",
    );

    let prometheus = Prometheus::start(dir.path(), exporter);
    let updated = "vmmd_updates_total{result=\"updated\"}";
    let pauses = "vmmd_update_pause_seconds_count";
    let (labels, _) = prometheus.await_value(updated, "0");
    assert_eq!(labels["vm"], "vm1", "{labels}");
    prometheus.await_value(pauses, "0");
    prometheus.await_value("vmmd_up{vm=\"dead\"}", "0");

    // One live update.
    let new = vmmd_copy(dir.path(), "vmmd-new");
    let r = cprctl_update(&vmm, &new, &[]);
    assert_eq!(r.code(), Some(0), "{}\n{}", r.stderr, r.report);
    assert_eq!(r.outcome(), "updated", "{}", r.report);
    prometheus.await_value(updated, "1");
    prometheus.await_value(pauses, "1");
    prometheus.await_value("vmmd_generation{vm=\"vm1\"}", "1");
    prometheus.await_value("vmmd_runstate{vm=\"vm1\",state=\"running\"}", "1");
    let sum = prometheus.query("vmmd_update_pause_seconds_sum");
    println!("PromQL vmmd_update_pause_seconds_sum -> {sum:?}");

    // An exec that fails (vmmd counts it as failed), then a rollback: the new process carries on
    // from the counters it was handed.
    let broken = vmmd_with_missing_interpreter(dir.path());
    let info = cpr_tests::cpr::info_now(&vmm.api_socket).expect("Info");
    let state = dir.join("direct.state");
    let argv = new_command_line(&broken, &info, &state, Load::AtStart, 10, &[], &[]);
    // A fresh connection: the process image serving the socket changed.
    let api = Api::connect(&vmm.api_socket).expect("connect");
    api.set_migration_parameters(MigrationMode::CprExec, argv)
        .expect("SetMigrationParameters");
    let err = api
        .migrate(&format!("file:{}", state.display()))
        .expect_err("execve must fail");
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    let r = cprctl_update(
        &vmm,
        &new,
        &["--new-arg=--fault-inject", "--new-arg=fail-load"],
    );
    assert_eq!(r.outcome(), "rolled-back", "{}\n{}", r.stderr, r.report);
    wait_settled(&vmm.api_socket, DEADLINE);
    let after = scrape(exporter);
    println!(
        "exporter after update, failure and rollback:\n{}",
        after.join("\n")
    );
    for line in [
        "vmmd_updates_total{vm=\"vm1\",result=\"updated\"} 1",
        "vmmd_updates_total{vm=\"vm1\",result=\"failed\"} 1",
        "vmmd_updates_total{vm=\"vm1\",result=\"rolled_back\"} 1",
        "vmmd_rollbacks_total{vm=\"vm1\"} 1",
        "vmmd_update_pause_seconds_count{vm=\"vm1\"} 2",
        "vmmd_generation{vm=\"vm1\"} 1",
    ] {
        assert_line(&after, line);
    }
    prometheus.await_value("vmmd_rollbacks_total", "1");
    prometheus.await_value("vmmd_updates_total{result=\"failed\"}", "1");
}

/// `deploy/cprctl-exporter.service` passes `systemd-analyze verify` (with ExecStart pointed at the
/// built cprctl), where the tool exists.
#[test]
fn the_exporter_unit_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cprctl-exporter.service");
    let text = std::fs::read_to_string(&unit).expect("read deploy/cprctl-exporter.service");
    assert!(
        text.contains("ExecStart=/usr/local/bin/cprctl exporter --listen"),
        "{text}"
    );
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        println!("SKIPPED: systemd-analyze is not installed");
        return;
    };
    assert!(version.status.success());
    let dir = TestDir::new("exporter-unit");
    let copy = dir.join("cprctl-exporter.service");
    let cprctl = cpr_tests::bins::cprctl();
    let text = text.replace("/usr/local/bin/cprctl", &cprctl.display().to_string());
    std::fs::write(&copy, text).expect("write the unit copy");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("systemd-analyze verify: {:?} {stderr}", out.status);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {stderr}"
    );
    assert!(!stderr.contains("cprctl-exporter.service:"), "{stderr}");
}
