//! Bad requests and bad state files get a clear gRPC error and leave the VM unharmed.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpr_tests::{MigrationStatus, RunState, TestDir, VmmdOptions, VmmdProcess};
use tonic::Code;

const MEMORY: &str = "64M";

/// Panics unless `status` has `code` and its message mentions every word in `words`.
fn assert_error(status: &tonic::Status, codes: &[Code], words: &[&str]) {
    assert!(
        codes.contains(&status.code()),
        "expected one of {codes:?}, got {:?}: {}",
        status.code(),
        status.message()
    );
    let msg = status.message().to_lowercase();
    for w in words {
        assert!(
            msg.contains(&w.to_lowercase()),
            "error message does not mention {w:?}: {}",
            status.message()
        );
    }
}

/// A running guest is still running, beating and intact.
fn assert_unharmed(vmm: &VmmdProcess, console: &mut cpr_tests::Console) {
    assert_eq!(vmm.api().run_state(), RunState::Running);
    assert!(
        console.wait_for_heartbeats(Instant::now(), 20, Duration::from_secs(30)),
        "no heartbeats after the refused request"
    );
    console.verify().expect_ok();
    assert_eq!(console.failures(), Vec::<String>::new());
}

/// Boots a guest, saves it to `vm.state` in `dir` and quits; returns the file and the memory hash.
fn saved_guest(dir: &Arc<TestDir>) -> (PathBuf, String) {
    let state = dir.join("vm.state");
    let (mut src, mut console, _) = VmmdProcess::boot(VmmdOptions::new(1, MEMORY).in_dir(dir));
    let hash = console.verify().expect_ok();
    let info = src
        .api()
        .migrate(&format!("file:{}", state.display()))
        .expect("Migrate to a file");
    assert_eq!(info.status, MigrationStatus::Completed as i32, "{info:?}");
    src.quit();
    (state, hash)
}

/// Starts a `--incoming defer` vmmd, feeds it `bad`, checks the refusal, then loads `good`.
fn refuse_then_load(
    dir: &Arc<TestDir>,
    bad: &Path,
    good: &Path,
    hash: &str,
    codes: &[Code],
    words: &[&str],
) {
    let dst = VmmdProcess::spawn(VmmdOptions::new(1, MEMORY).in_dir(dir).incoming("defer"));
    let mut console = dst.console();
    let err = dst
        .api()
        .migrate_incoming(&format!("file:{}", bad.display()))
        .expect_err("MigrateIncoming of a bad state file must fail");
    assert_error(&err, codes, words);
    // Nothing was touched: still waiting for a migration, and a good file loads fine.
    assert_eq!(dst.api().run_state(), RunState::Inmigrate);
    let info = dst
        .api()
        .migrate_incoming(&format!("file:{}", good.display()))
        .expect("MigrateIncoming of the good file after a refused one");
    assert_eq!(info.status, MigrationStatus::Completed as i32, "{info:?}");
    assert_eq!(dst.api().run_state(), RunState::Running);
    assert!(console.wait_for_heartbeats(Instant::now(), 20, Duration::from_secs(30)));
    assert_eq!(console.verify().expect_ok(), hash);
    assert_eq!(console.failures(), Vec::<String>::new());
}

#[test]
fn unknown_uri_scheme_is_invalid_argument() {
    let (vmm, mut console, _) = VmmdProcess::boot(VmmdOptions::new(1, MEMORY));
    let err = vmm
        .api()
        .migrate("tcp:127.0.0.1:4444")
        .expect_err("Migrate to tcp: must fail");
    assert_error(&err, &[Code::InvalidArgument], &["tcp"]);
    assert_unharmed(&vmm, &mut console);
}

#[test]
fn migrate_incoming_on_a_running_vm_is_refused() {
    let dir = TestDir::new("incoming-running");
    let (vmm, mut console, _) = VmmdProcess::boot(VmmdOptions::new(1, MEMORY).in_dir(&dir));
    let state = dir.join("vm.state");
    std::fs::write(&state, b"whatever").expect("write a file");
    let err = vmm
        .api()
        .migrate_incoming(&format!("file:{}", state.display()))
        .expect_err("MigrateIncoming on a running VM must fail");
    assert_error(&err, &[Code::FailedPrecondition], &["running"]);
    assert_unharmed(&vmm, &mut console);
}

#[test]
fn migrate_incoming_from_a_missing_file_is_not_found() {
    let dir = TestDir::new("incoming-missing");
    let (good, hash) = saved_guest(&dir);
    let missing = dir.join("no-such.state");
    refuse_then_load(
        &dir,
        &missing,
        &good,
        &hash,
        &[Code::NotFound],
        &["no-such.state"],
    );
}

#[test]
fn truncated_state_file_is_refused() {
    let dir = TestDir::new("incoming-truncated");
    let (good, hash) = saved_guest(&dir);
    let bytes = std::fs::read(&good).expect("read state file");
    let bad = dir.join("truncated.state");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).expect("write truncated copy");
    refuse_then_load(&dir, &bad, &good, &hash, &[Code::DataLoss], &["truncated"]);
}

#[test]
fn corrupt_state_file_is_refused() {
    let dir = TestDir::new("incoming-corrupt");
    let (good, hash) = saved_guest(&dir);
    let mut bytes = std::fs::read(&good).expect("read state file");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let bad = dir.join("corrupt.state");
    std::fs::write(&bad, &bytes).expect("write corrupt copy");
    refuse_then_load(&dir, &bad, &good, &hash, &[Code::DataLoss], &["corrupt"]);
}

#[test]
fn newer_version_state_file_is_refused() {
    let dir = TestDir::new("incoming-newer");
    let (good, hash) = saved_guest(&dir);
    let mut bytes = std::fs::read(&good).expect("read state file");
    // The format version is a little-endian u32 right after the 8-byte magic.
    bytes[8..12].copy_from_slice(&999u32.to_le_bytes());
    let bad = dir.join("newer.state");
    std::fs::write(&bad, &bytes).expect("write newer-version copy");
    refuse_then_load(
        &dir,
        &bad,
        &good,
        &hash,
        &[Code::FailedPrecondition, Code::InvalidArgument],
        &["newer", "999"],
    );
}

#[test]
fn second_console_client_is_told_busy() {
    let (vmm, mut console, _) = VmmdProcess::boot(VmmdOptions::new(1, MEMORY));
    let mut second = UnixStream::connect(&vmm.console_socket).expect("connect a second client");
    second
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set read timeout");
    let mut got = Vec::new();
    second
        .read_to_end(&mut got)
        .expect("vmmd closes the second client after telling it");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("vmmd: console busy"),
        "second client got {text:?}"
    );
    // The first client is still attached and the guest unharmed.
    assert_unharmed(&vmm, &mut console);
}
