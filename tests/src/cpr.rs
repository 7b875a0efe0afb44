//! Live-update (cpr-exec) test equipment: running `cprctl update`, looking at the vmmd process
//! from outside (/proc), and making broken "new binaries" for failure injection.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use cprctl::update::{NoProgress, UpdateArgs, UpdateFailure, UpdateReport};
use serde_json::Value;
use vmmd_proto::v1::{InfoResponse, RunState, UpdateState};

use crate::{bins, Api, VmmdProcess};

/// The ELF interpreter of a dynamically linked x86-64 program.
const INTERPRETER: &[u8] = b"/lib64/ld-linux-x86-64.so.2";

/// What one `cprctl --json update` run printed.
#[derive(Debug)]
pub struct CprctlUpdate {
    /// cprctl's exit status.
    pub status: ExitStatus,
    /// The JSON report on stdout.
    pub report: Value,
    /// Progress and the error message.
    pub stderr: String,
}

impl CprctlUpdate {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// `report["outcome"]`.
    pub fn outcome(&self) -> &str {
        self.report["outcome"].as_str().unwrap_or("")
    }
}

/// Runs `cprctl --socket <vmm> --json update --binary NEW <extra...>`.
pub fn cprctl_update(vmm: &VmmdProcess, binary: &Path, extra: &[&str]) -> CprctlUpdate {
    let out = Command::new(bins::cprctl())
        .arg("--socket")
        .arg(&vmm.api_socket)
        .args(["--json", "update", "--binary"])
        .arg(binary)
        .args(extra)
        .output()
        .expect("cannot run cprctl");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    CprctlUpdate {
        status: out.status,
        report,
        stderr,
    }
}

/// Runs the `cprctl update` workflow in-process (no progress output).
pub fn update_in_process(
    socket: &Path,
    args: &UpdateArgs,
) -> Result<UpdateReport, Box<UpdateFailure>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime");
    rt.block_on(cprctl::update::run(socket, args, &mut NoProgress))
        .map_err(Box::new)
}

/// Info from whatever process serves `socket` now, on a fresh connection.
pub fn info_now(socket: &Path) -> Result<InfoResponse, String> {
    let api = Api::connect(socket).map_err(|e| e.to_string())?;
    api.info().map_err(|e| e.to_string())
}

/// Polls Info until vmmd is settled (not loading, not mid-update) and returns it; panics after
/// `timeout` with the last answer.
pub fn wait_settled(socket: &Path, timeout: Duration) -> InfoResponse {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        match info_now(socket) {
            Ok(info)
                if info.run_state != RunState::Inmigrate as i32
                    && info.update_state() != UpdateState::InProgress =>
            {
                return info;
            }
            Ok(info) => last = format!("{info:?}"),
            Err(e) => last = e,
        }
        assert!(
            Instant::now() < deadline,
            "vmmd did not settle within {timeout:?}; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The executable a process runs, as (device, inode) of `/proc/PID/exe`.
pub fn exe_identity(pid: u32) -> (u64, u64) {
    let m = std::fs::metadata(format!("/proc/{pid}/exe"))
        .unwrap_or_else(|e| panic!("cannot stat /proc/{pid}/exe: {e}"));
    (m.dev(), m.ino())
}

/// The path `/proc/PID/exe` points at.
pub fn exe_path(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/exe: {e}"))
}

/// The pid as `/proc/PID/stat` gives it (panics if the process is gone).
pub fn stat_pid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/stat: {e}"));
    stat.split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad /proc/{pid}/stat: {stat}"))
}

/// Open fds of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"))
        .count()
}

/// Open fds of `pid` once transient ones (API connections being closed) are gone: the smallest
/// count over two seconds.
pub fn quiet_fd_count(pid: u32) -> usize {
    // Up to 2 s: on a loaded machine the last update's bridge processes (whose pidfds the new
    // process holds until they have exited) can take a while to tear the old address space down.
    (0..40)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
            fd_count(pid)
        })
        .min()
        .unwrap_or(0)
}

/// The fds of `pid` and what they point at, for diagnostics.
pub fn fd_targets(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| {
                    let target = std::fs::read_link(e.path())
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    format!("{} -> {target}", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A copy of the built vmmd at `dir/name` (a distinct file: a new process image for /proc/PID/exe).
pub fn vmmd_copy(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(bins::vmmd(), &path)
        .unwrap_or_else(|e| panic!("cannot copy vmmd to {}: {e}", path.display()));
    set_mode(&path, 0o755);
    path
}

/// Sets the permission bits of `path`.
pub fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
}

/// An executable shell script at `dir/name`.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    set_mode(&path, 0o755);
    path
}

/// An ELF executable whose interpreter path names a file that does not exist: it passes every check
/// vmmd makes before the exec (exists, executable, ELF), and `execve` fails with ENOENT. vmmd itself
/// is linked statically (no interpreter), so this is a patched copy of the system's dynamically
/// linked `/bin/true`.
pub fn vmmd_with_missing_interpreter(dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read("/bin/true").expect("cannot read /bin/true");
    let at = bytes
        .windows(INTERPRETER.len())
        .position(|w| w == INTERPRETER)
        .expect("/bin/true has no /lib64/ld-linux-x86-64.so.2 interpreter");
    let missing = b"/nonexistent/ld-linux-x86.so";
    let mut replacement = missing[..INTERPRETER.len().min(missing.len())].to_vec();
    replacement.resize(INTERPRETER.len(), b'x');
    bytes[at..at + INTERPRETER.len()].copy_from_slice(&replacement);
    let path = dir.join("vmmd-bad-interp");
    std::fs::write(&path, bytes).expect("cannot write the patched vmmd");
    set_mode(&path, 0o755);
    path
}

/// Version string of the alternative vmmd build.
pub const ALT_VERSION: &str = "0.1.0+alt";

/// vmmd built with `VMMD_BUILD_VERSION=0.1.0+alt` (a different build that reports another version).
///
/// `CPR_ALT_VMMD` names a prebuilt one; otherwise it is built with cargo into `<target>/alt-version`
/// (the first time takes a while; later runs reuse it).
pub fn alt_version_vmmd() -> PathBuf {
    if let Some(p) = std::env::var_os("CPR_ALT_VMMD") {
        return PathBuf::from(p);
    }
    let bin_dir = bins::bin_dir();
    let profile = bin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "debug".into());
    let target = bin_dir
        .parent()
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
        .join("alt-version");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "vmmd", "--target-dir"])
        .arg(&target)
        .env("VMMD_BUILD_VERSION", ALT_VERSION)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile == "release" {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the alternative vmmd: {e}"));
    assert!(
        out.status.success(),
        "building vmmd with VMMD_BUILD_VERSION={ALT_VERSION} failed (set CPR_ALT_VMMD to a \
         prebuilt one):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = if profile == "release" {
        "release"
    } else {
        "debug"
    };
    // With `build.target` set (.cargo/config.toml) cargo puts the binary under the target triple.
    let triple = bin_dir
        .parent()
        .and_then(Path::file_name)
        .filter(|n| *n != "target")
        .map(PathBuf::from)
        .unwrap_or_default();
    target.join(triple).join(dir).join("vmmd")
}
