//! Normal-mode save to a file, quit, restore into a fresh vmmd: the guest carries on intact.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpr_tests::{MigrationStatus, RunState, TestDir, VmmdOptions, VmmdProcess};

const MEMORY: &str = "128M";
const MEMORY_BYTES: u64 = 128 << 20;

/// How the restored vmmd is told about the state file.
#[derive(Clone, Copy)]
enum Restore {
    /// `--incoming defer`, then MigrateIncoming.
    Deferred,
    /// `--incoming file:PATH` at start.
    AtStart,
}

fn save_quit_restore(vcpus: u32, file_backed: bool, restore: Restore) {
    let dir: Arc<TestDir> = TestDir::new("save-restore");
    let mut opts = VmmdOptions::new(vcpus, MEMORY).in_dir(&dir);
    if file_backed {
        opts = opts.memory_path(dir.join("ram"));
    }
    let state = dir.join("vm.state");
    let uri = format!("file:{}", state.display());

    // The source: boot, record what the guest says, save.
    let (mut src, mut console, ready) = VmmdProcess::boot(opts.clone());
    assert_eq!(ready.cpus, vcpus);
    let hash = console.verify().expect_ok();
    let before = console.counters();

    let info = src.api().migrate(&uri).expect("Migrate to a file");
    assert_eq!(info.status, MigrationStatus::Completed as i32, "{info:?}");
    assert!(!info.incoming);
    assert!(info.ram_bytes >= MEMORY_BYTES, "RAM not saved: {info:?}");
    assert!(info.state_bytes > 0, "{info:?}");
    let file_len = std::fs::metadata(&state).expect("state file exists").len();
    assert!(
        file_len >= MEMORY_BYTES,
        "state file is only {file_len} bytes"
    );
    assert_eq!(src.api().run_state(), RunState::Postmigrate);
    let query = src.api().query_migrate().expect("QueryMigrate");
    assert_eq!(query.status, MigrationStatus::Completed as i32, "{query:?}");

    // Saved and stopped: the guest is silent.
    std::thread::sleep(Duration::from_millis(200));
    let quiet_from = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        console.heartbeats_since(quiet_from),
        0,
        "heartbeats after the save"
    );
    assert_eq!(console.failures(), Vec::<String>::new());

    src.quit();
    assert!(
        console.wait_closed(Duration::from_secs(10)),
        "console still open after vmmd quit"
    );
    drop(console);

    // The destination: same configuration and console path.
    let dst_opts = match restore {
        Restore::Deferred => opts.incoming("defer"),
        Restore::AtStart => opts.incoming(&uri),
    };
    let dst = VmmdProcess::spawn(dst_opts);
    assert_ne!(dst.pid(), src.pid());
    let mut console = dst.console();
    match restore {
        Restore::Deferred => {
            assert_eq!(dst.api().run_state(), RunState::Inmigrate);
            let info = dst.api().migrate_incoming(&uri).expect("MigrateIncoming");
            assert_eq!(info.status, MigrationStatus::Completed as i32, "{info:?}");
            assert!(info.incoming, "{info:?}");
            assert!(info.ram_bytes >= MEMORY_BYTES, "RAM not loaded: {info:?}");
        }
        Restore::AtStart => {
            dst.api()
                .wait_for_run_state(RunState::Running, Duration::from_secs(60));
        }
    }
    assert_eq!(dst.api().run_state(), RunState::Running);
    assert!(
        console.wait_for_heartbeats(Instant::now(), 50, Duration::from_secs(30)),
        "no heartbeats after the restore; console: {}",
        console.output_tail(300)
    );
    let after = console.counters();
    after.assert_continues(&before);
    assert_eq!(after.seed, ready.seed);
    assert_eq!(
        console.verify().expect_ok(),
        hash,
        "memory hash changed across save/restore"
    );
    assert_eq!(console.failures(), Vec::<String>::new());
    // The restored guest keeps working: its counters still advance.
    let later = console.counters();
    assert!(later.hb > after.hb, "{after:?} -> {later:?}");
    assert_eq!(console.failures(), Vec::<String>::new());
}

#[test]
fn save_restore_one_vcpu_memfd() {
    save_quit_restore(1, false, Restore::Deferred);
}

#[test]
fn save_restore_two_vcpus_memfd() {
    save_quit_restore(2, false, Restore::Deferred);
}

#[test]
fn save_restore_one_vcpu_file_backed() {
    save_quit_restore(1, true, Restore::Deferred);
}

#[test]
fn save_restore_two_vcpus_file_backed() {
    save_quit_restore(2, true, Restore::Deferred);
}

#[test]
fn save_restore_with_incoming_file_at_start() {
    save_quit_restore(2, false, Restore::AtStart);
}

#[test]
fn saved_vm_resumes_in_place() {
    // After a save the source may also just carry on (postmigrate -> resume).
    let dir = TestDir::new("save-resume");
    let (src, mut console, _) = VmmdProcess::boot(VmmdOptions::new(1, "64M").in_dir(&dir));
    let hash = console.verify().expect_ok();
    let before = console.counters();
    let state: PathBuf = dir.join("vm.state");
    src.api()
        .migrate(&format!("file:{}", state.display()))
        .expect("Migrate");
    assert_eq!(src.api().run_state(), RunState::Postmigrate);
    assert_eq!(src.api().resume().expect("Resume"), RunState::Running);
    assert!(console.wait_for_heartbeats(Instant::now(), 50, Duration::from_secs(30)));
    console.counters().assert_continues(&before);
    assert_eq!(console.verify().expect_ok(), hash);
}
