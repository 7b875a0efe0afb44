//! cpr-reboot end to end: `cprctl reboot-prep`, a simulated host reboot (vmmd gone, SIGKILL if it
//! lingers), a fresh vmmd with `--incoming defer`, `cprctl reboot-resume`; the guest keeps its
//! memory (same VERIFY hash) and its counters continue. Plus blockers and failure injection, each
//! leaving the RAM file and the state file as they were, so the operator can retry.

use std::path::Path;
use std::time::{Duration, Instant};

use cpr_tests::reboot::{
    after_reboot, cprctl_json, reboot_prep, reboot_resume, simulate_host_reboot,
    vmmd_refuses_to_start, ShmRam,
};
use cpr_tests::{Console, Counters, RunState, TestDir, VmmdOptions, VmmdProcess};

const WAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the guest showed before the prep.
struct Before {
    counters: Counters,
    hash: String,
}

fn snapshot(console: &mut Console) -> Before {
    let counters = console.counters();
    let hash = console.verify().expect_ok();
    Before { counters, hash }
}

/// After the resume: heartbeats flow, counters continue, memory is what it was.
fn check_intact(console: &mut Console, before: &Before, suspended: bool) {
    if suspended {
        console.wait_for_line("WAKE", WAKE_TIMEOUT);
    }
    assert!(
        console.wait_for_heartbeats(Instant::now(), 50, Duration::from_secs(30)),
        "no heartbeats after the resume; console: {}",
        console.output_tail(300)
    );
    let after = console.counters();
    after.assert_continues(&before.counters);
    assert_eq!(
        after.suspends,
        before.counters.suspends + u64::from(suspended),
        "{:?} -> {after:?}",
        before.counters
    );
    let hash = console.verify().expect_ok();
    assert_eq!(hash, before.hash, "guest memory changed across the reboot");
    assert_eq!(console.failures(), Vec::<String>::new());
}

fn boot_file_backed(vcpus: u32, ram: &ShmRam) -> (VmmdProcess, Console) {
    let opts = VmmdOptions::new(vcpus, "64M").memory_path(ram.path().to_path_buf());
    let (vmm, console, _) = VmmdProcess::boot(opts);
    (vmm, console)
}

fn prep_reboot_resume(vcpus: u32, suspend: bool) {
    let ram = ShmRam::new(&format!("cycle{vcpus}"));
    let state_dir = TestDir::new("reboot-state");
    let state = state_dir.join("vm.state");
    let (vmm, mut console) = boot_file_backed(vcpus, &ram);
    let before = snapshot(&mut console);
    let opts = vmm.opts.clone();
    // The console takes one client: the test guest's suspend request goes through it.
    drop(console);

    let extra: &[&str] = if suspend { &["--suspend"] } else { &[] };
    let t_prep = Instant::now();
    let prep = reboot_prep(&vmm.api_socket, &state, extra);
    let prep_took = t_prep.elapsed();
    prep.expect_ok("reboot-prep");
    assert_eq!(prep.outcome(), "prepared");
    assert_eq!(prep.report["suspended"], suspend, "{}", prep.report);
    let marker = state_dir.join("vm.state.marker.json");
    assert!(marker.is_file() && state.is_file(), "{}", prep.report);
    simulate_host_reboot(vmm);

    let (new, mut console) = VmmdProcess::spawn_with_console(after_reboot(&opts));
    assert_eq!(new.api().run_state(), RunState::Inmigrate);
    let t_resume = Instant::now();
    let resume = reboot_resume(&new.api_socket, &state);
    let resume_took = t_resume.elapsed();
    resume.expect_ok("reboot-resume");
    assert_eq!(resume.outcome(), "resumed");
    assert_eq!(new.api().run_state(), RunState::Running);
    assert!(!marker.exists(), "the marker is retired after the resume");
    assert!(state_dir.join("vm.state.resumed.json").is_file());
    check_intact(&mut console, &before, suspend);
    eprintln!(
        "vcpus={vcpus} suspend={suspend}: reboot-prep {:?}, reboot-resume {:?} (guest-visible \
         blackout excluding the reboot ≈ their sum; vmmd: save {} us, load {} us)",
        prep_took, resume_took, prep.report["vmmd_micros"], resume.report["vmmd_micros"]
    );
}

#[test]
fn reboot_keeps_a_1_vcpu_guest_intact() {
    prep_reboot_resume(1, false);
}

#[test]
fn reboot_keeps_a_2_vcpu_guest_intact() {
    prep_reboot_resume(2, false);
}

#[test]
fn reboot_with_suspend_wakes_a_1_vcpu_guest_intact() {
    prep_reboot_resume(1, true);
}

#[test]
fn reboot_with_suspend_wakes_a_2_vcpu_guest_intact() {
    prep_reboot_resume(2, true);
}

#[test]
fn four_guests_reboot_at_once_with_all() {
    let sockets = TestDir::new("reboot-all");
    let state_dir = TestDir::new("reboot-all-st");
    let names = ["vm0", "vm1", "vm2", "vm3"];
    let rams: Vec<ShmRam> = names.iter().map(|n| ShmRam::new(n)).collect();
    let mut vms = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let dir = TestDir::new(name);
        let opts = VmmdOptions::new(1 + (i as u32 % 2), "64M")
            .memory_path(rams[i].path().to_path_buf())
            .api_socket(sockets.join(&format!("{name}.sock")))
            .in_dir(&dir);
        let (vmm, mut console, _) = VmmdProcess::boot(opts);
        let before = snapshot(&mut console);
        vms.push((vmm, console, before));
    }
    let all_args = |cmd: &str| {
        vec![
            cmd.to_owned(),
            "--all".into(),
            "--socket-dir".into(),
            sockets.path().display().to_string(),
            "--state-dir".into(),
            state_dir.path().display().to_string(),
            "--jobs".into(),
            "4".into(),
        ]
    };
    let prep = cprctl_json(all_args("reboot-prep"));
    prep.expect_ok("reboot-prep --all");
    assert_eq!(prep.report["succeeded"], 4, "{}", prep.report);
    let mut reborn = Vec::new();
    for (vmm, console, before) in vms {
        let opts = after_reboot(&vmm.opts).in_dir(&TestDir::new("reborn"));
        drop(console);
        simulate_host_reboot(vmm);
        reborn.push((opts, before));
    }
    let mut started = Vec::new();
    for (opts, before) in reborn {
        let (vmm, console) = VmmdProcess::spawn_with_console(opts);
        started.push((vmm, console, before));
    }
    let resume = cprctl_json(all_args("reboot-resume"));
    resume.expect_ok("reboot-resume --all");
    assert_eq!(resume.report["succeeded"], 4, "{}", resume.report);
    for (vmm, mut console, before) in started {
        assert_eq!(vmm.api().run_state(), RunState::Running);
        check_intact(&mut console, &before, false);
    }
}

/// Guest RAM in an anonymous memfd cannot outlive vmmd: reboot-prep refuses, saying what to
/// configure, and the guest runs on.
#[test]
fn memfd_ram_is_refused_and_the_guest_runs_on() {
    let (vmm, mut console, _) = VmmdProcess::boot(VmmdOptions::new(1, "64M"));
    let blockers = vmm.api().info().expect("Info").cpr_reboot_blockers;
    assert!(!blockers.is_empty(), "a memfd guest must list a blocker");
    let state_dir = TestDir::new("reboot-memfd");
    let prep = reboot_prep(&vmm.api_socket, &state_dir.join("vm.state"), &[]);
    assert_eq!(prep.code(), Some(1), "{}", prep.stderr);
    assert_eq!(prep.outcome(), "refused");
    assert!(
        prep.error().contains("cpr-reboot is blocked") && prep.error().contains("path="),
        "{}",
        prep.error()
    );
    assert!(!state_dir.join("vm.state").exists());
    assert_eq!(vmm.api().run_state(), RunState::Running);
    assert!(console.wait_for_heartbeats(Instant::now(), 20, Duration::from_secs(30)));
    console.verify().expect_ok();
}

/// A state file that cannot be written stops the prep before anything changes; a failure after
/// the save rolls back (guest running, mode restored, no marker); a retry then succeeds.
#[test]
fn unwritable_state_and_late_failures_roll_back_for_a_retry() {
    let ram = ShmRam::new("unwritable");
    let (vmm, mut console) = boot_file_backed(1, &ram);
    let ram_before = ram.identity();
    let state_dir = TestDir::new("reboot-unwr");

    // 1. The state's directory does not exist.
    let missing = state_dir.join("no-such-dir/vm.state");
    let prep = reboot_prep(&vmm.api_socket, &missing, &[]);
    assert_eq!(prep.code(), Some(1), "{}", prep.stderr);
    assert_eq!(prep.outcome(), "refused");
    assert!(
        prep.error().contains("cannot write the state file")
            && prep.error().contains("no-such-dir"),
        "{}",
        prep.error()
    );
    // 2. The state path is a directory.
    let dir_state = state_dir.join("is-a-dir");
    std::fs::create_dir(&dir_state).expect("mkdir");
    let prep = reboot_prep(&vmm.api_socket, &dir_state, &[]);
    assert_eq!(prep.outcome(), "refused", "{}", prep.report);
    assert!(
        prep.error().contains("not a regular file"),
        "{}",
        prep.error()
    );
    assert_eq!(vmm.api().run_state(), RunState::Running);

    // 3. A failure after the save (marker step) rolls the guest back.
    let state = state_dir.join("vm.state");
    std::fs::write(&state, b"an older state file").expect("write");
    let prep = reboot_prep(&vmm.api_socket, &state, &["--inject-failure", "marker"]);
    assert_eq!(prep.code(), Some(1), "{}", prep.stderr);
    assert_eq!(prep.outcome(), "rolled-back", "{}", prep.report);
    assert_eq!(vmm.api().run_state(), RunState::Running);
    assert_eq!(
        vmm.api().migration_parameters().expect("params").mode,
        cpr_tests::MigrationMode::Normal as i32,
        "the migration mode is restored"
    );
    assert!(!state_dir.join("vm.state.marker.json").exists());
    assert_eq!(ram.identity(), ram_before, "the RAM file is the same file");
    assert!(console.wait_for_heartbeats(Instant::now(), 20, Duration::from_secs(30)));
    let before = snapshot(&mut console);
    drop(console);

    // 4. The retry goes through.
    let opts = vmm.opts.clone();
    reboot_prep(&vmm.api_socket, &state, &[]).expect_ok("reboot-prep retry");
    simulate_host_reboot(vmm);
    let (new, mut console) = VmmdProcess::spawn_with_console(after_reboot(&opts));
    reboot_resume(&new.api_socket, &state).expect_ok("reboot-resume");
    check_intact(&mut console, &before, false);
}

/// Bumps (or restores) the format version in a state file's header; returns the old bytes.
fn set_state_version(state: &Path, version: u32) -> [u8; 4] {
    let mut bytes = std::fs::read(state).expect("read state");
    let old = [bytes[8], bytes[9], bytes[10], bytes[11]];
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    std::fs::write(state, &bytes).expect("write state");
    old
}

/// After the reboot the vmmd cannot read the state's format version: resume refuses before
/// touching anything; with a state it reads, the retry resumes the guest intact.
#[test]
fn new_vmmd_refusing_the_state_version_is_reported_and_retry_works() {
    let ram = ShmRam::new("version");
    let state_dir = TestDir::new("reboot-ver");
    let state = state_dir.join("vm.state");
    let (vmm, mut console) = boot_file_backed(1, &ram);
    let before = snapshot(&mut console);
    drop(console);
    let opts = vmm.opts.clone();
    reboot_prep(&vmm.api_socket, &state, &[]).expect_ok("reboot-prep");
    simulate_host_reboot(vmm);
    let ram_saved = ram.identity();

    let old = set_state_version(&state, 99);
    let state_bytes = std::fs::read(&state).expect("read state");
    let (new, mut console) = VmmdProcess::spawn_with_console(after_reboot(&opts));
    let resume = reboot_resume(&new.api_socket, &state);
    assert_eq!(resume.code(), Some(1), "{}", resume.stderr);
    assert_eq!(resume.outcome(), "refused", "{}", resume.report);
    assert!(
        resume
            .error()
            .contains("cannot read state format version 99"),
        "{}",
        resume.error()
    );
    assert_eq!(new.api().run_state(), RunState::Inmigrate);
    assert_eq!(std::fs::read(&state).expect("read"), state_bytes);
    assert_eq!(ram.identity(), ram_saved);
    assert!(state_dir.join("vm.state.marker.json").is_file());

    set_state_version(&state, u32::from_le_bytes(old));
    reboot_resume(&new.api_socket, &state).expect_ok("reboot-resume retry");
    check_intact(&mut console, &before, false);
}

/// After the reboot the RAM file is of the wrong size (vmmd refuses to start and leaves it) or
/// missing (the load is refused); once the real file is back, the resume succeeds.
#[test]
fn ram_file_wrong_size_or_missing_at_resume_then_retry() {
    let ram = ShmRam::new("ramfile");
    let state_dir = TestDir::new("reboot-ram");
    let state = state_dir.join("vm.state");
    let (vmm, mut console) = boot_file_backed(1, &ram);
    let before = snapshot(&mut console);
    drop(console);
    let opts = vmm.opts.clone();
    reboot_prep(&vmm.api_socket, &state, &[]).expect_ok("reboot-prep");
    simulate_host_reboot(vmm);
    let state_bytes = std::fs::read(&state).expect("read state");
    std::fs::rename(ram.path(), ram.saved()).expect("park the RAM file");

    // Wrong size: vmmd refuses to start and leaves the file alone.
    std::fs::write(ram.path(), vec![0u8; 4096]).expect("write a small file");
    let scratch = TestDir::new("reboot-ram-x");
    let (status, log) = vmmd_refuses_to_start(&after_reboot(&opts), &scratch.join("api.sock"));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("4096 bytes") && log.contains("--memory size"),
        "{log}"
    );
    assert_eq!(std::fs::metadata(ram.path()).expect("stat").len(), 4096);
    std::fs::remove_file(ram.path()).expect("remove the wrong file");

    // Missing: the load is refused and vmmd removes the file it created.
    let (new, _console) = VmmdProcess::spawn_with_console(after_reboot(&opts));
    let resume = reboot_resume(&new.api_socket, &state);
    assert_eq!(resume.code(), Some(1), "{}", resume.stderr);
    assert!(
        resume.error().contains(&ram.path().display().to_string()),
        "{}",
        resume.error()
    );
    assert!(!ram.path().exists(), "vmmd removed the RAM file it created");
    assert_eq!(std::fs::read(&state).expect("read"), state_bytes);
    assert!(state_dir.join("vm.state.marker.json").is_file());
    drop(new);

    // The real file is back: the retry resumes the guest intact.
    std::fs::rename(ram.saved(), ram.path()).expect("restore the RAM file");
    let (new, mut console) = VmmdProcess::spawn_with_console(after_reboot(&opts));
    reboot_resume(&new.api_socket, &state).expect_ok("reboot-resume retry");
    check_intact(&mut console, &before, false);
}
