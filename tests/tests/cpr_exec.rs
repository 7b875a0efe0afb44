//! Live update in cpr-exec mode (`cprctl update`): the guest keeps running under the same PID on a
//! new process image, with its memory, counters and console connection intact; every failure ends
//! with the guest running and its memory intact.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpr_tests::cpr::{
    alt_version_vmmd, cprctl_update, exe_identity, exe_path, fd_targets, info_now, quiet_fd_count,
    script, set_mode, stat_pid, update_in_process, vmmd_copy, vmmd_with_missing_interpreter,
    wait_settled, CprctlUpdate, ALT_VERSION,
};
use cpr_tests::smaps::process_rss_excluding_guest_ram;
use cpr_tests::{
    Console, Counters, MigrationMode, RunState, TestDir, UpdateState, Verify, VmmdOptions,
    VmmdProcess,
};
use cprctl::update::{new_command_line, Load, UpdateArgs};

const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The phases vmmd reports for a cpr-exec update through the bridge, in order: the two pauses
/// (hand-off to the bridge; take-over), then what ran beside the guest.
const PHASES: [&str; 8] = [
    "handoff",
    "bridge-pause",
    "save-state",
    "load-state",
    "restore",
    "resume",
    "overlapped-exec",
    "overlapped-startup",
];
/// The phases of an update without the bridge (`--cpr-exec-bridge false`): one pause.
const CLASSIC_PHASES: [&str; 7] = [
    "pause",
    "save-state",
    "exec",
    "startup",
    "load-state",
    "restore",
    "resume",
];

/// A booted guest and what it said before anything was done to it.
struct Guest {
    dir: Arc<TestDir>,
    vmm: VmmdProcess,
    console: Console,
    /// VERIFY hash at boot.
    hash: String,
    /// The last COUNTERS answer and the heartbeat bytes received before it.
    counters: Counters,
    received: usize,
    /// Guest commands sent since READY (each gets exactly one answer line).
    commands: usize,
}

fn boot(vcpus: u32, memory: &str, file_backed: bool) -> Guest {
    boot_with(vcpus, memory, file_backed, &[])
}

fn boot_with(vcpus: u32, memory: &str, file_backed: bool, extra: &[&str]) -> Guest {
    let dir = TestDir::new("cpr-exec");
    let mut opts = VmmdOptions::new(vcpus, memory).in_dir(&dir);
    opts.extra_args
        .extend(extra.iter().map(|s| (*s).to_owned()));
    if file_backed {
        opts = opts.memory_path(dir.join("guest.ram"));
    }
    let (vmm, mut console, ready) = VmmdProcess::boot(opts);
    assert_eq!(ready.cpus, vcpus, "guest runs on {} vCPUs", ready.cpus);
    let hash = console.verify().expect_ok();
    let (counters, received) = console.counters_and_received();
    Guest {
        dir,
        vmm,
        console,
        hash,
        counters,
        received,
        commands: 2,
    }
}

impl Guest {
    fn generation(&self) -> u64 {
        info_now(&self.vmm.api_socket)
            .expect("Info")
            .update_generation
    }

    /// The guest runs, under the same pid, with its memory and counters carried on and the
    /// console connection intact (no heartbeat lost or duplicated, every line whole).
    fn assert_intact(&mut self, context: &str) {
        let info = wait_settled(&self.vmm.api_socket, SETTLE_TIMEOUT);
        assert_eq!(
            info.run_state,
            RunState::Running as i32,
            "{context}: the guest is not running: {info:?}"
        );
        assert_eq!(info.pid, self.vmm.pid(), "{context}: another process");
        assert_eq!(stat_pid(self.vmm.pid()), self.vmm.pid());
        self.vmm.reconnect();
        assert!(
            !self.console.is_closed(),
            "{context}: vmmd closed the console connection"
        );
        assert!(
            self.console
                .wait_for_heartbeats(Instant::now(), 20, Duration::from_secs(30)),
            "{context}: no heartbeats on the same console connection; {}",
            self.console.output_tail(300)
        );
        let (after, received) = self.console.counters_and_received();
        after.assert_continues(&self.counters);
        assert_eq!(
            (after.hb - self.counters.hb) as usize,
            received - self.received,
            "{context}: the guest counted {} heartbeats between two COUNTERS lines, the console \
             received {}: bytes lost or duplicated",
            after.hb - self.counters.hb,
            received - self.received
        );
        let verify = self.console.verify();
        assert_eq!(
            verify,
            Verify::Ok(self.hash.clone()),
            "{context}: guest memory is not what it was at boot"
        );
        self.commands += 2;
        self.counters = after;
        self.received = received;
        self.assert_lines_whole(context);
    }

    /// Every line after READY is the answer to a command, whole and parseable.
    fn assert_lines_whole(&self, context: &str) {
        let lines = self.console.lines();
        let ready = lines
            .iter()
            .position(|l| l.text.starts_with("READY"))
            .expect("READY line recorded");
        let answers: Vec<&str> = lines[ready + 1..].iter().map(|l| l.text.as_str()).collect();
        assert_eq!(
            answers.len(),
            self.commands,
            "{context}: expected one line per command, got {answers:?}"
        );
        for l in answers {
            let ok = Counters::parse(l).is_ok() || matches!(Verify::parse(l), Ok(Verify::Ok(_)));
            assert!(ok, "{context}: damaged or unexpected console line {l:?}");
        }
        assert_eq!(self.console.failures(), Vec::<String>::new(), "{context}");
    }

    /// `cprctl update` to `binary` must succeed and report the next generation.
    fn update_ok(&mut self, binary: &Path, extra: &[&str]) -> CprctlUpdate {
        let generation = self.generation();
        let r = cprctl_update(&self.vmm, binary, extra);
        assert_eq!(
            r.code(),
            Some(0),
            "cprctl update failed: {}\n{}",
            r.stderr,
            r.report
        );
        assert_eq!(r.outcome(), "updated", "{}", r.report);
        assert_eq!(r.report["pid"], self.vmm.pid(), "{}", r.report);
        assert_eq!(r.report["pid_after"], self.vmm.pid(), "{}", r.report);
        assert_eq!(r.report["generation_after"], generation + 1, "{}", r.report);
        assert_eq!(r.report["guest_running"], true, "{}", r.report);
        r
    }

    /// `cprctl update` must fail with exit status 1, `outcome`, a message containing `says`, and
    /// the guest running as before on the old generation.
    fn update_fails(&mut self, binary: &Path, extra: &[&str], outcome: &str, says: &str) {
        let generation = self.generation();
        let r = cprctl_update(&self.vmm, binary, extra);
        assert_eq!(
            r.code(),
            Some(1),
            "expected a failed update: {}\n{}",
            r.stderr,
            r.report
        );
        assert_eq!(r.outcome(), outcome, "{}", r.report);
        let error = r.report["error"].as_str().unwrap_or("");
        assert!(error.contains(says), "error {error:?} lacks {says:?}");
        assert!(
            r.stderr.contains("the guest is running"),
            "cprctl must say where the guest is: {}",
            r.stderr
        );
        assert_eq!(r.report["guest_running"], true, "{}", r.report);
        assert_eq!(r.report["generation_after"], generation, "{}", r.report);
        self.assert_intact(&format!("after the {outcome} update ({says})"));
        assert_eq!(self.generation(), generation);
    }
}

/// The names of the phases in a `cprctl update` report.
fn phase_names(report: &serde_json::Value) -> Vec<&str> {
    report["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect()
}

fn update_keeps_the_guest_running(vcpus: u32, file_backed: bool) {
    update_keeps_the_guest_running_with(vcpus, file_backed, &[], &PHASES);
}

fn update_keeps_the_guest_running_with(
    vcpus: u32,
    file_backed: bool,
    extra: &[&str],
    expected_phases: &[&str],
) {
    let mut g = boot_with(vcpus, "64M", file_backed, extra);
    let pid = g.vmm.pid();
    let new = vmmd_copy(g.dir.path(), "vmmd-new");
    let image_before = exe_identity(pid);

    let r = g.update_ok(&new, &[]);

    // Same pid, another process image: /proc/PID/exe is now the new file.
    assert_eq!(stat_pid(pid), pid);
    assert_ne!(
        exe_identity(pid),
        image_before,
        "the process image did not change"
    );
    assert_eq!(exe_path(pid), new.canonicalize().expect("canonical path"));
    let info = info_now(&g.vmm.api_socket).expect("Info");
    assert_eq!(info.update_generation, 1);
    assert!(
        info.update_status.starts_with("updated from vmmd"),
        "{info:?}"
    );
    assert_eq!(info.executable, exe_path(pid).display().to_string());
    // The report has vmmd's phases and pause.
    assert_eq!(phase_names(&r.report), expected_phases, "{}", r.report);
    assert!(
        r.report["vmmd_pause_micros"].as_u64() > Some(0),
        "{}",
        r.report
    );
    let query = g.vmm.api().query_migrate().expect("QueryMigrate");
    assert_eq!(query.mode, MigrationMode::CprExec as i32, "{query:?}");
    assert_eq!(query.ram_bytes, 0, "cpr-exec must not copy RAM: {query:?}");
    g.assert_intact("after the update");

    // And again, back to the original binary, the same way.
    let r = g.update_ok(&cpr_tests::bins::vmmd(), &[]);
    assert_eq!(phase_names(&r.report), expected_phases, "{}", r.report);
    assert_eq!(exe_identity(pid), image_before);
    g.assert_intact("after the second update");
}

#[test]
fn update_one_vcpu_memfd() {
    update_keeps_the_guest_running(1, false);
}

#[test]
fn update_two_vcpus_memfd() {
    update_keeps_the_guest_running(2, false);
}

#[test]
fn update_one_vcpu_file_backed() {
    update_keeps_the_guest_running(1, true);
}

#[test]
fn update_two_vcpus_file_backed() {
    update_keeps_the_guest_running(2, true);
}

#[test]
fn update_without_the_bridge() {
    // The guest stays paused from the save to the new process's load; the setting is carried
    // to the new process.
    update_keeps_the_guest_running_with(2, false, &["--cpr-exec-bridge", "false"], &CLASSIC_PHASES);
}

#[test]
fn a_paused_guest_is_updated_paused_and_runs_on_after_resume() {
    // The bridge moves parked vCPU loops and never resumes them; the new process loads the
    // paused runstate.
    let mut g = boot(2, "64M", false);
    let pid = g.vmm.pid();
    assert_eq!(g.vmm.api().pause().expect("Pause"), RunState::Paused);
    let generation = g.generation();
    let r = cprctl_update(&g.vmm, &cpr_tests::bins::vmmd(), &[]);
    assert_eq!(r.code(), Some(0), "{}\n{}", r.stderr, r.report);
    assert_eq!(r.report["pid_after"], pid, "{}", r.report);
    assert_eq!(r.report["run_state_after"], "paused", "{}", r.report);
    let info = info_now(&g.vmm.api_socket).expect("Info");
    assert_eq!(info.update_generation, generation + 1);
    assert_eq!(info.run_state, RunState::Paused as i32, "{info:?}");
    assert_eq!(g.vmm.api().resume().expect("Resume"), RunState::Running);
    g.assert_intact("after resuming the guest updated while paused");
}

#[test]
fn a_suspended_guest_is_updated_suspended_and_wakes_on_the_new_binary() {
    let mut g = boot(2, "64M", false);
    let before = g.console.counters();
    g.console.command(b's');
    g.vmm
        .api()
        .wait_for_run_state(RunState::Suspended, SETTLE_TIMEOUT);
    let generation = g.generation();
    let r = cprctl_update(&g.vmm, &cpr_tests::bins::vmmd(), &[]);
    assert_eq!(r.code(), Some(0), "{}\n{}", r.stderr, r.report);
    assert_eq!(r.report["run_state_after"], "suspended", "{}", r.report);
    let info = info_now(&g.vmm.api_socket).expect("Info");
    assert_eq!(info.update_generation, generation + 1);
    assert_eq!(info.run_state, RunState::Suspended as i32, "{info:?}");
    assert_eq!(
        g.vmm.api().wakeup().expect("SystemWakeup"),
        RunState::Running
    );
    g.console.wait_for_line("WAKE", SETTLE_TIMEOUT);
    assert!(
        g.console
            .wait_for_heartbeats(Instant::now(), 50, SETTLE_TIMEOUT),
        "no heartbeats after the wakeup: {}",
        g.console.output_tail(300)
    );
    let after = g.console.counters();
    after.assert_continues(&before);
    assert_eq!(
        after.suspends,
        before.suspends + 1,
        "{before:?} -> {after:?}"
    );
    assert_eq!(g.console.verify(), Verify::Ok(g.hash.clone()));
}

#[test]
fn update_with_deferred_load() {
    let mut g = boot(2, "64M", false);
    let r = g.update_ok(&cpr_tests::bins::vmmd(), &["--load", "deferred"]);
    let steps: Vec<&str> = r.report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["step"].as_str())
        .collect();
    assert_eq!(
        steps,
        [
            "preflight",
            "set-mode",
            "exec",
            "wait-new-process",
            "migrate-incoming",
            "verify"
        ]
    );
    g.assert_intact("after a deferred-load update");
}

#[test]
fn update_to_a_different_build_runs_the_new_code() {
    let alt = alt_version_vmmd();
    let mut g = boot(1, "64M", false);
    let before = info_now(&g.vmm.api_socket).expect("Info");
    assert_ne!(before.version, ALT_VERSION);
    let r = g.update_ok(&alt, &[]);
    assert_eq!(r.report["new_version"], ALT_VERSION, "{}", r.report);
    assert_eq!(r.report["old_version"], before.version.as_str());
    let info = info_now(&g.vmm.api_socket).expect("Info");
    assert_eq!(info.version, ALT_VERSION);
    assert_eq!(
        info.update_status,
        format!("updated from vmmd {}", before.version)
    );
    g.assert_intact("on the other build");
    // And back.
    g.update_ok(&cpr_tests::bins::vmmd(), &[]);
    let info = info_now(&g.vmm.api_socket).expect("Info");
    assert_eq!(info.version, before.version);
    assert_eq!(
        info.update_status,
        format!("updated from vmmd {ALT_VERSION}")
    );
    g.assert_intact("back on the first build");
}

#[test]
fn bad_new_binaries_are_refused_and_the_guest_runs_on() {
    let mut g = boot(1, "64M", false);
    let dir = g.dir.path().to_path_buf();

    g.update_fails(&dir.join("no-such-vmmd"), &[], "refused", "No such file");

    let plain = vmmd_copy(&dir, "vmmd-not-executable");
    set_mode(&plain, 0o644);
    g.update_fails(&plain, &[], "refused", "not an executable");

    let refuses = script(
        &dir,
        "vmmd-old-format",
        "case \"$1\" in --check-state-version) echo \"vmmd 9 cannot read state format version $2\"; exit 1;; \
         --version) echo vmmd 9.0.0;; esac",
    );
    g.update_fails(&refuses, &[], "refused", "cannot read state format version");

    // Answers cprctl's questions like a vmmd, but is a script: vmmd itself refuses it before pausing.
    let not_elf = script(
        &dir,
        "vmmd-script",
        "case \"$1\" in --check-state-version) echo ok;; --version) echo vmmd 0.1.0;; esac",
    );
    g.update_fails(&not_elf, &[], "refused", "not an ELF");

    // cprctl runs NEW for its checks, so a binary that cannot be exec'd is refused in preflight.
    let broken = vmmd_with_missing_interpreter(&dir);
    g.update_fails(&broken, &[], "refused", "cannot run");

    // After all that, an update still works.
    g.update_ok(&cpr_tests::bins::vmmd(), &[]);
    g.assert_intact("after a good update");
}

#[test]
fn unwritable_state_file_fails_before_the_exec_and_the_guest_runs_on() {
    // Without the bridge the state goes to the state file inside the pause.
    let mut g = boot_with(2, "64M", false, &["--cpr-exec-bridge", "false"]);
    let vmmd = cpr_tests::bins::vmmd();
    g.update_fails(&vmmd, &["--state", "/dev/full"], "failed", "/dev/full");
    let missing = g.dir.join("no-such-dir/vm.state");
    let missing = missing.display().to_string();
    g.update_fails(&vmmd, &["--state", &missing], "failed", "no-such-dir");
    // The failed updates put the migration mode back.
    let params = g
        .vmm
        .api()
        .migration_parameters()
        .expect("GetMigrationParameters");
    assert_eq!(params.mode, MigrationMode::Normal as i32, "{params:?}");
    g.update_ok(&vmmd, &[]);
    g.assert_intact("after a good update");
}

/// Sets cpr-exec mode with `extra` appended to a correct command line, and calls Migrate directly.
fn migrate_directly(g: &Guest, binary: &Path, extra: &[&str]) -> Result<(), tonic::Status> {
    let info = info_now(&g.vmm.api_socket).expect("Info");
    let state = g.dir.join("direct.state");
    let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    let argv = new_command_line(binary, &info, &state, Load::AtStart, 10, &[], &extra);
    g.vmm
        .api()
        .set_migration_parameters(MigrationMode::CprExec, argv)
        .expect("SetMigrationParameters");
    g.vmm
        .api()
        .migrate(&format!("file:{}", state.display()))
        .map(|_| ())
}

#[test]
fn the_bridge_needs_no_writable_state_file() {
    // The bridge hands the state over in a memfd: a state path that cannot take it does not
    // matter, one that cannot be created is still refused before anything starts.
    let mut g = boot(1, "64M", false);
    let vmmd = cpr_tests::bins::vmmd();
    g.update_ok(&vmmd, &["--state", "/dev/full"]);
    g.assert_intact("after an update with /dev/full as the state path");
    let missing = g.dir.join("no-such-dir/vm.state");
    let missing = missing.display().to_string();
    g.update_fails(&vmmd, &["--state", &missing], "failed", "no-such-dir");
    g.update_ok(&vmmd, &[]);
    g.assert_intact("after a good update");
}

#[test]
fn a_new_binary_that_dies_or_hangs_before_the_take_over_is_rolled_back_by_the_bridge() {
    // ELFs that vmmd's own checks let through (straight through the API, without cprctl's
    // preflight) and that never take the guest over: an exit, a SIGKILL, a crash before any
    // handler of ours exists, a hang (which the bridge kills after --cpr-takeover-timeout). Each
    // time the bridge runs the previous binary again (a new pid: the old one is gone), which takes
    // the guest over from the bridge; the guest never stops and keeps its console connection.
    let mut g = boot_with(1, "64M", true, &["--cpr-takeover-timeout", "2"]);
    // The rolled-back processes are not the test's children: kill them however the test ends.
    struct KillOnDrop(std::cell::RefCell<Vec<u32>>);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            for &pid in self.0.borrow().iter() {
                // SAFETY: kill(2) of a process this test started (through the bridge).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
    let rolled_back = KillOnDrop(Default::default());
    let generation = g.generation();
    let state = g.dir.join("direct.state");
    let deaths: [(&str, Vec<String>); 4] = [
        ("exit", vec!["/bin/true".into()]),
        (
            "SIGKILL",
            vec!["/bin/sh".into(), "-c".into(), "kill -KILL $$".into()],
        ),
        (
            "SIGSEGV",
            vec!["/bin/sh".into(), "-c".into(), "kill -SEGV $$".into()],
        ),
        (
            "hang",
            vec!["/bin/sh".into(), "-c".into(), "exec sleep 1000".into()],
        ),
    ];
    for (death, mut argv) in deaths {
        let before = info_now(&g.vmm.api_socket).expect("Info");
        // `sh -c CMD NAME ARGS...`: the incoming argument only has to be there.
        argv.extend([
            "sh".into(),
            "--incoming".into(),
            format!("file:{}", state.display()),
        ]);
        g.vmm
            .api()
            .set_migration_parameters(MigrationMode::CprExec, argv)
            .expect("SetMigrationParameters");
        let _ = g.vmm.api().migrate(&format!("file:{}", state.display()));
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let info = loop {
            match info_now(&g.vmm.api_socket) {
                Ok(i) if i.pid != before.pid && i.update_state() != UpdateState::InProgress => {
                    break i
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "{death}: no rolled-back vmmd answered"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        rolled_back.0.borrow_mut().push(info.pid);
        assert_eq!(
            info.update_state(),
            UpdateState::RolledBack,
            "{death}: {info:?}"
        );
        assert!(
            info.update_detail.contains("before taking the guest over"),
            "{death}: {info:?}"
        );
        // Gone, or a zombie (the first one is the test's child).
        let state = std::fs::read_to_string(format!("/proc/{}/stat", before.pid))
            .ok()
            .and_then(|s| s.rsplit(')').next().map(|r| r.trim().chars().next()))
            .flatten();
        assert!(
            matches!(state, None | Some('Z')),
            "{death}: the new process {} still runs ({state:?})",
            before.pid
        );
        assert_eq!(info.update_generation, generation, "{death}: {info:?}");
        assert_eq!(
            info.run_state,
            RunState::Running as i32,
            "{death}: {info:?}"
        );
        assert!(
            g.console
                .wait_for_heartbeats(Instant::now(), 50, Duration::from_secs(30)),
            "{death}: no heartbeats on the same console connection after the rollback: {}",
            g.console.output_tail(300)
        );
        assert_eq!(g.console.verify(), Verify::Ok(g.hash.clone()), "{death}");
        let now = g.console.counters();
        now.assert_continues(&g.counters);
        g.counters = now;
        assert_eq!(g.console.failures(), Vec::<String>::new(), "{death}");
    }
    // The rolled-back process updates like any other.
    let vmmd = cpr_tests::bins::vmmd();
    let report = update_in_process(&g.vmm.api_socket, &UpdateArgs::new(vmmd))
        .unwrap_or_else(|f| panic!("update after the rollbacks: {f}; {:?}", f.report));
    assert_eq!(report.pid_after, Some(report.pid), "{report:?}");
    assert_eq!(g.generation(), generation + 1);
    assert_eq!(g.console.verify(), Verify::Ok(g.hash.clone()));
    let _ = g.vmm.api().quit();
}

#[test]
fn exec_failure_resumes_the_guest_on_the_old_binary() {
    let mut g = boot(1, "64M", false);
    let broken = vmmd_with_missing_interpreter(g.dir.path());
    let generation = g.generation();
    let err = migrate_directly(&g, &broken, &[]).expect_err("execve must fail");
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert!(err.message().contains("execve"), "{err:?}");
    let info = wait_settled(&g.vmm.api_socket, SETTLE_TIMEOUT);
    assert_eq!(info.update_generation, generation);
    assert!(
        info.update_status.starts_with("cpr-exec failed"),
        "{info:?}"
    );
    assert_eq!(exe_path(g.vmm.pid()), cpr_tests::bins::vmmd());
    g.assert_intact("after execve failed");
    g.update_ok(&cpr_tests::bins::vmmd(), &[]);
    g.assert_intact("after a good update");
}

#[test]
fn new_binary_crashing_while_loading_rolls_back() {
    let mut g = boot(2, "64M", false);
    let vmmd = cpr_tests::bins::vmmd();
    let generation = g.generation();

    // Straight through the API.
    let _ = migrate_directly(&g, &vmmd, &["--fault-inject", "crash-during-load"]);
    let info = wait_settled(&g.vmm.api_socket, SETTLE_TIMEOUT);
    assert!(
        info.update_status.starts_with("rolled back to this binary"),
        "{info:?}"
    );
    assert_eq!(info.update_generation, generation);
    g.assert_intact("after the crash rollback (API)");

    // Through cprctl.
    g.update_fails(
        &vmmd,
        &["--new-arg=--fault-inject", "--new-arg=crash-during-load"],
        "rolled-back",
        "rolled back",
    );
    g.update_fails(
        &vmmd,
        &["--new-arg=--fault-inject", "--new-arg=fail-load"],
        "rolled-back",
        "rolled back",
    );
    g.update_fails(
        &vmmd,
        &[
            "--load",
            "deferred",
            "--new-arg=--fault-inject",
            "--new-arg=crash-during-load",
        ],
        "rolled-back",
        "rolled back",
    );
    g.update_ok(&vmmd, &[]);
    g.assert_intact("after a good update");
}

/// Kills cprctl at `point`; the guest must end up running on the old or the new binary.
fn die_at(g: &mut Guest, point: &str, extra: &[&str]) -> u64 {
    let generation = g.generation();
    let mut args = vec!["--die-at", point];
    args.extend_from_slice(extra);
    let r = cprctl_update(&g.vmm, &cpr_tests::bins::vmmd(), &args);
    assert_eq!(
        r.status.signal(),
        Some(libc::SIGKILL),
        "cprctl should have died at {point}: {:?} {}",
        r.status,
        r.stderr
    );
    let info = wait_settled(&g.vmm.api_socket, SETTLE_TIMEOUT);
    assert_eq!(
        info.run_state,
        RunState::Running as i32,
        "guest left {} after cprctl died at {point}: {info:?}",
        info.run_state
    );
    assert!(
        info.update_generation == generation || info.update_generation == generation + 1,
        "{info:?}"
    );
    g.assert_intact(&format!("after cprctl died at {point}"));
    info_now(&g.vmm.api_socket).expect("Info").update_generation - generation
}

#[test]
fn cprctl_killed_between_steps_never_leaves_the_guest_paused() {
    let mut g = boot(1, "64M", false);
    // With --load at-start, nothing after the exec depends on cprctl.
    assert_eq!(die_at(&mut g, "after-preflight", &[]), 0);
    assert_eq!(die_at(&mut g, "after-set-mode", &[]), 0);
    // Killed while Migrate is in flight: vmmd finishes the update on its own.
    die_at(&mut g, "during-exec", &[]);
    assert_eq!(die_at(&mut g, "after-exec", &[]), 1);
    assert_eq!(die_at(&mut g, "after-wait-new-process", &[]), 1);
    // With --load deferred, the new vmmd waits for migrate-incoming; if cprctl never sends it,
    // vmmd's deadline rolls back to the old binary.
    let deferred = ["--load", "deferred", "--incoming-deadline", "2"];
    assert_eq!(die_at(&mut g, "after-wait-new-process", &deferred), 0);
    let info = info_now(&g.vmm.api_socket).expect("Info");
    assert!(
        info.update_status.starts_with("rolled back to this binary"),
        "{info:?}"
    );
    die_at(&mut g, "during-exec", &deferred);
    assert_eq!(die_at(&mut g, "after-migrate-incoming", &deferred), 1);
    // A mode left set by a dead cprctl does not get in the way of the next update.
    g.update_ok(&cpr_tests::bins::vmmd(), &[]);
    g.assert_intact("after a good update");
}

#[test]
fn two_hundred_updates_leak_no_fds_or_memory() {
    const UPDATES: usize = 200;
    const FD_TOLERANCE: usize = 2;
    let mut g = boot(1, "64M", false);
    let pid = g.vmm.pid();
    let binaries = [
        vmmd_copy(g.dir.path(), "vmmd-a"),
        vmmd_copy(g.dir.path(), "vmmd-b"),
    ];
    let socket = g.vmm.api_socket.clone();
    // Warm up: the first update settles lazily allocated state.
    for b in &binaries {
        update_in_process(&socket, &UpdateArgs::new(b.clone())).expect("warm-up update");
    }
    g.assert_intact("after the warm-up");
    let fds_before = quiet_fd_count(pid);
    let fd_list_before = fd_targets(pid);
    let rss_before = process_rss_excluding_guest_ram(pid, None).expect("smaps");
    for i in 0..UPDATES {
        let binary = &binaries[i % 2];
        let report = update_in_process(&socket, &UpdateArgs::new(binary.clone()))
            .unwrap_or_else(|f| panic!("update {i} failed: {f}; report {:?}", f.report));
        assert_eq!(report.pid_after, Some(pid));
        assert_eq!(
            g.console.verify(),
            Verify::Ok(g.hash.clone()),
            "memory changed at update {i}"
        );
        g.commands += 1;
    }
    g.assert_intact("after 200 updates");
    assert_eq!(g.generation(), 2 + UPDATES as u64);
    let fds_after = quiet_fd_count(pid);
    // Tolerance: a process that starts while console input is in flight holds the console's two
    // sockets twice until the next exec (bounded, not growing); any per-update leak shows as
    // hundreds.
    assert!(
        fds_after <= fds_before + FD_TOLERANCE,
        "vmmd's fds grew from {fds_before} to {fds_after} over {UPDATES} updates:\nbefore {fd_list_before:#?}\nafter {:#?}",
        fd_targets(pid)
    );
    let rss_after = process_rss_excluding_guest_ram(pid, None).expect("smaps");
    assert!(
        rss_after <= rss_before + 8 * 1024 * 1024,
        "vmmd's memory (without guest RAM) grew from {} KiB to {} KiB over {UPDATES} updates",
        rss_before / 1024,
        rss_after / 1024
    );
}
