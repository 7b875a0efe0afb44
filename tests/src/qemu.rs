//! QEMU as the peer `cpr-bench` measures vmmd against: the test guest under QEMU/KVM, live-updated
//! with QEMU's own `cpr-transfer` (QEMU ≥ 10.0).
//!
//! Each QEMU is started with guest RAM in a shared memfd (`memory-backend-memfd,share=on` and
//! `-machine aux-ram-share=on`, which cpr-transfer requires) and `-nodefaults`, so that its device
//! model is as small as vmmd's: the i440FX `pc` machine, COM1 and the firmware the PVH `-kernel`
//! boot needs.
//!
//! The console: QEMU 10.0 cannot hand a chardev's fd to the new QEMU over cpr, so every QEMU
//! *connects* to one unix socket the harness listens on (`-chardev socket,server=off`). The client
//! connection is made while QEMU initialises, before the new QEMU's vCPUs can run, so no heartbeat
//! is dropped for want of a reader (a `server=on,wait=off` chardev drops output until a client
//! connects). [`ConsoleServer`] accepts every connection and merges what they carry into one
//! record: the heartbeat timeline runs on the old QEMU's connection until it stops the guest and on
//! the new one's from the first heartbeat after the resume, all on the host monotonic clock, the
//! same definition of the blackout as for vmmd. Commands go to the newest connection.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cprctl::console::{LineSplitter, Token};
use serde_json::{json, Value};

/// The QEMU binary used unless told otherwise.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";

/// How to get a QEMU that has cpr-transfer, for the message shown when it is missing.
pub const INSTALL_HINT: &str =
    "QEMU 10.0 or newer is needed for cpr-transfer: on Debian bookworm, \
     `echo 'deb http://deb.debian.org/debian bookworm-backports main' > \
     /etc/apt/sources.list.d/backports.list && apt-get update && \
     apt-get install -t bookworm-backports qemu-system-x86`";

/// The version `binary --version` reports, as (major, minor, micro).
pub fn version(binary: &Path) -> Result<(u32, u32, u32)> {
    let out = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    ensure!(
        out.status.success(),
        "{} --version failed",
        binary.display()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).with_context(|| format!("no version in {text:?}"))
}

/// Parses `QEMU emulator version 10.0.2 (Debian ...)`.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let v = rest.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
        parts.next().flatten().unwrap_or(0),
    ))
}

/// One complete guest line.
#[derive(Debug, Clone)]
pub struct Line {
    /// When the read that completed it returned.
    pub at: Instant,
    /// The text without framing.
    pub text: String,
    /// Heartbeats received (on all connections) before it.
    pub heartbeats_before: usize,
}

#[derive(Debug, Default)]
struct Record {
    heartbeats: Vec<Instant>,
    lines: Vec<Line>,
    connections: usize,
    /// The newest connection, for commands.
    writer: Option<UnixStream>,
}

#[derive(Debug, Default)]
struct Shared {
    record: Mutex<Record>,
    changed: Condvar,
}

/// The harness's end of every QEMU's COM1: a listening unix socket whose connections are read on
/// their own threads and stamped with the host monotonic clock.
#[derive(Debug)]
pub struct ConsoleServer {
    path: PathBuf,
    shared: Arc<Shared>,
    cursor: usize,
}

impl ConsoleServer {
    /// Listens on `path`.
    pub fn bind(path: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
        let shared = Arc::new(Shared::default());
        let acceptor_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("qemu-console-accept".into())
            .spawn(move || accept_loop(&listener, &acceptor_shared))
            .context("spawn the console acceptor")?;
        Ok(Self {
            path: path.to_path_buf(),
            shared,
            cursor: 0,
        })
    }

    /// The socket path, for `-chardev socket,path=…,server=off`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&self) -> MutexGuard<'_, Record> {
        self.shared.record.lock().expect("console reader panicked")
    }

    /// Waits until `cond` holds on the record or `timeout` passes; returns whether it held.
    fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&Record) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut rec = self.record();
        loop {
            if cond(&rec) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            rec = self
                .shared
                .changed
                .wait_timeout(rec, deadline - now)
                .expect("console reader panicked")
                .0;
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.record().connections
    }

    /// Waits for the next unconsumed line starting with `prefix`, consuming it and those before.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> Option<Line> {
        let cursor = self.cursor;
        let mut found = None;
        self.wait_until(timeout, |rec| {
            found = rec.lines[cursor.min(rec.lines.len())..]
                .iter()
                .position(|l| l.text.starts_with(prefix))
                .map(|i| (cursor + i, rec.lines[cursor + i].clone()));
            found.is_some()
        });
        let (i, line) = found?;
        self.cursor = i + 1;
        Some(line)
    }

    /// Sends a one-byte guest command to the newest connection and returns its answer line.
    pub fn command(&mut self, cmd: u8, answer: &str, timeout: Duration) -> Result<Line> {
        let shared = Arc::clone(&self.shared);
        {
            let mut rec = shared.record.lock().expect("console reader panicked");
            self.cursor = self.cursor.max(rec.lines.len());
            let writer = rec.writer.as_mut().context("no QEMU is connected")?;
            writer.write_all(&[cmd]).context("write to the console")?;
        }
        self.wait_for_line(answer, timeout)
            .with_context(|| format!("no {answer} answer within {timeout:?}"))
    }

    /// `v`: the memory hash the guest reports; fails on `VERIFY FAIL`.
    pub fn verify(&mut self) -> Result<String> {
        let line = self.command(b'v', "VERIFY", Duration::from_secs(60))?;
        let v = crate::guest::Verify::parse(&line.text)
            .map_err(|e| anyhow!("bad VERIFY line {:?}: {e}", line.text))?;
        match v {
            crate::guest::Verify::Ok(hash) => Ok(hash),
            crate::guest::Verify::Fail(detail) => {
                bail!("guest memory verification failed: {detail}")
            }
        }
    }

    /// `c`: the guest's counters and how many heartbeat bytes arrived before the answer.
    pub fn counters(&mut self) -> Result<(crate::guest::Counters, usize)> {
        let line = self.command(b'c', "COUNTERS", Duration::from_secs(60))?;
        let c = crate::guest::Counters::parse(&line.text)
            .map_err(|e| anyhow!("bad COUNTERS line {:?}: {e}", line.text))?;
        Ok((c, line.heartbeats_before))
    }

    /// Every heartbeat's arrival so far, in order.
    pub fn heartbeats(&self) -> Vec<Instant> {
        self.record().heartbeats.clone()
    }

    /// Waits until `n` heartbeats arrived at or after `since`.
    pub fn wait_for_heartbeats(&self, since: Instant, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |rec| {
            let first = rec.heartbeats.partition_point(|&t| t < since);
            rec.heartbeats.len() - first >= n
        })
    }

    /// Lines reporting a guest-detected failure.
    pub fn failures(&self) -> Vec<String> {
        self.record()
            .lines
            .iter()
            .filter(|l| crate::console::is_failure(&l.text))
            .map(|l| l.text.clone())
            .collect()
    }

    /// The last lines, for diagnostics.
    pub fn tail(&self) -> Vec<String> {
        let rec = self.record();
        let start = rec.lines.len().saturating_sub(5);
        rec.lines[start..].iter().map(|l| l.text.clone()).collect()
    }
}

impl Drop for ConsoleServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { return };
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        {
            let mut rec = shared.record.lock().expect("console record poisoned");
            rec.connections += 1;
            rec.writer = Some(stream);
        }
        shared.changed.notify_all();
        let shared = Arc::clone(shared);
        let _ = std::thread::Builder::new()
            .name("qemu-console-read".into())
            .spawn(move || read_loop(reader, &shared));
    }
}

fn read_loop(mut stream: UnixStream, shared: &Shared) {
    let mut splitter = LineSplitter::default();
    let mut buf = [0u8; 8192];
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        let at = Instant::now();
        let mut rec = shared.record.lock().expect("console record poisoned");
        for &b in &buf[..n] {
            match splitter.push(b) {
                Some(Token::Heartbeat) => rec.heartbeats.push(at),
                Some(Token::Line(text)) => {
                    let heartbeats_before = rec.heartbeats.len();
                    rec.lines.push(Line {
                        at,
                        text,
                        heartbeats_before,
                    });
                }
                None => {}
            }
        }
        drop(rec);
        shared.changed.notify_all();
    }
}

/// A minimal synchronous QMP client.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for answers: `(when, name)`.
    pub events: VecDeque<(Instant, String)>,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (retrying while it is absent) and negotiates.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| format!("connect to QMP {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_micros(500)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: VecDeque::new(),
        };
        let greeting = qmp.read_message()?;
        ensure!(greeting.get("QMP").is_some(), "no QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).context("read from QMP")?;
        ensure!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).with_context(|| format!("bad QMP message {line:?}"))
    }

    /// Runs `command` and returns its `return` value; a QMP error is an error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .context("write to QMP")?;
        loop {
            let m = self.read_message()?;
            if let Some(event) = m.get("event") {
                self.events
                    .push_back((Instant::now(), event.as_str().unwrap_or("?").to_owned()));
                continue;
            }
            if let Some(err) = m.get("error") {
                bail!("QMP {command}: {err}");
            }
            return Ok(m.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// `query-status`'s `status`.
    pub fn status(&mut self) -> Result<String> {
        Ok(self.execute("query-status", json!({}))?["status"]
            .as_str()
            .unwrap_or("?")
            .to_owned())
    }
}

/// Where a QEMU's guest RAM lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuRam {
    /// A shared memfd (`memory-backend-memfd,share=on`); with `aux_ram_share`, also
    /// `-machine aux-ram-share=on` (cpr-transfer needs both).
    Memfd {
        /// `-machine aux-ram-share=on`.
        aux_ram_share: bool,
    },
    /// A shared file (`memory-backend-file,mem-path=…,share=on`), e.g. on /dev/shm: what
    /// cpr-reboot needs (with `x-ignore-shared`, RAM stays in the file and is not written to the
    /// state).
    File(PathBuf),
}

/// How a QEMU waits for its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// Cold boot.
    None,
    /// `-incoming` main and cpr channels (cpr-transfer).
    CprTransfer,
    /// `-incoming defer`, then QMP `migrate-incoming` (cpr-reboot, migration from a file).
    Defer,
}

/// How every QEMU of one benchmark is started.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The QEMU binary.
    pub binary: PathBuf,
    /// The guest kernel (`-kernel`).
    pub kernel: PathBuf,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Where sockets go (short path: unix socket names are limited).
    pub dir: PathBuf,
    /// The console socket the harness listens on.
    pub console: PathBuf,
    /// Guest RAM.
    pub ram: QemuRam,
}

impl QemuConfig {
    fn unix(&self, name: &str, generation: usize) -> PathBuf {
        self.dir.join(format!("{name}{generation}.sock"))
    }

    fn channel(&self, kind: &str, generation: usize) -> Value {
        json!({
            "channel-type": kind,
            "addr": {
                "transport": "socket",
                "type": "unix",
                "path": self.unix(kind, generation).display().to_string(),
            },
        })
    }

    /// The command line of QEMU number `generation`, waiting for its state as `incoming` says.
    pub fn command(&self, generation: usize, incoming: Incoming) -> Command {
        let mib = self.memory_bytes >> 20;
        let mut cmd = Command::new(&self.binary);
        let (backend, machine) = match &self.ram {
            QemuRam::Memfd { aux_ram_share } => (
                format!("memory-backend-memfd,id=ram0,size={mib}M,share=on"),
                if *aux_ram_share {
                    "pc,memory-backend=ram0,aux-ram-share=on"
                } else {
                    "pc,memory-backend=ram0"
                },
            ),
            QemuRam::File(path) => (
                format!(
                    "memory-backend-file,id=ram0,size={mib}M,mem-path={},share=on",
                    path.display()
                ),
                "pc,memory-backend=ram0",
            ),
        };
        cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"])
            .args(["-smp", &self.vcpus.to_string(), "-m", &format!("{mib}M")])
            .arg("-object")
            .arg(backend)
            .args(["-machine", machine])
            .arg("-chardev")
            .arg(format!(
                "socket,id=com1,path={},server=off",
                self.console.display()
            ))
            .args(["-serial", "chardev:com1"])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                self.unix("qmp", generation).display()
            ))
            .arg("-kernel")
            .arg(&self.kernel);
        match incoming {
            Incoming::None => {}
            Incoming::CprTransfer => {
                cmd.arg("-incoming")
                    .arg(self.channel("main", generation).to_string())
                    .arg("-incoming")
                    .arg(self.channel("cpr", generation).to_string());
            }
            Incoming::Defer => {
                cmd.args(["-incoming", "defer"]);
            }
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        cmd
    }
}

/// One running QEMU.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    /// Its QMP connection.
    pub qmp: Qmp,
    generation: usize,
}

/// One cpr-transfer's figures.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// New QEMU spawned.
    pub spawned: Instant,
    /// `migrate` issued on the old QEMU.
    pub migrate: Instant,
    /// The new QEMU reported `running`.
    pub running: Instant,
    /// The old QEMU has exited.
    pub old_quit: Instant,
    /// `query-migrate` on the old QEMU once completed (QEMU's own `downtime`, `total-time`, …).
    pub info: Value,
}

/// One cpr-reboot's instants (old QEMU: migrate → saved → exited; new: spawned → monitor up →
/// migrate-incoming → running).
#[derive(Debug, Clone)]
pub struct Reboot {
    /// `migrate file:` issued on the old QEMU.
    pub migrate: Instant,
    /// The old QEMU reported the migration completed.
    pub saved: Instant,
    /// The old QEMU has exited (QMP `quit`, reaped).
    pub exited: Instant,
    /// The new QEMU spawned.
    pub spawned: Instant,
    /// Its monitor answered.
    pub monitor: Instant,
    /// `migrate-incoming` issued.
    pub incoming: Instant,
    /// It reported `running`.
    pub running: Instant,
    /// The old QEMU's `query-migrate` once completed.
    pub info: Value,
}

/// A [`QemuProcess::save_mapped_ram`]'s instants.
#[derive(Debug, Clone)]
pub struct FileSave {
    /// `stop` issued.
    pub start: Instant,
    /// `migrate` issued.
    pub migrate: Instant,
    /// The migration reported completed.
    pub completed: Instant,
    /// `query-migrate` once completed.
    pub info: Value,
}

/// A [`QemuProcess::restore_mapped_ram`]'s instants.
#[derive(Debug, Clone)]
pub struct FileRestore {
    /// QEMU spawned.
    pub spawned: Instant,
    /// Its monitor answered.
    pub monitor: Instant,
    /// `migrate-incoming` issued.
    pub incoming: Instant,
    /// The load reported completed.
    pub loaded: Instant,
    /// The guest runs (after `cont`).
    pub running: Instant,
    /// The new QEMU's `query-migrate` once completed.
    pub info: Value,
}

impl QemuProcess {
    /// Starts the first QEMU (cold boot).
    pub fn boot(config: &QemuConfig) -> Result<Self> {
        Self::spawn(config, 0, Incoming::None)
    }

    /// Live-updates into a new QEMU with cpr-transfer, quits this one and returns the new one.
    pub fn cpr_transfer(mut self, config: &QemuConfig) -> Result<(Self, Transfer)> {
        let generation = self.generation + 1;
        for name in ["main", "cpr", "qmp"] {
            let _ = std::fs::remove_file(config.unix(name, generation));
        }
        let spawned = Instant::now();
        let mut child = config
            .command(generation, Incoming::CprTransfer)
            .spawn()
            .with_context(|| format!("spawn {}", config.binary.display()))?;
        let result = (|| -> Result<(Qmp, Transfer)> {
            // The new QEMU listens on the cpr channel before anything else. The path appears at
            // bind(), before listen(): wait until the kernel lists it as listening.
            let cpr = config.unix("cpr", generation);
            let deadline = Instant::now() + Duration::from_secs(30);
            while !is_listening(&cpr) {
                ensure!(Instant::now() < deadline, "new QEMU never listened on cpr");
                if let Some(status) = child.try_wait()? {
                    bail!("new QEMU exited with {status}");
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            self.qmp
                .execute("migrate-set-parameters", json!({ "mode": "cpr-transfer" }))?;
            let migrate = Instant::now();
            self.qmp.execute(
                "migrate",
                json!({ "channels": [config.channel("main", generation), config.channel("cpr", generation)] }),
            )?;
            // The new QEMU opens its monitor once it has read the cpr state.
            let mut qmp = Qmp::connect(&config.unix("qmp", generation), Duration::from_secs(30))?;
            let running = loop {
                let status = qmp.status()?;
                if status == "running" {
                    break Instant::now();
                }
                ensure!(
                    Instant::now() < deadline,
                    "new QEMU still {status} after 30 s"
                );
                std::thread::sleep(Duration::from_micros(200));
            };
            let info = loop {
                let info = self.qmp.execute("query-migrate", json!({}))?;
                match info["status"].as_str() {
                    Some("completed") => break info,
                    Some("failed" | "cancelled") => bail!("cpr-transfer failed: {info}"),
                    _ => {}
                }
                ensure!(Instant::now() < deadline, "migration not completed: {info}");
                std::thread::sleep(Duration::from_millis(1));
            };
            Ok((
                qmp,
                Transfer {
                    spawned,
                    migrate,
                    running,
                    old_quit: running,
                    info,
                },
            ))
        })();
        let (qmp, mut transfer) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        self.quit();
        transfer.old_quit = Instant::now();
        Ok((
            Self {
                child,
                qmp,
                generation,
            },
            transfer,
        ))
    }

    /// Starts QEMU number `generation` waiting for its state as `incoming` says, and connects to
    /// its monitor.
    pub fn spawn(config: &QemuConfig, generation: usize, incoming: Incoming) -> Result<Self> {
        for name in ["main", "cpr", "qmp"] {
            let _ = std::fs::remove_file(config.unix(name, generation));
        }
        let mut child = config
            .command(generation, incoming)
            .spawn()
            .with_context(|| format!("spawn {}", config.binary.display()))?;
        match Qmp::connect(&config.unix("qmp", generation), Duration::from_secs(30)) {
            Ok(qmp) => Ok(Self {
                child,
                qmp,
                generation,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// This QEMU's number: 0 for the cold boot, +1 for each QEMU that took over from another.
    pub fn generation(&self) -> usize {
        self.generation
    }

    /// Sets migration capabilities, e.g. `[("mapped-ram", true)]`.
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<()> {
        let caps: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({ "capability": c, "state": on }))
            .collect();
        self.qmp
            .execute("migrate-set-capabilities", json!({ "capabilities": caps }))?;
        Ok(())
    }

    /// Polls `query-migrate` until the migration completed and returns its answer.
    fn wait_migration(&mut self, what: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.qmp.execute("query-migrate", json!({}))?;
            match info["status"].as_str() {
                Some("completed") => return Ok(info),
                Some("failed" | "cancelled") => bail!("{what} failed: {info}"),
                _ => {}
            }
            ensure!(Instant::now() < deadline, "{what} not completed: {info}");
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Polls `query-status` until the guest runs; `cont` when the load left it paused (the source
    /// was stopped before it saved).
    fn wait_running(&mut self, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.qmp.status()?.as_str() {
                "running" => return Ok(Instant::now()),
                "paused" => {
                    self.qmp.execute("cont", json!({}))?;
                }
                status => ensure!(
                    Instant::now() < deadline,
                    "QEMU still {status} after {timeout:?}"
                ),
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// QEMU's cpr-reboot, with no reboot: `mode=cpr-reboot` and `x-ignore-shared` (guest RAM
    /// stays in its shared file, [`QemuRam::File`]), `migrate file:STATE` (the VM stops), quit,
    /// start a new QEMU on the same RAM file with `-incoming defer`, `migrate-incoming
    /// file:STATE`; returns the new QEMU once the guest runs.
    pub fn cpr_reboot(mut self, config: &QemuConfig, state: &Path) -> Result<(Self, Reboot)> {
        ensure!(
            matches!(config.ram, QemuRam::File(_)),
            "cpr-reboot needs file-backed guest RAM"
        );
        let uri = format!("file:{}", state.display());
        let _ = std::fs::remove_file(state);
        self.qmp
            .execute("migrate-set-parameters", json!({ "mode": "cpr-reboot" }))?;
        self.set_capabilities(&[("x-ignore-shared", true)])?;
        let migrate = Instant::now();
        self.qmp.execute("migrate", json!({ "uri": uri }))?;
        let info = self.wait_migration("cpr-reboot save", Duration::from_secs(60))?;
        let saved = Instant::now();
        self.quit();
        let exited = Instant::now();
        let generation = self.generation + 1;
        drop(self);
        let spawned = Instant::now();
        let mut new = Self::spawn(config, generation, Incoming::Defer)?;
        let monitor = Instant::now();
        new.qmp
            .execute("migrate-set-parameters", json!({ "mode": "cpr-reboot" }))?;
        new.set_capabilities(&[("x-ignore-shared", true)])?;
        let incoming = Instant::now();
        new.qmp.execute("migrate-incoming", json!({ "uri": uri }))?;
        let running = new.wait_running(Duration::from_secs(60))?;
        Ok((
            new,
            Reboot {
                migrate,
                saved,
                exited,
                spawned,
                monitor,
                incoming,
                running,
                info,
            },
        ))
    }

    /// Normal migration to a file (`migrate file:PATH`) with the `mapped-ram` capability, as
    /// `virsh save` does it: `stop`, then migrate; returns once it completed. The VM stays stopped
    /// (`postmigrate`).
    pub fn save_mapped_ram(&mut self, path: &Path) -> Result<FileSave> {
        let _ = std::fs::remove_file(path);
        self.set_capabilities(&[("mapped-ram", true)])?;
        let start = Instant::now();
        self.qmp.execute("stop", json!({}))?;
        let migrate = Instant::now();
        self.qmp.execute(
            "migrate",
            json!({ "uri": format!("file:{}", path.display()) }),
        )?;
        let info = self.wait_migration("mapped-ram save", Duration::from_secs(600))?;
        Ok(FileSave {
            start,
            migrate,
            completed: Instant::now(),
            info,
        })
    }

    /// Starts QEMU number `generation` with `-incoming defer` and restores it from a
    /// [`QemuProcess::save_mapped_ram`] file (`mapped-ram` on, `migrate-incoming file:PATH`,
    /// `cont`); returns it once the guest runs.
    pub fn restore_mapped_ram(
        config: &QemuConfig,
        generation: usize,
        path: &Path,
    ) -> Result<(Self, FileRestore)> {
        let spawned = Instant::now();
        let mut new = Self::spawn(config, generation, Incoming::Defer)?;
        let monitor = Instant::now();
        new.set_capabilities(&[("mapped-ram", true)])?;
        let incoming = Instant::now();
        new.qmp.execute(
            "migrate-incoming",
            json!({ "uri": format!("file:{}", path.display()) }),
        )?;
        let info = new.wait_migration("mapped-ram restore", Duration::from_secs(600))?;
        let loaded = Instant::now();
        let running = new.wait_running(Duration::from_secs(60))?;
        Ok((
            new,
            FileRestore {
                spawned,
                monitor,
                incoming,
                loaded,
                running,
                info,
            },
        ))
    }

    /// Quits QEMU (QMP `quit`, then SIGKILL if it lingers) and reaps it.
    pub fn quit(&mut self) {
        let _ = self.qmp.execute("quit", json!({}));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether a unix socket is bound at `path` and listening (`/proc/net/unix` flag `__SO_ACCEPTCON`).
pub fn is_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() >= 8
            && f[7] == path
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// The gaps between consecutive heartbeats in `[from, to]`, in milliseconds, unsorted.
pub fn gaps_ms(heartbeats: &[Instant], from: Instant, to: Instant) -> Vec<f64> {
    let start = heartbeats.partition_point(|&t| t < from);
    let end = heartbeats.partition_point(|&t| t <= to);
    heartbeats[start..end]
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
        .collect()
}

/// The longest gap between consecutive heartbeats from the last one before `from` to the first
/// one after `to`: the guest-visible blackout of something that ran in `[from, to]`.
pub fn blackout(heartbeats: &[Instant], from: Instant, to: Instant) -> Duration {
    let start = heartbeats.partition_point(|&t| t < from).saturating_sub(1);
    let end = (heartbeats.partition_point(|&t| t <= to) + 1).min(heartbeats.len());
    heartbeats[start..end]
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(Duration::ZERO)
}

/// p50/p99/max (and count, mean) of heartbeat gaps in milliseconds.
pub fn gap_distribution(gaps_ms: &[f64]) -> Value {
    let mut v: Vec<f64> = gaps_ms.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i.min(v.len() - 1)]
    };
    let r = |x: f64| (x * 1e3).round() / 1e3;
    json!({
        "p50": r(pct(50.0)),
        "p99": r(pct(99.0)),
        "max": r(v[v.len() - 1]),
        "mean": r(v.iter().sum::<f64>() / v.len() as f64),
        "gaps": v.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_seen() {
        let dir = crate::TestDir::new("qemu-unit");
        let path = dir.join("l.sock");
        assert!(!is_listening(&path));
        let _l = UnixListener::bind(&path).expect("bind");
        assert!(is_listening(&path));
    }

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n"),
            Some((10, 0, 2))
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.15\n"),
            Some((7, 2, 15))
        );
        assert_eq!(parse_version("nonsense"), None);
    }

    #[test]
    fn gaps_and_blackout() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let hb = [at(0), at(1), at(2), at(10), at(11), at(12)];
        assert_eq!(blackout(&hb, at(3), at(9)), Duration::from_millis(8));
        assert_eq!(gaps_ms(&hb, at(0), at(2)), vec![1.0, 1.0]);
        let d = gap_distribution(&gaps_ms(&hb, at(0), at(12)));
        assert_eq!(d["p50"], 1.0);
        assert_eq!(d["max"], 8.0);
        assert_eq!(d["gaps"], 5);
    }

    #[test]
    fn command_line_has_cpr_transfer_pieces() {
        let c = QemuConfig {
            binary: DEFAULT_BINARY.into(),
            kernel: "/g".into(),
            vcpus: 2,
            memory_bytes: 256 << 20,
            dir: "/d".into(),
            console: "/d/com1.sock".into(),
            ram: QemuRam::Memfd {
                aux_ram_share: true,
            },
        };
        let args: Vec<String> = c
            .command(3, Incoming::CprTransfer)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("memory-backend-memfd,id=ram0,size=256M,share=on"));
        assert!(joined.contains("aux-ram-share=on"));
        assert!(joined.contains("/d/cpr3.sock"));
        assert!(joined.contains("\"channel-type\":\"main\""));
        assert!(joined.contains("-smp 2"));
        let c = QemuConfig {
            ram: QemuRam::File("/dev/shm/g.ram".into()),
            ..c
        };
        let joined = c
            .command(1, Incoming::Defer)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined
            .contains("memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/g.ram,share=on"));
        assert!(joined.contains("-machine pc,memory-backend=ram0 "));
        assert!(joined.contains("-incoming defer"));
        assert!(!joined.contains("aux-ram-share"));
    }
}
