//! Starting and stopping vmmd on the test guest.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{bins, Api, Console, Ready, TestDir};

/// How long vmmd may take until its API answers (this machine is slow and shared).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest may take from start to READY (it fills all its RAM first).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a console connection attempt retries.
pub const CONSOLE_TIMEOUT: Duration = Duration::from_secs(30);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// How often a starting vmmd's API is polled by default.
const API_POLL: Duration = Duration::from_millis(10);

/// How to start vmmd.
#[derive(Debug, Clone)]
pub struct VmmdOptions {
    /// `--vcpus`.
    pub vcpus: u32,
    /// `--memory size=`, e.g. `64M`.
    pub memory: String,
    /// `--memory ...,path=`: back guest RAM by this file instead of a memfd.
    pub memory_path: Option<PathBuf>,
    /// `--incoming`: `defer` or `file:PATH`.
    pub incoming: Option<String>,
    /// The console socket; defaults to `console.sock` in the directory.
    pub console: Option<PathBuf>,
    /// `--api-socket`; defaults to `api-<n>.sock` in the directory.
    pub api_socket: Option<PathBuf>,
    /// Where sockets and logs go; a fresh [`TestDir`] when unset.
    pub dir: Option<Arc<TestDir>>,
    /// More arguments, appended as is.
    pub extra_args: Vec<String>,
}

impl Default for VmmdOptions {
    fn default() -> Self {
        Self {
            vcpus: 1,
            memory: "64M".to_owned(),
            memory_path: None,
            incoming: None,
            console: None,
            api_socket: None,
            dir: None,
            extra_args: Vec::new(),
        }
    }
}

impl VmmdOptions {
    /// `vcpus` vCPUs and `memory` of RAM.
    pub fn new(vcpus: u32, memory: &str) -> Self {
        Self {
            vcpus,
            memory: memory.to_owned(),
            ..Self::default()
        }
    }

    /// Put sockets and logs in `dir`.
    pub fn in_dir(mut self, dir: &Arc<TestDir>) -> Self {
        self.dir = Some(Arc::clone(dir));
        self
    }

    /// Start with `--incoming <incoming>`.
    pub fn incoming(mut self, incoming: &str) -> Self {
        self.incoming = Some(incoming.to_owned());
        self
    }

    /// Back RAM by the file `path`.
    pub fn memory_path(mut self, path: PathBuf) -> Self {
        self.memory_path = Some(path);
        self
    }

    /// Serve the console on `path`.
    pub fn console(mut self, path: PathBuf) -> Self {
        self.console = Some(path);
        self
    }

    /// Serve the API on `path`.
    pub fn api_socket(mut self, path: PathBuf) -> Self {
        self.api_socket = Some(path);
        self
    }
}

/// A running vmmd, killed on drop; its log is printed when the test fails.
pub struct VmmdProcess {
    child: Child,
    exited: Option<ExitStatus>,
    /// The directory holding its sockets and log.
    pub dir: Arc<TestDir>,
    /// `--api-socket`.
    pub api_socket: PathBuf,
    /// `--serial socket=`.
    pub console_socket: PathBuf,
    /// vmmd's stdout and stderr.
    pub log_path: PathBuf,
    /// The options it was started with.
    pub opts: VmmdOptions,
    /// When the process was spawned.
    pub spawned_at: Instant,
    /// When its API first answered Info.
    pub api_ready_at: Instant,
    api: Api,
}

impl std::fmt::Debug for VmmdProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmdProcess")
            .field("pid", &self.child.id())
            .field("api_socket", &self.api_socket)
            .field("log_path", &self.log_path)
            .finish()
    }
}

impl VmmdProcess {
    /// Starts vmmd and waits until its API answers Info; panics (with the log) if it does not.
    pub fn spawn(opts: VmmdOptions) -> Self {
        Self::start(opts, false, API_POLL).0
    }

    /// Like [`VmmdProcess::spawn`], but connects the console from the moment vmmd starts, so
    /// that the first guest output is timestamped when it is produced rather than on a late connect.
    pub fn spawn_with_console(opts: VmmdOptions) -> (Self, Console) {
        Self::spawn_with_console_polling(opts, API_POLL)
    }

    /// Like [`VmmdProcess::spawn_with_console`], polling for the API every `api_poll` (the
    /// benchmark times vmmd's start-up: it polls every millisecond, not every 10).
    pub fn spawn_with_console_polling(opts: VmmdOptions, api_poll: Duration) -> (Self, Console) {
        let (vmm, console) = Self::start(opts, true, api_poll);
        let console = console.unwrap_or_else(|| vmm.console());
        (vmm, console)
    }

    fn start(
        opts: VmmdOptions,
        early_console: bool,
        api_poll: Duration,
    ) -> (Self, Option<Console>) {
        let dir = opts.dir.clone().unwrap_or_else(|| TestDir::new("vmmd"));
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let api_socket = opts
            .api_socket
            .clone()
            .unwrap_or_else(|| dir.join(&format!("api-{n}.sock")));
        let console_socket = opts
            .console
            .clone()
            .unwrap_or_else(|| dir.join("console.sock"));
        let log_path = dir.join(&format!("vmmd-{n}.log"));
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone {}: {e}", log_path.display()));

        let mut memory = format!("size={}", opts.memory);
        if let Some(path) = &opts.memory_path {
            memory.push_str(&format!(",path={}", path.display()));
        }
        let mut cmd = Command::new(bins::vmmd());
        cmd.arg("--api-socket")
            .arg(&api_socket)
            .arg("--kernel")
            .arg(bins::testguest())
            .arg("--vcpus")
            .arg(opts.vcpus.to_string())
            .arg("--memory")
            .arg(memory)
            .arg("--serial")
            .arg(format!("socket={}", console_socket.display()));
        if let Some(incoming) = &opts.incoming {
            cmd.arg("--incoming").arg(incoming);
        }
        cmd.args(&opts.extra_args)
            // Plain log text in the log file.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
        // is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                // vmmd must not outlive a test that aborts instead of unwinding.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned_at = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bins::vmmd().display()));
        let early = early_console.then(|| {
            let path = console_socket.clone();
            std::thread::spawn(move || {
                Console::connect_polling(&path, START_TIMEOUT, Duration::from_millis(1))
            })
        });

        let deadline = spawned_at + START_TIMEOUT;
        let api = loop {
            if let Some(status) = child.try_wait().expect("cannot poll vmmd") {
                panic!(
                    "vmmd exited with {status} before its API answered; log {}:\n{}",
                    log_path.display(),
                    read_log(&log_path)
                );
            }
            if api_socket.exists() {
                if let Ok(api) = Api::connect(&api_socket) {
                    if api.info().is_ok() {
                        break api;
                    }
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "vmmd's API did not answer within {START_TIMEOUT:?}; log {}:\n{}",
                    log_path.display(),
                    read_log(&log_path)
                );
            }
            std::thread::sleep(api_poll);
        };
        let api_ready_at = Instant::now();
        let console = early.map(|t| t.join().expect("console connect thread panicked"));
        let vmm = Self {
            child,
            exited: None,
            dir,
            api_socket,
            console_socket,
            log_path,
            opts,
            spawned_at,
            api_ready_at,
            api,
        };
        (vmm, console)
    }

    /// Starts vmmd, attaches the console and waits for the guest's READY line and heartbeats.
    pub fn boot(opts: VmmdOptions) -> (Self, Console, Ready) {
        let vmm = Self::spawn(opts);
        let mut console = vmm.console();
        let line = console.wait_for_line("READY", READY_TIMEOUT);
        let ready = Ready::parse(&line).unwrap_or_else(|e| panic!("bad READY line {line:?}: {e}"));
        let since = Instant::now() - Duration::from_secs(3600);
        assert!(
            console.wait_for_heartbeats(since, 10, Duration::from_secs(30)),
            "no heartbeats after READY; console: {}",
            console.output_tail(400)
        );
        (vmm, console, ready)
    }

    /// The API client.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// A fresh API connection (after a live update the old one is gone); panics if vmmd does not
    /// answer Info within [`START_TIMEOUT`].
    pub fn reconnect(&mut self) -> &Api {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match Api::connect(&self.api_socket) {
                Ok(api) if api.info().is_ok() => {
                    self.api = api;
                    return &self.api;
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "vmmd's API did not answer within {START_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// vmmd's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connects a console client.
    pub fn console(&self) -> Console {
        Console::connect(&self.console_socket, CONSOLE_TIMEOUT)
    }

    /// vmmd's log so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Waits up to `timeout` for vmmd to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited {
                return Some(status);
            }
            if let Some(status) = self.child.try_wait().expect("cannot poll vmmd") {
                self.exited = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sends Quit and waits for vmmd to exit; panics unless it exits successfully.
    pub fn quit(&mut self) {
        // vmmd may be gone before the answer reaches us; the exit status is what counts.
        let answer = self.api.quit();
        match self.wait_exit(Duration::from_secs(30)) {
            Some(status) => assert!(
                status.success(),
                "vmmd exited with {status} after Quit ({answer:?}); log:\n{}",
                self.log()
            ),
            None => panic!(
                "vmmd did not exit within 30 s of Quit ({answer:?}); log:\n{}",
                self.log()
            ),
        }
    }
}

impl Drop for VmmdProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- vmmd log {} ----\n{}\n---- end of vmmd log ----",
                self.log_path.display(),
                tail(&read_log(&self.log_path), 200)
            );
        }
    }
}

fn read_log(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

fn tail(text: &str, lines: usize) -> &str {
    let mut idx = text.len();
    for _ in 0..lines {
        match text[..idx].rfind('\n') {
            Some(i) => idx = i,
            None => return text,
        }
    }
    &text[idx + 1..]
}
