//! `cprctl update --all`: every vmmd of a socket directory live-updated, one of them refusing (a
//! passthrough device on a host kernel without VFIO_UPDATE_VADDR); without `--keep-going` the
//! failure stops the later VMs, with it the others are updated; every guest runs on intact.

use std::path::Path;
use std::process::{Command, Output};

use cpr_tests::cpr::vmmd_copy;
use cpr_tests::fleet::{boot_fleet, FleetVm, VmSpec};
use cpr_tests::{bins, TestDir};
use serde_json::Value;

fn update_all(socket_dir: &Path, binary: &Path, extra: &[&str]) -> Output {
    let out = Command::new(bins::cprctl())
        .args(["update", "--all", "--binary"])
        .arg(binary)
        .arg("--socket-dir")
        .arg(socket_dir)
        .args(extra)
        .output()
        .expect("cannot run cprctl");
    let shown = if extra.contains(&"--json") {
        String::new()
    } else {
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    eprintln!("cprctl update --all {extra:?} -> {}\n{shown}", out.status);
    out
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "invalid JSON ({e}): {}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `(vm, outcome, generation)` of every VM in the JSON report, in its order.
fn results(v: &Value) -> Vec<(String, String, Option<u64>)> {
    v["vms"]
        .as_array()
        .unwrap_or_else(|| panic!("no vms list: {v}"))
        .iter()
        .map(|r| {
            (
                r["vm"].as_str().unwrap_or_default().to_owned(),
                r["outcome"].as_str().unwrap_or_default().to_owned(),
                r["generation"].as_u64(),
            )
        })
        .collect()
}

fn generations(vms: &[FleetVm]) -> Vec<u64> {
    vms.iter().map(|v| v.info().update_generation).collect()
}

#[test]
fn update_all_stops_at_a_failure_unless_keep_going_and_every_guest_runs() {
    let dir = TestDir::new("update-all");
    let sockets = dir.join("run");
    let specs = [
        VmSpec::plain("vm-a"),
        VmSpec::update_blocked("vm-b", dir.path()),
        VmSpec::plain("vm-c"),
        VmSpec::plain("vm-d"),
    ];
    let mut vms = boot_fleet(&dir, &sockets, &specs);
    let old = bins::vmmd();
    let new = vmmd_copy(dir.path(), "vmmd-new");

    // One at a time, no --keep-going: vm-a is updated, vm-b refuses, vm-c and vm-d are left alone.
    let out = update_all(&sockets, &new, &["--json", "--jobs", "1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v = json(&out);
    let o = |s: &str| s.to_owned();
    assert_eq!(
        results(&v),
        [
            (o("vm-a"), o("updated"), Some(1)),
            (o("vm-b"), o("refused"), Some(0)),
            (o("vm-c"), o("not-started"), None),
            (o("vm-d"), o("not-started"), None),
        ],
        "{v}"
    );
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["totals"]["vms"], 4, "{v}");
    assert_eq!(v["totals"]["updated"], 1, "{v}");
    assert_eq!(v["totals"]["failed"], 1, "{v}");
    assert_eq!(v["totals"]["not_started"], 2, "{v}");
    let b = &v["vms"][1];
    assert!(
        b["error"]
            .as_str()
            .is_some_and(|e| e.contains("VFIO_UPDATE_VADDR")),
        "{b}"
    );
    assert_eq!(b["socket"], sockets.join("vm-b.sock").display().to_string());
    assert!(v["vms"][0]["pause_ms"].as_f64() > Some(0.0), "{v}");
    assert!(
        v["vms"][2]["error"]
            .as_str()
            .is_some_and(|e| e.contains("vm-b failed")),
        "{v}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("vm-b refused"), "{stderr}");
    assert!(
        stderr.contains("\"vm\":\"vm-a\""),
        "JSON progress per VM: {stderr}"
    );
    assert_eq!(generations(&vms), [1, 0, 0, 0]);
    for vm in &mut vms {
        let info = vm.assert_runs_intact("after update --all without --keep-going");
        let expected = if vm.name == "vm-a" { &new } else { &old };
        assert_eq!(Path::new(&info.executable), expected, "{}", vm.name);
    }

    // --keep-going, two at a time: every VM but vm-b is updated.
    let out = update_all(&sockets, &new, &["--json", "--jobs", "2", "--keep-going"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v = json(&out);
    assert_eq!(
        results(&v),
        [
            (o("vm-a"), o("updated"), Some(2)),
            (o("vm-b"), o("refused"), Some(0)),
            (o("vm-c"), o("updated"), Some(1)),
            (o("vm-d"), o("updated"), Some(1)),
        ],
        "{v}"
    );
    assert_eq!(v["totals"]["updated"], 3, "{v}");
    assert_eq!(v["totals"]["not_started"], 0, "{v}");

    // The operator's table.
    let out = update_all(&sockets, &new, &["--keep-going"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].contains("4 VMs") && lines[0].contains("3 updated, 1 failed"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("VM ") && lines[1].contains("GENERATION"),
        "{table}"
    );
    assert!(lines[2].starts_with("vm-a  updated"), "{table}");
    assert!(lines[3].starts_with("vm-b  refused"), "{table}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cprctl update vm-c: [1/5] preflight"),
        "{stderr}"
    );
    assert_eq!(generations(&vms), [3, 0, 2, 2]);
    for vm in &mut vms {
        vm.assert_runs_intact("after update --all --keep-going");
    }

    // The same table when the failure stops the rollout.
    let out = update_all(&sockets, &new, &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("1 updated, 1 failed, 2 not started"),
        "{table}"
    );
    for vm in ["vm-c", "vm-d"] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&format!("{vm}  not-started"))),
            "{table}"
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 not started (--keep-going"), "{stderr}");
    assert_eq!(generations(&vms), [4, 0, 2, 2]);

    // A socket nobody serves (a vmmd that crashed) is reported as unreachable: exit status 3.
    let stale = sockets.join("vm-e.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let out = update_all(&sockets, &new, &["--json", "--keep-going", "--jobs", "4"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let v = json(&out);
    assert_eq!(v["vms"][4]["vm"], "vm-e", "{v}");
    assert_eq!(v["vms"][4]["outcome"], "unknown", "{v}");
    assert_eq!(v["vms"][4]["exit_code"], 3, "{v}");
    assert_eq!(v["totals"]["updated"], 3, "{v}");
    for vm in &mut vms {
        vm.assert_runs_intact("after update --all with a stale socket");
    }
}
