//! cprctl against a real vmmd: JSON output, pause/resume, errors, events, console.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cpr_tests::{bins, RunState, TestDir, VmmdOptions, VmmdProcess};
use serde_json::Value;

fn cprctl(vmm: &VmmdProcess, args: &[&str]) -> Output {
    Command::new(bins::cprctl())
        .arg("--socket")
        .arg(&vmm.api_socket)
        .args(args)
        .output()
        .expect("cannot run cprctl")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "cprctl failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "cprctl printed invalid JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn status_json_describes_the_running_vm() {
    let (vmm, _console, _) = VmmdProcess::boot(VmmdOptions::new(2, "64M"));
    let v = json_of(&cprctl(&vmm, &["status", "--json"]));
    assert_eq!(v["run_state"], "running", "{v}");
    assert_eq!(v["pid"], vmm.pid(), "{v}");
    assert_eq!(v["config"]["vcpus"], 2, "{v}");
    assert_eq!(v["config"]["memory_bytes"], 64u64 << 20, "{v}");
    assert!(v["version"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    assert!(v["uptime_ms"].as_u64().is_some(), "{v}");

    let human = cprctl(&vmm, &["status"]);
    assert!(human.status.success());
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("run state:  running"), "{text}");
}

#[test]
fn pause_and_resume_through_cprctl() {
    let (vmm, console, _) = VmmdProcess::boot(VmmdOptions::new(1, "64M"));
    let v = json_of(&cprctl(&vmm, &["--json", "pause"]));
    assert_eq!(v["run_state"], "paused");
    assert_eq!(vmm.api().run_state(), RunState::Paused);
    std::thread::sleep(Duration::from_millis(200));
    let quiet_from = Instant::now();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        console.heartbeats_since(quiet_from),
        0,
        "heartbeats while paused"
    );

    let v = json_of(&cprctl(&vmm, &["--json", "status"]));
    assert_eq!(v["run_state"], "paused");

    let out = cprctl(&vmm, &["resume"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "run state: running\n");
    assert!(console.wait_for_heartbeats(Instant::now(), 20, Duration::from_secs(30)));
}

#[test]
fn grpc_errors_exit_non_zero_with_code_and_message() {
    let (vmm, _console, _) = VmmdProcess::boot(VmmdOptions::new(1, "64M"));
    let out = cprctl(&vmm, &["--json", "migrate", "tcp:127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("INVALID_ARGUMENT"), "{stderr}");
    assert!(stderr.contains("tcp"), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON error document");
    assert_eq!(v["error"]["code"], "INVALID_ARGUMENT", "{v}");
    assert_eq!(vmm.api().run_state(), RunState::Running);
}

#[test]
fn missing_socket_says_which_path_and_exits_3() {
    let dir = TestDir::new("cprctl-missing");
    let sock = dir.join("nothing.sock");
    let out = Command::new(bins::cprctl())
        .arg("status")
        .env("VMMD_SOCKET", &sock)
        .output()
        .expect("cannot run cprctl");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&sock.display().to_string()), "{stderr}");
    assert!(stderr.contains("vmmd is running"), "{stderr}");
}

#[test]
fn migrate_and_query_migrate_print_timings() {
    let dir = TestDir::new("cprctl-migrate");
    let (vmm, _console, _) = VmmdProcess::boot(VmmdOptions::new(1, "64M").in_dir(&dir));
    let uri = format!("file:{}", dir.join("vm.state").display());
    let v = json_of(&cprctl(&vmm, &["--json", "migrate", &uri]));
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["mode"], "normal", "{v}");
    assert_eq!(v["uri"], uri.as_str(), "{v}");
    assert!(v["ram_bytes"].as_u64() >= Some(64 << 20), "{v}");
    assert!(v["phases"].as_array().is_some_and(|p| !p.is_empty()), "{v}");
    let q = json_of(&cprctl(&vmm, &["--json", "query-migrate"]));
    assert_eq!(q["status"], "completed", "{q}");
    let status = json_of(&cprctl(&vmm, &["--json", "status"]));
    assert_eq!(status["run_state"], "postmigrate", "{status}");
}

#[test]
fn set_mode_normal_is_accepted() {
    let (vmm, _console, _) = VmmdProcess::boot(VmmdOptions::new(1, "64M"));
    let v = json_of(&cprctl(&vmm, &["--json", "set-mode", "normal"]));
    assert_eq!(v["mode"], "normal", "{v}");
}

#[test]
fn events_stream_runstate_changes_as_json_lines() {
    let (vmm, _console, _) = VmmdProcess::boot(VmmdOptions::new(1, "64M"));
    let mut child = Command::new(bins::cprctl())
        .arg("--socket")
        .arg(&vmm.api_socket)
        .args(["--json", "events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot run cprctl events");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The subscription starts a moment after the process does: pause and resume until the
    // stream shows both transitions (both requests are harmless to repeat).
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let has = |seen: &Vec<(String, String)>, old: &str, new: &str| {
        seen.iter().any(|(o, n)| o == old && n == new)
    };
    while Instant::now() < deadline
        && !(has(&seen, "running", "paused") && has(&seen, "paused", "running"))
    {
        vmm.api().pause().expect("Pause");
        vmm.api().resume().expect("Resume");
        let round_end = Instant::now() + Duration::from_secs(2);
        while let Some(left) = round_end.checked_duration_since(Instant::now()) {
            let Ok(line) = rx.recv_timeout(left) else {
                break;
            };
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("event line is not JSON ({e}): {line}"));
            assert!(v["timestamp_unix_micros"].as_u64().is_some(), "{v}");
            if v["type"] == "run_state" {
                let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                seen.push((field("old"), field("new")));
            }
            if has(&seen, "running", "paused") && has(&seen, "paused", "running") {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        has(&seen, "running", "paused") && has(&seen, "paused", "running"),
        "expected running->paused and paused->running events, saw {seen:?}"
    );
}

#[test]
fn console_pipe_mode_sends_input_and_prints_output() {
    let vmm = VmmdProcess::spawn(VmmdOptions::new(1, "64M"));
    // Wait for READY with the harness client, then hand the console to cprctl.
    {
        let mut c = vmm.console();
        c.wait_for_line("READY", cpr_tests::vmmd::READY_TIMEOUT);
    }
    let mut out = None;
    for _ in 0..20 {
        let mut child = Command::new(bins::cprctl())
            .args(["console", "--linger-ms", "3000"])
            .arg(&vmm.console_socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run cprctl console");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(b"v")
            .expect("write command");
        let o = child.wait_with_output().expect("cprctl console output");
        // vmmd may not have noticed the previous client leave yet.
        if String::from_utf8_lossy(&o.stdout).starts_with("vmmd: console busy") {
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        out = Some(o);
        break;
    }
    let out = out.expect("console stayed busy after the previous client left");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\nVERIFY OK "), "no VERIFY OK in {text:?}");
    assert!(text.contains('.'), "no heartbeats in {text:?}");
}

#[test]
fn demo_live_updates_three_times_and_reports_the_blackout() {
    let dir = TestDir::new("cprctl-demo");
    let out = Command::new(bins::cprctl())
        .args([
            "--json",
            "demo",
            "--no-build",
            "--vcpus",
            "1",
            "--memory",
            "64M",
            "--dir",
        ])
        .arg(dir.path())
        .arg("--keep")
        .output()
        .expect("cannot run cprctl demo");
    let v = json_of(&out);
    assert_eq!(v["ok"], true, "{v}");
    let updates = v["updates"].as_array().expect("updates");
    assert_eq!(updates.len(), 3, "{v}");
    for (i, u) in updates.iter().enumerate() {
        assert_eq!(u["n"], i + 1, "{u}");
        assert_eq!(u["generation"], i + 1, "{u}");
        // The guest did stop, for about as long as vmmd says it paused it.
        assert!(u["blackout_micros"].as_u64() > Some(0), "{u}");
        assert!(u["vmmd_pause_micros"].as_u64() > Some(0), "{u}");
        // The bridge's two pauses and what ran beside the guest (see cpr_exec.rs, PHASES).
        assert!(
            u["phases"].as_array().is_some_and(|p| p.len() == 8
                && p[0]["name"] == "handoff"
                && p[1]["name"] == "bridge-pause"),
            "{u}"
        );
    }
    let summary = &v["summary"]["blackout_micros"];
    assert!(summary["min"].as_u64() <= summary["median"].as_u64(), "{v}");
    assert!(summary["median"].as_u64() <= summary["max"].as_u64(), "{v}");
    assert_eq!(v["heartbeats_received"], v["heartbeats_counted"], "{v}");
    assert!(v["heartbeats_received"].as_u64() > Some(0), "{v}");
    assert!(
        v["verify_hash"].as_str().is_some_and(|h| !h.is_empty()),
        "{v}"
    );
    assert!(
        v["ready"]
            .as_str()
            .is_some_and(|r| r.starts_with("READY cpus=1")),
        "{v}"
    );
    // Progress went to stderr, one line per step event.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"step\":\"verify\""), "{stderr}");
}

#[test]
fn update_shows_each_step_and_a_human_report() {
    let (vmm, _console, _) = VmmdProcess::boot(VmmdOptions::new(1, "64M"));
    let out = Command::new(bins::cprctl())
        .arg("--socket")
        .arg(&vmm.api_socket)
        .args(["update", "--binary"])
        .arg(bins::vmmd())
        .output()
        .expect("cannot run cprctl update");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}");
    for step in [
        "[1/5] preflight done",
        "[2/5] set-mode done",
        "[3/5] exec done",
        "[4/5] wait-new-process done",
        "[5/5] verify done",
    ] {
        assert!(stderr.contains(step), "no {step:?} in progress: {stderr}");
    }
    assert!(stdout.starts_with("updated vmmd "), "{stdout}");
    assert!(stdout.contains(&format!("pid {}", vmm.pid())), "{stdout}");
    assert!(stdout.contains("guest paused (vmmd):"), "{stdout}");
    assert_eq!(vmm.api().run_state(), RunState::Running);

    // A refused update exits 1, says why and where the guest is.
    let out = Command::new(bins::cprctl())
        .arg("--socket")
        .arg(&vmm.api_socket)
        .args(["update", "--binary", "/nonexistent/vmmd"])
        .output()
        .expect("cannot run cprctl update");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/vmmd"), "{stderr}");
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert!(stderr.contains("the guest is running"), "{stderr}");
}
