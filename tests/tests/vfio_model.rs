//! VFIO across live updates, against vmmd's model of the kernel's type1 IOMMU (`--vfio-model`):
//! real vmmd processes, real `execve`, the model's state in a file standing in for kernel memory.
//! These machines have no IOMMU; the same code runs against the real kernel in
//! `tests/vfio-tcg/` (QEMU TCG with an emulated IOMMU and an `edu` device).
//!
//! What a user checks: the guest keeps running with its memory intact, every DMA mapping is valid
//! and points at the running process's mapping of the same guest-RAM offset, and a failure at any
//! VFIO call of the update path is rolled back and reported with the container and errno.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cpr_tests::cpr::{cprctl_update, info_now, wait_settled, CprctlUpdate};
use cpr_tests::reboot::reboot_prep;
use cpr_tests::{Console, TestDir, Verify, VmmdOptions, VmmdProcess};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(60);

struct Guest {
    dir: Arc<TestDir>,
    vmm: VmmdProcess,
    console: Console,
    hash: String,
    state: PathBuf,
    containers: usize,
}

/// A fake sysfs device whose `iommu_group` link names `group` (and an `mdev_type` for an mdev).
fn fake_device(dir: &Path, name: &str, group: u32, mdev: bool) -> PathBuf {
    let d = dir.join("sys").join(name);
    std::fs::create_dir_all(&d).expect("mkdir");
    std::os::unix::fs::symlink(format!("../../groups/{group}"), d.join("iommu_group"))
        .expect("symlink");
    if mdev {
        std::fs::write(d.join("mdev_type"), "").expect("mdev_type");
    }
    d
}

/// Boots a guest with one device per container (`containers` of them) plus `extra` vmmd flags.
fn boot(containers: usize, extra: &[&str], memory_file: bool) -> Guest {
    let dir = TestDir::new("vfio-model");
    let state = dir.join("vfio-model.json");
    let mut opts = VmmdOptions::new(1, "64M").in_dir(&dir);
    if memory_file {
        opts = opts.memory_path(dir.join("guest.ram"));
    }
    for i in 0..containers {
        let dev = fake_device(
            dir.path(),
            &format!("0000:00:{:02x}.0", i + 3),
            20 + i as u32,
            false,
        );
        opts.extra_args.push("--device".into());
        opts.extra_args
            .push(format!("vfio={},container=c{i}", dev.display()));
    }
    opts.extra_args.push("--vfio-model".into());
    opts.extra_args.push(state.display().to_string());
    opts.extra_args.extend(extra.iter().map(|s| s.to_string()));
    let (vmm, mut console, _) = VmmdProcess::boot(opts);
    let hash = console.verify().expect_ok();
    Guest {
        dir,
        vmm,
        console,
        hash,
        state,
        containers,
    }
}

/// One line of /proc/PID/maps: range, file offset, inode.
fn maps(pid: u32) -> Vec<(u64, u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (a, b) = f.first()?.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
                u64::from_str_radix(f.get(2)?, 16).ok()?,
                f.get(4)?.parse().ok()?,
            ))
        })
        .collect()
}

impl Guest {
    fn model(&self) -> Value {
        serde_json::from_slice(&std::fs::read(&self.state).expect("model state"))
            .expect("model JSON")
    }

    fn inject(&self, fault: &str) {
        std::fs::write(self.state.with_extension("faults"), format!("{fault}\n"))
            .expect("faults file");
    }

    /// Every mapping of every container is valid and its host address is, in the running vmmd,
    /// the same file and offset the mapping pinned when it was made.
    fn assert_mappings_valid(&self, context: &str) -> Vec<u64> {
        let model = self.model();
        assert_eq!(
            model["violations"],
            Value::Array(vec![]),
            "{context}: {model:#}"
        );
        let containers = model["containers"].as_object().expect("containers");
        assert_eq!(containers.len(), self.containers, "{context}");
        let maps = maps(self.vmm.pid());
        let mut vaddrs = Vec::new();
        for (id, c) in containers {
            let dmas = c["dmas"].as_array().expect("dmas");
            assert!(!dmas.is_empty(), "{context}: container {id} maps nothing");
            for d in dmas {
                let vaddr = d["vaddr"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{context}: container {id}: invalid {d}"));
                let size = d["size"].as_u64().expect("size");
                let (inode, offset) = (
                    d["backing"]["inode"].as_u64().expect("inode"),
                    d["backing"]["offset"].as_u64().expect("offset"),
                );
                let m = maps.iter().find(|m| vaddr >= m.0 && vaddr + size <= m.1);
                let (start, _, file_off, ino) =
                    *m.unwrap_or_else(|| panic!("{context}: {vaddr:#x} is not mapped in vmmd"));
                assert_eq!(
                    (ino, file_off + (vaddr - start)),
                    (inode, offset),
                    "{context}: container {id} {d}"
                );
                vaddrs.push(vaddr);
            }
        }
        // The locked-memory charge sits with one mm: the running process's.
        assert_eq!(
            model["locked"].as_object().map(|m| m.len()),
            Some(1),
            "{context}: {}",
            model["locked"]
        );
        vaddrs
    }

    fn assert_guest_intact(&mut self, context: &str) {
        let info = wait_settled(&self.vmm.api_socket, SETTLE);
        assert_eq!(
            info.run_state,
            cpr_tests::RunState::Running as i32,
            "{context}: {info:?}"
        );
        assert_eq!(
            self.console.verify(),
            Verify::Ok(self.hash.clone()),
            "{context}: guest memory changed"
        );
        assert_eq!(self.console.failures(), Vec::<String>::new(), "{context}");
    }

    fn update(&self) -> CprctlUpdate {
        cprctl_update(&self.vmm, &cpr_tests::bins::vmmd(), &[])
    }
}

fn updates_move_every_mapping_to_the_new_process(containers: usize) {
    let mut g = boot(containers, &[], false);
    let before = g.assert_mappings_valid("after boot");
    for round in 1..=2 {
        let r = g.update();
        assert_eq!(
            r.code(),
            Some(0),
            "update {round}: {}\n{}",
            r.stderr,
            r.report
        );
        g.assert_guest_intact(&format!("after update {round}"));
        let after = g.assert_mappings_valid(&format!("after update {round}"));
        assert_eq!(after.len(), before.len());
    }
    let log: Vec<String> = serde_json::from_value(g.model()["log"].clone()).expect("log");
    for k in 0..containers {
        let count = |op: &str| {
            log.iter()
                .filter(|l| l.starts_with(&format!("container {k} {op} ok")))
                .count()
        };
        assert_eq!(count("invalidate-vaddr"), 2, "{log:#?}");
        assert_eq!(count("update-vaddr"), 2, "{log:#?}");
    }
}

#[test]
fn updates_move_every_mapping_one_container() {
    updates_move_every_mapping_to_the_new_process(1);
}

#[test]
fn updates_move_every_mapping_three_containers() {
    updates_move_every_mapping_to_the_new_process(3);
}

#[test]
fn a_failure_at_every_vfio_call_of_an_update_is_rolled_back() {
    for containers in 1..=3 {
        let mut g = boot(containers, &[], false);
        for k in 0..containers {
            // In the old process, inside the pause: the guest resumes on the old binary.
            for (fault, outcome) in [
                (format!("invalidate-vaddr:{k}:0:EIO"), "failed"),
                (format!("update-vaddr:{k}:0:EFAULT"), "rolled-back"),
            ] {
                let context = format!("{containers} containers, fault {fault}");
                let generation = info_now(&g.vmm.api_socket).expect("info").update_generation;
                g.inject(&fault);
                let r = g.update();
                assert_eq!(r.code(), Some(1), "{context}: {}\n{}", r.stderr, r.report);
                assert_eq!(r.outcome(), outcome, "{context}: {}", r.report);
                let error = r.report["error"].as_str().unwrap_or_default();
                let errno = fault.rsplit(':').next().unwrap_or_default();
                assert!(
                    error.contains(&format!("VFIO container {k}")) && error.contains(errno),
                    "{context}: the report must name the container and errno: {error}"
                );
                let steps = r.report["steps"].as_array().cloned().unwrap_or_default();
                assert!(
                    steps
                        .iter()
                        .any(|st| st["step"] == "vfio-dma" && st["status"] == "compensated"),
                    "{context}: cprctl must show the VFIO step's compensation: {steps:#?}"
                );
                g.assert_guest_intact(&context);
                g.assert_mappings_valid(&context);
                let info = info_now(&g.vmm.api_socket).expect("info");
                assert_eq!(info.update_generation, generation, "{context}");
            }
        }
        let r = g.update();
        assert_eq!(
            r.code(),
            Some(0),
            "clean update after the faults: {}\n{}",
            r.stderr,
            r.report
        );
        g.assert_guest_intact("after the clean update");
        g.assert_mappings_valid("after the clean update");
    }
}

#[test]
fn a_repeated_invalidation_is_refused_and_rolled_back() {
    let mut g = boot(2, &["--fault-inject", "vfio-invalidate-twice"], false);
    let r = g.update();
    assert_eq!(
        (r.code(), r.outcome()),
        (Some(1), "failed"),
        "{}\n{}",
        r.stderr,
        r.report
    );
    let error = r.report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("VFIO container 1") && error.contains("EINVAL"),
        "{error}"
    );
    g.assert_guest_intact("after the refused repeat");
    g.assert_mappings_valid("after the refused repeat");
    // The hook fires once; the next update goes through.
    let r = g.update();
    assert_eq!(r.code(), Some(0), "{}\n{}", r.stderr, r.report);
    g.assert_mappings_valid("after the next update");
}

#[test]
fn blockers_without_vaddr_support_or_with_an_mdev() {
    let g = boot(1, &["--vfio-model-without-vaddr"], false);
    let info = info_now(&g.vmm.api_socket).expect("info");
    let blockers = info.cpr_exec_blockers.join("\n");
    assert!(
        blockers.contains("VFIO_UPDATE_VADDR") && blockers.contains("VFIO_UNMAP_ALL"),
        "{blockers}"
    );
    let r = g.update();
    assert_eq!(r.code(), Some(1), "{}\n{}", r.stderr, r.report);
    assert!(
        r.report["error"]
            .as_str()
            .unwrap_or_default()
            .contains("VFIO_UPDATE_VADDR"),
        "{}",
        r.report
    );
    drop(g);

    let dir = TestDir::new("vfio-mdev");
    let mdev = fake_device(dir.path(), "8d4ad8b0-mdev", 30, true);
    let mut opts = VmmdOptions::new(1, "64M").in_dir(&dir);
    opts.extra_args = vec![
        "--device".into(),
        format!("vfio={}", mdev.display()),
        "--vfio-model".into(),
        dir.join("model.json").display().to_string(),
    ];
    let (vmm, _console, _) = VmmdProcess::boot(opts);
    let info = info_now(&vmm.api_socket).expect("info");
    assert!(
        info.cpr_exec_blockers
            .iter()
            .any(|b| b.contains("mediated device")),
        "{:?}",
        info.cpr_exec_blockers
    );
}

#[test]
fn cpr_reboot_with_vfio_needs_a_suspended_guest() {
    let g = boot(1, &[], true);
    let info = info_now(&g.vmm.api_socket).expect("info");
    assert!(
        info.cpr_reboot_blockers
            .iter()
            .any(|b| b.contains("suspend the guest first")),
        "{:?}",
        info.cpr_reboot_blockers
    );
    assert_eq!(
        info.cpr_reboot_blockers_cleared_by_suspend.len(),
        1,
        "the VFIO blocker is the one a suspend clears: {:?}",
        info.cpr_reboot_blockers_cleared_by_suspend
    );
    let saved = g.dir.join("reboot.state");
    let r = reboot_prep(&g.vmm.api_socket, &saved, &[]);
    assert_eq!(
        r.code(),
        Some(1),
        "reboot-prep of a running guest with VFIO must be refused"
    );
    assert!(
        r.error().contains("suspend the guest first"),
        "{}",
        r.error()
    );
    // reboot-prep asks the guest to suspend on the console: let go of it.
    let Guest { vmm, console, .. } = g;
    drop(console);
    let r = reboot_prep(&vmm.api_socket, &saved, &["--suspend"]);
    r.expect_ok("reboot-prep --suspend with VFIO");
    assert_eq!(r.report["suspended"], Value::Bool(true), "{}", r.report);
}
