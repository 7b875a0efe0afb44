//! cpr-reboot test equipment: guest RAM files on /dev/shm, running `cprctl reboot-prep` and
//! `reboot-resume`, and starting the vmmd that comes up "after the reboot".

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::{bins, VmmdOptions, VmmdProcess};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A guest RAM file path on /dev/shm unique to this test, removed (with `.saved`) on drop.
#[derive(Debug)]
pub struct ShmRam {
    path: PathBuf,
}

impl ShmRam {
    /// `/dev/shm/cpr-test-<label>-<pid>-<n>.ram` (not created: vmmd creates it).
    pub fn new(label: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/dev/shm/cpr-test-{label}-{}-{n}.ram",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        Self { path }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<path>.saved`, where tests park the real file while injecting a failure.
    pub fn saved(&self) -> PathBuf {
        let mut s = self.path.as_os_str().to_os_string();
        s.push(".saved");
        PathBuf::from(s)
    }

    /// `(device, inode, size)` of the file; panics when it is missing.
    pub fn identity(&self) -> (u64, u64, u64) {
        let m = std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("RAM file {}: {e}", self.path.display()));
        (m.dev(), m.ino(), m.len())
    }
}

impl Drop for ShmRam {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.saved());
    }
}

/// What one `cprctl --json reboot-*` run printed.
#[derive(Debug)]
pub struct CprctlRun {
    /// cprctl's exit status.
    pub status: ExitStatus,
    /// The JSON report on stdout.
    pub report: Value,
    /// Progress lines and the error message.
    pub stderr: String,
}

impl CprctlRun {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// `report["outcome"]`.
    pub fn outcome(&self) -> &str {
        self.report["outcome"].as_str().unwrap_or("")
    }

    /// `report["error"]`.
    pub fn error(&self) -> &str {
        self.report["error"].as_str().unwrap_or("")
    }

    /// Panics with the report and stderr unless cprctl succeeded.
    pub fn expect_ok(&self, what: &str) {
        assert!(
            self.status.success() && self.report["ok"] == Value::Bool(true),
            "{what} failed ({}): report {}\nstderr:\n{}",
            self.status,
            self.report,
            self.stderr
        );
    }
}

/// Runs `cprctl --json <args...>` and parses its report.
pub fn cprctl_json<I, S>(args: I) -> CprctlRun
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let out = Command::new(bins::cprctl())
        .arg("--json")
        .args(&args)
        .output()
        .expect("cannot run cprctl");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    eprintln!(
        "cprctl {:?} -> {}\n{}",
        args,
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    CprctlRun {
        status: out.status,
        report,
        stderr,
    }
}

/// `cprctl --socket S reboot-prep --state STATE [extra...]`.
pub fn reboot_prep(socket: &Path, state: &Path, extra: &[&str]) -> CprctlRun {
    let mut args: Vec<OsString> = vec![
        "--socket".into(),
        socket.into(),
        "reboot-prep".into(),
        "--state".into(),
        state.into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    cprctl_json(args)
}

/// `cprctl --socket S reboot-resume --state STATE`.
pub fn reboot_resume(socket: &Path, state: &Path) -> CprctlRun {
    cprctl_json([
        OsString::from("--socket"),
        socket.into(),
        "reboot-resume".into(),
        "--state".into(),
        state.into(),
    ])
}

/// Waits for a vmmd that reboot-prep told to quit to exit, and SIGKILLs it if it did not (the
/// host reboot does the same).
pub fn simulate_host_reboot(mut vmm: VmmdProcess) {
    let _ = vmm.wait_exit(Duration::from_secs(30));
    drop(vmm);
}

/// The options of the vmmd that starts "after the reboot": same VM, `--incoming defer`.
pub fn after_reboot(before: &VmmdOptions) -> VmmdOptions {
    let mut opts = before.clone();
    opts.incoming = Some("defer".to_owned());
    opts.dir = None;
    opts
}

/// Runs vmmd with `opts` expecting it to refuse to start; its exit status and output.
pub fn vmmd_refuses_to_start(opts: &VmmdOptions, api_socket: &Path) -> (ExitStatus, String) {
    let mut memory = format!("size={}", opts.memory);
    if let Some(path) = &opts.memory_path {
        memory.push_str(&format!(",path={}", path.display()));
    }
    let mut cmd = Command::new(bins::vmmd());
    cmd.arg("--api-socket")
        .arg(api_socket)
        .arg("--kernel")
        .arg(bins::testguest())
        .arg("--vcpus")
        .arg(opts.vcpus.to_string())
        .arg("--memory")
        .arg(memory)
        .env("NO_COLOR", "1");
    if let Some(incoming) = &opts.incoming {
        cmd.arg("--incoming").arg(incoming);
    }
    let log = api_socket.with_extension("refused.log");
    let file = std::fs::File::create(&log).expect("cannot create the vmmd log");
    let file_err = file.try_clone().expect("cannot clone the vmmd log");
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(file)
        .stderr(file_err)
        .spawn()
        .expect("cannot run vmmd");
    let deadline = std::time::Instant::now() + crate::vmmd::START_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("cannot poll vmmd") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "vmmd did not refuse to start within {:?}; log:\n{}",
                crate::vmmd::START_TIMEOUT,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    (status, text)
}
