//! Host side of the guest's serial console (COM1).
//!
//! The 16550 UART model writes guest output into a [`ConsoleWriter`], which never blocks: bytes go
//! into a bounded ring shared with one background thread (`vmmd-console`) that delivers them to the
//! backend chosen with `--serial`. When the ring is full the oldest bytes are dropped and counted.
//! Bytes typed by the user are handed to the UART through an [`InputSink`]; the thread stops reading
//! from the backend while the sink has not taken everything (backpressure) and retries every 1 ms.
//!
//! All backend fds live in one [`ConsoleFds`] owned by the background thread, and the thread only
//! ever waits in `poll(2)` (listener, client or pty master, and an internal wake-up eventfd), so a
//! later change can rebuild a [`Console`] around fds inherited across `execve`.

use std::collections::VecDeque;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::socket::{
    accept4, bind, connect, listen, send, socket, AddressFamily, Backlog, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use nix::sys::stat::{fchmod, Mode};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use vmm_sys_util::eventfd::EventFd;

use crate::cpr::continuation::{Continuation, ResultSlot};

/// Default size of the guest-output buffer kept while no client reads it.
#[allow(
    dead_code,
    reason = "for the --serial-buffer default; not every build uses it"
)]
pub const DEFAULT_BUFFER_BYTES: usize = 1 << 20;

/// Line sent to a second socket client before it is closed (followed by the path and a newline).
const BUSY_PREFIX: &str = "vmmd: console busy: another client is attached to ";
/// Most bytes copied out of the ring per write to the backend.
const OUT_CHUNK: usize = 64 * 1024;
/// Most bytes read from the backend at a time (then reading stops until the sink took them).
const IN_CHUNK: usize = 4096;
/// Most input bytes kept from a client that hangs up while input is still pending.
const HANGUP_INPUT_LIMIT: usize = 1 << 20;
/// How often input the sink refused is offered again.
const SINK_RETRY: Duration = Duration::from_millis(1);
/// How long to wait before retrying output after a file write error.
const FILE_RETRY: Duration = Duration::from_secs(1);
/// How long to wait before retrying the pty master after EIO.
const PTY_RETRY: Duration = Duration::from_millis(100);

/// Where the guest's serial console goes, as given with `--serial`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialBackendSpec {
    /// `socket=PATH`: a unix-socket server at PATH, one client at a time.
    Socket(PathBuf),
    /// `file=PATH`: output appended to PATH, no input.
    File(PathBuf),
    /// `pty`: a pseudo-terminal; see [`Console::pty_path`].
    Pty,
    /// `null`: output discarded, no input.
    Null,
}

impl FromStr for SerialBackendSpec {
    type Err = ConsoleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, path) = match s.split_once('=') {
            Some((kind, path)) => (kind, Some(path)),
            None => (s, None),
        };
        let need_path = |backend: &'static str| match path {
            Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
            _ => Err(ConsoleError::MissingPath { backend }),
        };
        match kind {
            "socket" => Ok(Self::Socket(need_path("socket")?)),
            "file" => Ok(Self::File(need_path("file")?)),
            "pty" | "null" if path.is_some() => Err(ConsoleError::UnexpectedPath {
                backend: if kind == "pty" { "pty" } else { "null" },
            }),
            "pty" => Ok(Self::Pty),
            "null" => Ok(Self::Null),
            _ => Err(ConsoleError::UnknownBackend(s.to_owned())),
        }
    }
}

impl fmt::Display for SerialBackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Socket(p) => write!(f, "socket={}", p.display()),
            Self::File(p) => write!(f, "file={}", p.display()),
            Self::Pty => f.write_str("pty"),
            Self::Null => f.write_str("null"),
        }
    }
}

/// Receives bytes typed by the user; returns how many it accepted (the UART FIFO holds 64).
/// The console offers the rest again later, in order.
pub type InputSink = Box<dyn FnMut(&[u8]) -> usize + Send>;

/// Errors opening or running the serial console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The `--serial` value names no known backend.
    #[error("unknown serial backend \"{0}\": use socket=PATH, file=PATH, pty or null")]
    UnknownBackend(String),
    /// `socket` or `file` without a path.
    #[error("serial backend \"{backend}\" needs a path: use {backend}=PATH")]
    MissingPath {
        /// The backend name.
        backend: &'static str,
    },
    /// `pty=...` or `null=...`.
    #[error("serial backend \"{backend}\" takes no path: use plain {backend}")]
    UnexpectedPath {
        /// The backend name.
        backend: &'static str,
    },
    /// A zero-sized output buffer was asked for.
    #[error("the console buffer size must be at least 1 byte")]
    ZeroBuffer,
    /// The socket path does not fit in `sockaddr_un`.
    #[error("console socket path {path} is too long for a unix socket (at most 107 bytes): use a shorter path")]
    SocketPathTooLong {
        /// The path given.
        path: PathBuf,
    },
    /// Something other than a socket is in the way of the console socket.
    #[error("{path} exists and is not a socket: remove it or choose another console socket path")]
    NotASocket {
        /// The path given.
        path: PathBuf,
    },
    /// Another live process listens on the console socket path.
    #[error(
        "console socket {path} is in use by a running process: stop it or choose another path"
    )]
    SocketInUse {
        /// The path given.
        path: PathBuf,
    },
    /// Inspecting or removing an old socket file failed.
    #[error("cannot remove the stale console socket {path}: check the directory's permissions")]
    RemoveStale {
        /// The path given.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Creating, binding or listening on the console socket failed.
    #[error("cannot listen on console socket {path} ({step}): check that the directory exists and is writable")]
    Listen {
        /// The path given.
        path: PathBuf,
        /// Which call failed.
        step: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Opening the console output file failed.
    #[error("cannot open console file {path} for appending: check the path and its permissions")]
    OpenFile {
        /// The path given.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Creating or configuring the pseudo-terminal failed.
    #[error("cannot set up the console pseudo-terminal ({step}): check that /dev/ptmx and /dev/pts are available")]
    Pty {
        /// Which call failed.
        step: &'static str,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },
    /// Creating the internal wake-up eventfd failed.
    #[error("cannot create the console's wake-up eventfd: check the process fd limit")]
    EventFd(#[source] io::Error),
    /// Starting the background thread failed.
    #[error("cannot start the console thread: check the process and memory limits")]
    SpawnThread(#[source] io::Error),
    /// The console loop could not move into the cpr-exec bridge.
    #[error("cannot hand the console to the cpr-exec bridge: {0}")]
    Bridge(String),
}

/// The fds a console owns, kept in one place so they can be handed over across `execve`.
#[derive(Debug, Default)]
pub struct ConsoleFds {
    /// Listening unix socket (socket backend).
    pub listener: Option<OwnedFd>,
    /// The attached client (socket backend).
    pub client: Option<OwnedFd>,
    /// Pseudo-terminal master (pty backend).
    pub pty_master: Option<OwnedFd>,
    /// Pseudo-terminal slave, kept open so writes to the master never fail with EIO.
    pub pty_slave: Option<OwnedFd>,
    /// Output file (file backend).
    pub file: Option<OwnedFd>,
}

/// Guest output not yet delivered.
struct OutBuf {
    data: VecDeque<u8>,
    capacity: usize,
    /// Stream offset of `data[0]` (bytes delivered or dropped before it).
    head_seq: u64,
    dropped: u64,
    /// The thread sleeps with nothing to send and wants the eventfd signalled on new output.
    waiting: bool,
}

impl OutBuf {
    /// Appends `buf`, dropping the oldest bytes beyond the capacity.
    fn push(&mut self, buf: &[u8]) {
        let keep = if buf.len() > self.capacity {
            let skip = buf.len() - self.capacity;
            self.dropped += skip as u64;
            &buf[skip..]
        } else {
            buf
        };
        let overflow = (self.data.len() + keep.len()).saturating_sub(self.capacity);
        if overflow > 0 {
            self.data.drain(..overflow);
            self.head_seq += overflow as u64;
            self.dropped += overflow as u64;
        }
        // Bytes skipped from `buf` itself never entered the ring but are part of the stream.
        self.head_seq += (buf.len() - keep.len()) as u64;
        self.data.extend(keep);
    }

    /// Takes everything not yet delivered (it counts as handed on).
    fn take_all(&mut self) -> Vec<u8> {
        self.head_seq += self.data.len() as u64;
        self.data.drain(..).collect()
    }

    /// Copies the oldest bytes into `scratch`; returns the stream offset of the copy.
    fn peek(&self, scratch: &mut Vec<u8>) -> u64 {
        scratch.clear();
        let (a, b) = self.data.as_slices();
        let from_a = a.len().min(OUT_CHUNK);
        scratch.extend_from_slice(&a[..from_a]);
        let from_b = b.len().min(OUT_CHUNK - from_a);
        scratch.extend_from_slice(&b[..from_b]);
        self.head_seq
    }

    /// Marks `n` bytes copied at stream offset `seq` as delivered.
    fn consume(&mut self, seq: u64, n: usize) {
        let end = seq + n as u64;
        // Bytes the writer dropped while they were being written out were delivered after all.
        let delivered_anyway = self.head_seq.min(end).saturating_sub(seq);
        self.dropped = self.dropped.saturating_sub(delivered_anyway);
        if end > self.head_seq {
            let n = usize::try_from(end - self.head_seq)
                .unwrap_or(usize::MAX)
                .min(self.data.len());
            self.data.drain(..n);
            self.head_seq += n as u64;
        }
    }
}

/// State shared by the console, its writers and its thread.
struct Shared {
    out: Mutex<OutBuf>,
    sink: Mutex<Option<InputSink>>,
    wake: EventFd,
    /// Output is thrown away (null backend, or the console is gone).
    discard: AtomicBool,
    stop: AtomicBool,
    client_connected: AtomicBool,
    /// Raw number of the attached client's fd, or -1.
    client_fd: AtomicI32,
    /// Where the console thread's loop runs: [`BRIDGE_NONE`] ... [`BRIDGE_RETURN`].
    bridge: AtomicU8,
    /// The only fds (besides stdio) a continuation keeps in its copy of the fd table.
    bridge_keep: Mutex<Vec<RawFd>>,
    /// Where the continuation leaves the worker when it is told to return.
    bridge_slot: Mutex<Option<Arc<ResultSlot<Worker>>>>,
    /// The continuation's pid, or 0.
    bridge_pid: AtomicI32,
    /// Why the worker could not move into a continuation.
    bridge_error: Mutex<Option<String>>,
}

/// The console loop runs on its thread.
const BRIDGE_NONE: u8 = 0;
/// The thread is asked to move its loop into a continuation child.
const BRIDGE_DETACH: u8 = 1;
/// A continuation child runs the loop (accepting no new client: its fds would be its own).
const BRIDGE_ACTIVE: u8 = 2;
/// The continuation is asked to stop and hand the worker back.
const BRIDGE_RETURN: u8 = 3;

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    fn out(&self) -> MutexGuard<'_, OutBuf> {
        self.out.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sink(&self) -> MutexGuard<'_, Option<InputSink>> {
        self.sink.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn signal(&self) {
        // EAGAIN only means the counter is saturated: the thread is already due to wake.
        if let Err(e) = self.wake.write(1) {
            if e.kind() != io::ErrorKind::WouldBlock {
                tracing::warn!(error = %e, "cannot wake the console thread");
            }
        }
    }
}

/// A cheap clonable handle the UART writes guest output to. Never blocks.
#[derive(Clone)]
pub struct ConsoleWriter {
    shared: Arc<Shared>,
}

impl fmt::Debug for ConsoleWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleWriter").finish_non_exhaustive()
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() || self.shared.discard.load(Ordering::Relaxed) {
            return Ok(buf.len());
        }
        let wake = {
            let mut out = self.shared.out();
            let rest = match self.shared.bridge.load(Ordering::Relaxed) {
                // In the cpr-exec bridge the console loop competes for the CPU with the new
                // process's start: the vCPU sends straight to the client when nothing is queued.
                BRIDGE_ACTIVE if out.data.is_empty() => {
                    let sent = send_now(self.shared.client_fd.load(Ordering::SeqCst), buf);
                    out.head_seq += sent as u64;
                    &buf[sent..]
                }
                _ => buf,
            };
            if rest.is_empty() {
                return Ok(buf.len());
            }
            out.push(rest);
            std::mem::take(&mut out.waiting)
        };
        if wake {
            self.shared.signal();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends what the client's socket takes at once (MSG_DONTWAIT) and returns how much. The caller
/// holds the output lock, under which the console loop retires the client fd before closing it.
fn send_now(fd: RawFd, buf: &[u8]) -> usize {
    if fd < 0 {
        return 0;
    }
    // SAFETY: `fd` is the attached client's socket, open while the output lock is held (see
    // `disconnect_client`); `buf` is a live buffer of `buf.len()` bytes.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).unwrap_or(0)
}

/// A socket file this console created and removes when dropped.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// The guest serial console: a backend plus the thread that serves it.
pub struct Console {
    spec: SerialBackendSpec,
    shared: Arc<Shared>,
    pty_path: Option<PathBuf>,
    /// Raw numbers of the fds that stay fixed for the console's life (the client is in `shared`).
    fixed_fds: Vec<(&'static str, RawFd)>,
    socket_file: Option<SocketFile>,
    thread: Option<JoinHandle<Stopped>>,
    /// Stopped by `quiesce`: its shared state lives on in a hand-over.
    quiesced: bool,
    /// The fds of a console whose thread starts later ([`Console::resume_deferred`]).
    deferred: Option<ConsoleFds>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn fixed_fds_of(fds: &ConsoleFds) -> Vec<(&'static str, RawFd)> {
    [
        ("console-listener", &fds.listener),
        ("console-pty-master", &fds.pty_master),
        ("console-pty-slave", &fds.pty_slave),
        ("console-file", &fds.file),
    ]
    .into_iter()
    .filter_map(|(name, fd)| fd.as_ref().map(|fd| (name, fd.as_raw_fd())))
    .collect()
}

impl fmt::Debug for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Console")
            .field("spec", &self.spec)
            .field("pty_path", &self.pty_path)
            .field("fds", &self.raw_fds())
            .finish_non_exhaustive()
    }
}

impl Console {
    /// Opens the backend and starts its background thread (none for `null`).
    pub fn open(spec: &SerialBackendSpec, buffer_bytes: usize) -> Result<Console, ConsoleError> {
        if buffer_bytes == 0 {
            return Err(ConsoleError::ZeroBuffer);
        }
        let mut fds = ConsoleFds::default();
        let mut socket_file = None;
        let mut pty_path = None;
        match spec {
            SerialBackendSpec::Socket(path) => {
                let (listener, file) = listen_unix(path)?;
                tracing::info!(path = %path.display(), "guest serial console on unix socket");
                fds.listener = Some(listener);
                socket_file = Some(file);
            }
            SerialBackendSpec::File(path) => {
                let file = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(path)
                    .map_err(|source| ConsoleError::OpenFile {
                        path: path.clone(),
                        source,
                    })?;
                tracing::info!(path = %path.display(), "guest serial console appended to file");
                fds.file = Some(OwnedFd::from(file));
            }
            SerialBackendSpec::Pty => {
                let (master, slave, path) = open_pty()?;
                tracing::info!(path = %path.display(), "guest serial console on pseudo-terminal");
                fds.pty_master = Some(master);
                fds.pty_slave = Some(slave);
                pty_path = Some(path);
            }
            SerialBackendSpec::Null => {}
        }
        let mut console = Self::start(spec.clone(), fds, buffer_bytes, Vec::new(), None)?;
        console.socket_file = socket_file;
        console.pty_path = pty_path;
        Ok(console)
    }

    /// Builds the shared state and starts the thread around already open fds.
    fn start(
        spec: SerialBackendSpec,
        fds: ConsoleFds,
        buffer_bytes: usize,
        pending_in: Vec<u8>,
        reuse: Option<Arc<Shared>>,
    ) -> Result<Console, ConsoleError> {
        let shared = match reuse {
            // Writers (the UART) and the input sink keep pointing at the same shared state.
            Some(shared) => {
                shared.stop.store(false, Ordering::SeqCst);
                shared
                    .client_connected
                    .store(fds.client.is_some(), Ordering::SeqCst);
                shared.client_fd.store(
                    fds.client.as_ref().map_or(-1, AsRawFd::as_raw_fd),
                    Ordering::SeqCst,
                );
                shared
            }
            None => Self::new_shared(&spec, &fds, buffer_bytes)?,
        };
        Self::spawn(spec, shared, fds, pending_in)
    }

    fn new_shared(
        spec: &SerialBackendSpec,
        fds: &ConsoleFds,
        buffer_bytes: usize,
    ) -> Result<Arc<Shared>, ConsoleError> {
        let wake =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ConsoleError::EventFd)?;
        Ok(Arc::new(Shared {
            out: Mutex::new(OutBuf {
                data: VecDeque::with_capacity(buffer_bytes.min(OUT_CHUNK)),
                capacity: buffer_bytes,
                head_seq: 0,
                dropped: 0,
                waiting: false,
            }),
            sink: Mutex::new(None),
            wake,
            discard: AtomicBool::new(*spec == SerialBackendSpec::Null),
            stop: AtomicBool::new(false),
            client_connected: AtomicBool::new(fds.client.is_some()),
            client_fd: AtomicI32::new(fds.client.as_ref().map_or(-1, AsRawFd::as_raw_fd)),
            bridge: AtomicU8::new(BRIDGE_NONE),
            bridge_keep: Mutex::new(Vec::new()),
            bridge_slot: Mutex::new(None),
            bridge_pid: AtomicI32::new(0),
            bridge_error: Mutex::new(None),
        }))
    }

    fn spawn(
        spec: SerialBackendSpec,
        shared: Arc<Shared>,
        fds: ConsoleFds,
        pending_in: Vec<u8>,
    ) -> Result<Console, ConsoleError> {
        let fixed_fds = fixed_fds_of(&fds);
        let thread = Self::spawn_worker(&spec, &shared, fds, pending_in)?;
        Ok(Console {
            spec,
            shared,
            pty_path: None,
            fixed_fds,
            socket_file: None,
            thread,
            quiesced: false,
            deferred: None,
        })
    }

    fn spawn_worker(
        spec: &SerialBackendSpec,
        shared: &Arc<Shared>,
        fds: ConsoleFds,
        pending_in: Vec<u8>,
    ) -> Result<Option<JoinHandle<Stopped>>, ConsoleError> {
        let kind = match spec {
            SerialBackendSpec::Null => return Ok(None),
            SerialBackendSpec::Socket(p) => Kind::Socket { path: p.clone() },
            SerialBackendSpec::File(p) => Kind::File { path: p.clone() },
            SerialBackendSpec::Pty => Kind::Pty,
        };
        let worker = Worker {
            shared: Arc::clone(shared),
            fds,
            kind,
            pending_in: pending_in.into(),
            client_input_eof: false,
            out_retry_at: None,
            in_retry_at: None,
            file_failing: false,
            scratch: Vec::with_capacity(OUT_CHUNK),
            reported_dropped: 0,
        };
        let handle = std::thread::Builder::new()
            .name("vmmd-console".into())
            .spawn(move || worker.run())
            .map_err(ConsoleError::SpawnThread)?;
        Ok(Some(handle))
    }

    /// Like [`Console::resume`], but the thread starts only in [`Console::start_deferred`]: the
    /// previous process's bridge still serves these fds (see `cpr::bridge`). Guest output written
    /// meanwhile is buffered.
    pub fn resume_deferred(
        h: ConsoleHandover,
        buffer_bytes: usize,
    ) -> Result<Console, ConsoleError> {
        if buffer_bytes == 0 {
            return Err(ConsoleError::ZeroBuffer);
        }
        let shared = Self::new_shared(&h.spec, &h.fds, buffer_bytes)?;
        Ok(Console {
            fixed_fds: fixed_fds_of(&h.fds),
            spec: h.spec,
            shared,
            pty_path: h.pty_path,
            socket_file: h.socket_file,
            thread: None,
            quiesced: false,
            deferred: Some(h.fds),
        })
    }

    /// Starts the thread of a deferred console, with the bridge's undelivered output and input.
    pub fn start_deferred(
        &mut self,
        pending_out: &[u8],
        pending_in: Vec<u8>,
    ) -> Result<(), ConsoleError> {
        let Some(fds) = self.deferred.take() else {
            return Ok(());
        };
        {
            // Output the guest wrote before this start comes after the bridge's.
            let mut out = self.shared.out();
            let mine: Vec<u8> = out.data.drain(..).collect();
            out.push(pending_out);
            out.push(&mine);
        }
        self.thread = Self::spawn_worker(&self.spec, &self.shared, fds, pending_in)?;
        self.shared.signal();
        Ok(())
    }

    /// Moves the console thread's loop into a continuation child that outlives an `execve` and
    /// keeps only `keep` (and stdio) in its fd table; returns once the child serves. The child accepts no new
    /// client. Guest output keeps flowing.
    pub fn detach_to_bridge(
        &self,
        keep: Vec<RawFd>,
        timeout: Duration,
    ) -> Result<(), ConsoleError> {
        if self.thread.is_none() {
            return Ok(());
        }
        *lock(&self.shared.bridge_keep) = keep;
        *lock(&self.shared.bridge_error) = None;
        self.shared.bridge.store(BRIDGE_DETACH, Ordering::SeqCst);
        self.shared.signal();
        // The thread moves (ACTIVE) or gives up (back to NONE with an error).
        self.wait_bridge_state(timeout, |b| b != BRIDGE_DETACH);
        if let Some(e) = lock(&self.shared.bridge_error).take() {
            return Err(ConsoleError::Bridge(e));
        }
        if self.shared.bridge.load(Ordering::SeqCst) != BRIDGE_ACTIVE {
            self.reattach_from_bridge(timeout);
            return Err(ConsoleError::Bridge(format!(
                "the console thread did not move within {timeout:?}"
            )));
        }
        Ok(())
    }

    /// Polls the bridge state until `done` holds or `timeout` passes (the console thread sets it
    /// from its loop, which has no condition variable to signal).
    fn wait_bridge_state(&self, timeout: Duration, done: impl Fn(u8) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self.shared.bridge.load(Ordering::SeqCst)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// The pid of the continuation serving the console, while there is one.
    pub fn bridge_pid(&self) -> Option<libc::pid_t> {
        Some(self.shared.bridge_pid.load(Ordering::SeqCst)).filter(|&p| p > 0)
    }

    /// Brings the loop back from the continuation onto the console thread (after a failed exec).
    pub fn reattach_from_bridge(&self, timeout: Duration) {
        if self.thread.is_none() {
            return;
        }
        let _ = self.shared.bridge.compare_exchange(
            BRIDGE_DETACH,
            BRIDGE_NONE,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        if self
            .shared
            .bridge
            .compare_exchange(
                BRIDGE_ACTIVE,
                BRIDGE_RETURN,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_err()
        {
            return;
        }
        self.shared.signal();
        self.wait_bridge_state(timeout, |b| b == BRIDGE_NONE);
    }

    /// In the bridge after the exec: stops the continuation and returns the guest output and input
    /// it had not delivered, for the successor's console. The fds stay open for the successor.
    pub fn finish_bridge(&self, timeout: Duration) -> (Vec<u8>, Vec<u8>) {
        let mut pending_in = Vec::new();
        if self.shared.bridge.load(Ordering::SeqCst) == BRIDGE_ACTIVE {
            let slot = lock(&self.shared.bridge_slot).clone();
            self.shared.bridge.store(BRIDGE_RETURN, Ordering::SeqCst);
            self.shared.signal();
            if let Some(worker) = slot.and_then(|s| s.take_within(timeout)) {
                pending_in = worker.pending_in.iter().copied().collect();
                // Its fds are the successor's now: this copy of them closes with the bridge.
                std::mem::forget(worker);
            }
        }
        (self.shared.out().take_all(), pending_in)
    }
    /// A cheap clonable handle the UART writes guest output to.
    pub fn writer(&self) -> ConsoleWriter {
        ConsoleWriter {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Where bytes typed by the user go. May be set after open; input arriving before is kept
    /// until it is set. Replaces any previous sink.
    pub fn set_input_sink(&self, sink: InputSink) {
        *self.shared.sink() = Some(sink);
        self.shared.signal();
    }

    /// The pseudo-terminal slave path users open (pty backend).
    pub fn pty_path(&self) -> Option<&Path> {
        self.pty_path.as_deref()
    }

    /// The backend this console was opened with.
    pub fn spec(&self) -> &SerialBackendSpec {
        &self.spec
    }

    /// Bytes dropped because the buffer was full.
    pub fn dropped_bytes(&self) -> u64 {
        self.shared.out().dropped
    }

    /// Guest output bytes waiting to be delivered.
    #[allow(dead_code, reason = "for status reporting and tests")]
    pub fn buffered_bytes(&self) -> usize {
        self.shared.out().data.len()
    }

    /// Whether a client is attached (socket backend).
    pub fn client_connected(&self) -> bool {
        self.shared.client_connected.load(Ordering::SeqCst)
    }

    /// The console's fds by name (`console-listener`, `console-client`, `console-pty-master`,
    /// `console-pty-slave`, `console-file`), for the CPR fd table. The client entry reflects the
    /// moment of the call: it can change while the thread runs.
    /// Every fd the console's loop uses (its backend and its wake-up eventfd): what a bridge
    /// continuation must keep.
    pub fn loop_fds(&self) -> Vec<RawFd> {
        let mut v: Vec<RawFd> = self.raw_fds().into_iter().map(|(_, fd)| fd).collect();
        v.push(self.shared.wake.as_raw_fd());
        v
    }

    pub fn raw_fds(&self) -> Vec<(String, RawFd)> {
        let mut v: Vec<(String, RawFd)> = self
            .fixed_fds
            .iter()
            .map(|(name, fd)| ((*name).to_owned(), *fd))
            .collect();
        let client = self.shared.client_fd.load(Ordering::SeqCst);
        if client >= 0 {
            v.push(("console-client".to_owned(), client));
        }
        v
    }
}

/// The console backend's undelivered bytes: the guest output no client has received yet, and the
/// input read from the client that the UART has not taken. Saved with the VM state, so that a
/// successor (or a rollback) delivers each byte once.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleState {
    /// Guest output not yet delivered.
    pub output: Vec<u8>,
    /// Input not yet taken by the UART.
    pub input: Vec<u8>,
}

/// What the console thread gives back when it stops.
struct Stopped {
    fds: ConsoleFds,
    pending_in: Vec<u8>,
}

/// A stopped console, ready to be carried across `execve` or restarted after a failed one.
#[derive(Debug)]
pub struct ConsoleHandover {
    /// The backend.
    pub spec: SerialBackendSpec,
    /// Its fds (close-on-exec as opened; the CPR engine clears the flag for the exec).
    pub fds: ConsoleFds,
    /// Guest output not yet delivered.
    pub pending_out: Vec<u8>,
    /// Input read but not yet taken by the UART.
    pub pending_in: Vec<u8>,
    /// The pty slave path (pty backend).
    pub pty_path: Option<PathBuf>,
    socket_file: Option<SocketFile>,
    /// The stopped console's shared state, when it is restarted in the same process: the UART's
    /// writer and the input sink point at it.
    shared: Option<Arc<Shared>>,
}

impl ConsoleHandover {
    /// The fds by CPR table name.
    pub fn named_fds(&self) -> Vec<(&'static str, RawFd)> {
        let f = &self.fds;
        [
            ("console-listener", &f.listener),
            ("console-client", &f.client),
            ("console-pty-master", &f.pty_master),
            ("console-pty-slave", &f.pty_slave),
            ("console-file", &f.file),
        ]
        .into_iter()
        .filter_map(|(n, fd)| fd.as_ref().map(|fd| (n, fd.as_raw_fd())))
        .collect()
    }

    /// Rebuilds a hand-over from fds inherited across `execve`: `take(name)` yields each fd the
    /// previous process listed under that name.
    pub fn inherited(
        spec: SerialBackendSpec,
        mut take: impl FnMut(&str) -> Option<OwnedFd>,
        pending_out: Vec<u8>,
        pending_in: Vec<u8>,
        pty_path: Option<PathBuf>,
    ) -> ConsoleHandover {
        let fds = ConsoleFds {
            listener: take("console-listener"),
            client: take("console-client"),
            pty_master: take("console-pty-master"),
            pty_slave: take("console-pty-slave"),
            file: take("console-file"),
        };
        let socket_file = match (&spec, &fds.listener) {
            (SerialBackendSpec::Socket(path), Some(_)) => {
                std::fs::symlink_metadata(path).ok().map(|m| SocketFile {
                    path: path.clone(),
                    dev: m.dev(),
                    ino: m.ino(),
                })
            }
            _ => None,
        };
        ConsoleHandover {
            spec,
            fds,
            pending_out,
            pending_in,
            pty_path,
            socket_file,
            shared: None,
        }
    }
}

impl Console {
    /// Stops the console thread without closing anything and returns its fds and undelivered
    /// bytes. The caller must make sure no more guest output arrives (vCPUs paused).
    pub fn quiesce(mut self) -> ConsoleHandover {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.signal();
        let stopped = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(stopped)) => stopped,
            Some(Err(_)) => {
                tracing::error!(
                    "the console thread panicked; the console restarts without a client"
                );
                Stopped {
                    fds: ConsoleFds::default(),
                    pending_in: Vec::new(),
                }
            }
            None => Stopped {
                fds: ConsoleFds::default(),
                pending_in: Vec::new(),
            },
        };
        let pending_out = self.shared.out().take_all();
        self.quiesced = true;
        ConsoleHandover {
            spec: self.spec.clone(),
            fds: stopped.fds,
            pending_out,
            pending_in: stopped.pending_in,
            pty_path: self.pty_path.take(),
            socket_file: self.socket_file.take(),
            shared: Some(Arc::clone(&self.shared)),
        }
    }

    /// Restarts a console from a hand-over (after a failed exec, or in the new process).
    pub fn resume(h: ConsoleHandover, buffer_bytes: usize) -> Result<Console, ConsoleError> {
        if buffer_bytes == 0 {
            return Err(ConsoleError::ZeroBuffer);
        }
        let mut console = Self::start(h.spec, h.fds, buffer_bytes, h.pending_in, h.shared)?;
        console.socket_file = h.socket_file;
        console.pty_path = h.pty_path;
        if !h.pending_out.is_empty() {
            console.shared.out().push(&h.pending_out);
            console.shared.signal();
        }
        Ok(console)
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.signal();
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(stopped) => drop(stopped),
                Err(_) => tracing::error!("the console thread panicked"),
            }
        }
        if !self.quiesced {
            self.shared.discard.store(true, Ordering::SeqCst);
        }
        if let Some(file) = self.socket_file.take() {
            // Remove the path only if it is still the socket this console bound.
            match std::fs::symlink_metadata(&file.path) {
                Ok(m) if m.dev() == file.dev && m.ino() == file.ino => {
                    if let Err(e) = std::fs::remove_file(&file.path) {
                        tracing::warn!(path = %file.path.display(), error = %e,
                            "cannot remove the console socket");
                    }
                }
                _ => {}
            }
        }
    }
}

/// Binds a listening unix socket at `path` (mode 0600), replacing a stale socket file.
fn listen_unix(path: &Path) -> Result<(OwnedFd, SocketFile), ConsoleError> {
    let addr = UnixAddr::new(path).map_err(|_| ConsoleError::SocketPathTooLong {
        path: path.to_owned(),
    })?;
    remove_stale_socket(path, &addr)?;
    let err = |step: &'static str| {
        move |e: Errno| ConsoleError::Listen {
            path: path.to_owned(),
            step,
            source: io::Error::from(e),
        }
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(err("socket"))?;
    // On Linux the mode of the socket inode becomes the mode of the file bind() creates, so the
    // path never exists with a wider mode.
    fchmod(&fd, Mode::from_bits_truncate(0o600)).map_err(err("fchmod"))?;
    bind(fd.as_raw_fd(), &addr).map_err(err("bind"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ConsoleError::Listen {
            path: path.to_owned(),
            step: "chmod",
            source,
        }
    })?;
    let meta = std::fs::symlink_metadata(path).map_err(|source| ConsoleError::Listen {
        path: path.to_owned(),
        step: "stat",
        source,
    })?;
    let file = SocketFile {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    if let Err(e) = listen(&fd, Backlog::new(8).unwrap_or(Backlog::MAXCONN)) {
        let _ = std::fs::remove_file(path);
        return Err(err("listen")(e));
    }
    Ok((fd, file))
}

/// Removes a socket file nobody listens on; refuses to touch anything else.
fn remove_stale_socket(path: &Path, addr: &UnixAddr) -> Result<(), ConsoleError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ConsoleError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ConsoleError::NotASocket {
            path: path.to_owned(),
        });
    }
    let probe = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| ConsoleError::Listen {
        path: path.to_owned(),
        step: "probe socket",
        source: e.into(),
    })?;
    match connect(probe.as_raw_fd(), addr) {
        Err(Errno::ECONNREFUSED) => {}
        Err(Errno::ENOENT) => return Ok(()),
        // Connected, or a live listener with a full backlog, or someone else's socket.
        _ => {
            return Err(ConsoleError::SocketInUse {
                path: path.to_owned(),
            })
        }
    }
    tracing::info!(path = %path.display(), "removing stale console socket");
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ConsoleError::RemoveStale {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Opens a pseudo-terminal; returns (non-blocking master, raw-mode slave, slave path).
fn open_pty() -> Result<(OwnedFd, OwnedFd, PathBuf), ConsoleError> {
    let err = |step: &'static str| move |source: Errno| ConsoleError::Pty { step, source };
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(err("posix_openpt"))?;
    grantpt(&master).map_err(err("grantpt"))?;
    unlockpt(&master).map_err(err("unlockpt"))?;
    let name = ptsname_r(&master).map_err(err("ptsname"))?;
    let master = OwnedFd::from(master);
    set_nonblocking(&master).map_err(err("set master non-blocking"))?;
    let slave = open(
        Path::new(&name),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(err("open slave"))?;
    let mut termios = tcgetattr(&slave).map_err(err("tcgetattr"))?;
    cfmakeraw(&mut termios);
    tcsetattr(&slave, SetArg::TCSANOW, &termios).map_err(err("tcsetattr"))?;
    Ok((master, slave, PathBuf::from(name)))
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Which backend the thread serves.
enum Kind {
    Socket { path: PathBuf },
    File { path: PathBuf },
    Pty,
}

/// What the output side needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutState {
    /// Nothing to send; the writer will signal the eventfd.
    Idle,
    /// The destination is full; wait for POLLOUT.
    Blocked,
    /// No destination (no client), or waiting for `out_retry_at`.
    Parked,
}

/// The background thread: owns the fds, moves output out and input in.
struct Worker {
    shared: Arc<Shared>,
    fds: ConsoleFds,
    kind: Kind,
    /// Input read from the backend that the sink has not taken yet, oldest first.
    pending_in: VecDeque<u8>,
    /// The client shut down its sending side; keep delivering output to it.
    client_input_eof: bool,
    out_retry_at: Option<Instant>,
    in_retry_at: Option<Instant>,
    /// File writes are failing (logged once per streak).
    file_failing: bool,
    scratch: Vec<u8>,
    reported_dropped: u64,
}

impl Worker {
    fn run(mut self) -> Stopped {
        tracing::debug!("console thread started");
        loop {
            self.serve(false);
            if self.shared.stop.load(Ordering::SeqCst)
                || self.shared.bridge.load(Ordering::SeqCst) != BRIDGE_DETACH
            {
                break;
            }
            match self.continue_in_child() {
                Some(w) => self = w,
                None => {
                    tracing::error!("the console's bridge failed; the console stops");
                    return Stopped {
                        fds: ConsoleFds::default(),
                        pending_in: Vec::new(),
                    };
                }
            }
        }
        // Best effort: hand over what is buffered (blocking only for the file backend).
        self.pump_output();
        tracing::debug!("console thread stopped");
        Stopped {
            fds: self.fds,
            pending_in: self.pending_in.into(),
        }
    }

    /// Runs the loop in a continuation child until it is told to return, then gets the worker back
    /// (None if the child lost it). After an exec this thread is gone and the bridge takes it.
    fn continue_in_child(self) -> Option<Worker> {
        let shared = Arc::clone(&self.shared);
        let keep = lock(&shared.bridge_keep).clone();
        let started = Continuation::start(
            self,
            |mut w| {
                // No logging here: a thread the exec killed may have died holding the log
                // writer's lock.
                let quiet = tracing::dispatcher::set_default(&tracing::Dispatch::none());
                w.serve(true);
                w.pump_output();
                drop(quiet);
                w
            },
            &keep,
        );
        match started {
            Ok(child) => {
                *lock(&shared.bridge_slot) = Some(child.slot());
                shared.bridge_pid.store(child.pid(), Ordering::SeqCst);
                shared.bridge.store(BRIDGE_ACTIVE, Ordering::SeqCst);
                let w = child.wait();
                shared.bridge_pid.store(0, Ordering::SeqCst);
                *lock(&shared.bridge_slot) = None;
                shared.bridge.store(BRIDGE_NONE, Ordering::SeqCst);
                w
            }
            Err((e, w)) => {
                *lock(&shared.bridge_error) = Some(e.to_string());
                shared.bridge.store(BRIDGE_NONE, Ordering::SeqCst);
                Some(w)
            }
        }
    }

    /// The loop: until stopped, or told to detach (`bridged` false) or to return (`bridged` true).
    fn serve(&mut self, bridged: bool) {
        let leave = if bridged {
            BRIDGE_RETURN
        } else {
            BRIDGE_DETACH
        };
        let mut in_buf = vec![0u8; IN_CHUNK];
        while !self.shared.stop.load(Ordering::SeqCst)
            && self.shared.bridge.load(Ordering::SeqCst) != leave
        {
            let out_state = self.pump_output();
            let sink_waiting = self.pump_input();
            let now = Instant::now();
            if self.in_retry_at.is_some_and(|t| t <= now) {
                self.in_retry_at = None;
            }
            let mut timeout: Option<Duration> = None;
            let mut at_most = |d: Duration| timeout = Some(timeout.map_or(d, |t| t.min(d)));
            if sink_waiting {
                at_most(SINK_RETRY);
            }
            if let Some(t) = self.out_retry_at {
                at_most(t.saturating_duration_since(now));
            }
            if let Some(t) = self.in_retry_at {
                at_most(t.saturating_duration_since(now));
            }

            // While the pty misbehaves (EIO, HUP) leave it out of the poll set: HUP is reported
            // whatever is asked for and would make the loop spin.
            let io_paused = self.in_retry_at.is_some();
            let want_in = self.pending_in.is_empty() && !self.client_input_eof;
            let (wake_ev, listen_ev, io_ev) = {
                let mut pfds = Vec::with_capacity(3);
                // SAFETY: the eventfd lives in `self.shared`, which outlives this borrow.
                let wake = unsafe { BorrowedFd::borrow_raw(self.shared.wake.as_raw_fd()) };
                pfds.push(PollFd::new(wake, PollFlags::POLLIN));
                let listen_idx = self.fds.listener.as_ref().filter(|_| !bridged).map(|l| {
                    pfds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
                    pfds.len() - 1
                });
                let io_idx = self.io_fd().filter(|_| !io_paused).map(|fd| {
                    let mut ev = PollFlags::empty();
                    if want_in {
                        ev |= PollFlags::POLLIN;
                    }
                    if out_state == OutState::Blocked {
                        ev |= PollFlags::POLLOUT;
                    }
                    pfds.push(PollFd::new(fd, ev));
                    pfds.len() - 1
                });
                let poll_timeout = match timeout {
                    None => PollTimeout::NONE,
                    Some(d) => {
                        // Round up so a 0.4 ms remainder does not turn into a busy loop.
                        let ms = d.as_micros().div_ceil(1000);
                        PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::MAX)
                    }
                };
                match poll(&mut pfds, poll_timeout) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "console poll failed; console stopped");
                        break;
                    }
                }
                let ev = |i: Option<usize>| {
                    i.and_then(|i| pfds[i].revents())
                        .unwrap_or(PollFlags::empty())
                };
                (ev(Some(0)), ev(listen_idx), ev(io_idx))
            };

            if !wake_ev.is_empty() {
                // Only resets the counter; EAGAIN means it was already zero.
                let _ = self.shared.wake.read();
            }
            // Client or pty events first, so a client that just left is gone before accept.
            if !io_ev.is_empty() {
                self.handle_io_events(io_ev, &mut in_buf);
            }
            if !listen_ev.is_empty() {
                self.accept_clients();
            }
        }
    }

    /// The fd output goes to and input comes from, if any.
    fn io_fd(&self) -> Option<BorrowedFd<'_>> {
        match self.kind {
            Kind::Socket { .. } => self.fds.client.as_ref().map(AsFd::as_fd),
            Kind::Pty => self.fds.pty_master.as_ref().map(AsFd::as_fd),
            Kind::File { .. } => None,
        }
    }

    fn out_fd(&self) -> Option<BorrowedFd<'_>> {
        match self.kind {
            Kind::File { .. } => self.fds.file.as_ref().map(AsFd::as_fd),
            _ => self.io_fd(),
        }
    }

    /// Writes buffered output until it is empty or the destination is full.
    fn pump_output(&mut self) -> OutState {
        loop {
            if self.out_fd().is_none() {
                self.shared.out().waiting = false;
                return OutState::Parked;
            }
            if let Some(t) = self.out_retry_at {
                if Instant::now() < t {
                    return OutState::Parked;
                }
                self.out_retry_at = None;
            }
            let seq = {
                let mut out = self.shared.out();
                if out.data.is_empty() {
                    out.waiting = true;
                    return OutState::Idle;
                }
                out.waiting = false;
                out.peek(&mut self.scratch)
            };
            let Some(fd) = self.out_fd() else {
                return OutState::Parked;
            };
            let res = match self.kind {
                // MSG_NOSIGNAL: a vanished client must give EPIPE, not SIGPIPE.
                Kind::Socket { .. } => send(
                    fd.as_raw_fd(),
                    &self.scratch,
                    MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                ),
                _ => nix::unistd::write(fd, &self.scratch),
            };
            let res = match res {
                // A zero-length write of a non-empty buffer: treat like an error, never spin.
                Ok(0) => Err(Errno::EIO),
                other => other,
            };
            match res {
                Ok(n) => {
                    self.shared.out().consume(seq, n);
                    if std::mem::take(&mut self.file_failing) {
                        tracing::info!("console file writes work again");
                    }
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return OutState::Blocked,
                Err(e) => match &self.kind {
                    Kind::Socket { .. } => {
                        tracing::debug!(error = %e, "console client write failed");
                        self.disconnect_client();
                    }
                    Kind::Pty => {
                        tracing::debug!(error = %e, "console pty write failed; retrying");
                        self.out_retry_at = Some(Instant::now() + PTY_RETRY);
                    }
                    Kind::File { path } => {
                        if !self.file_failing {
                            tracing::warn!(path = %path.display(), error = %e,
                                "cannot write console output to file; keeping it buffered \
                                 (oldest dropped when full) and retrying every second");
                            self.file_failing = true;
                        }
                        self.out_retry_at = Some(Instant::now() + FILE_RETRY);
                    }
                },
            }
        }
    }

    /// Offers pending input to the sink. Returns whether input waits for a sink retry.
    fn pump_input(&mut self) -> bool {
        if self.pending_in.is_empty() {
            return false;
        }
        let mut guard = self.shared.sink();
        let Some(sink) = guard.as_mut() else {
            // Kept until a sink is set; set_input_sink signals the eventfd.
            return false;
        };
        while !self.pending_in.is_empty() {
            let (chunk, _) = self.pending_in.as_slices();
            let taken = sink(chunk).min(chunk.len());
            if taken == 0 {
                return true;
            }
            self.pending_in.drain(..taken);
        }
        false
    }

    fn handle_io_events(&mut self, ev: PollFlags, in_buf: &mut [u8]) {
        match self.kind {
            Kind::Socket { .. } => {
                if ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL) {
                    self.disconnect_client();
                } else if ev.contains(PollFlags::POLLIN) && self.pending_in.is_empty() {
                    self.read_input(in_buf);
                }
            }
            Kind::Pty => {
                if ev.contains(PollFlags::POLLIN) && self.pending_in.is_empty() {
                    self.read_input(in_buf);
                } else if ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                    // Not expected while the slave is held open; do not spin on it.
                    self.in_retry_at = Some(Instant::now() + PTY_RETRY);
                }
            }
            Kind::File { .. } => {}
        }
    }

    /// Reads one chunk of input from the client or pty into `pending_in`.
    fn read_input(&mut self, in_buf: &mut [u8]) {
        let Some(fd) = self.io_fd() else { return };
        match nix::unistd::read(fd, in_buf) {
            Ok(0) => match self.kind {
                Kind::Socket { .. } => {
                    // Half-close: the client may still read output, keep it until it hangs up.
                    tracing::debug!("console client closed its input side");
                    self.client_input_eof = true;
                }
                _ => self.in_retry_at = Some(Instant::now() + PTY_RETRY),
            },
            Ok(n) => self.pending_in.extend(&in_buf[..n]),
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
            Err(e) => match self.kind {
                Kind::Socket { .. } => {
                    tracing::debug!(error = %e, "console client read failed");
                    self.disconnect_client();
                }
                _ => {
                    tracing::debug!(error = %e, "console pty read failed; retrying");
                    self.in_retry_at = Some(Instant::now() + PTY_RETRY);
                }
            },
        }
    }

    /// Drops the client after keeping what it sent before hanging up; output is buffered again.
    fn disconnect_client(&mut self) {
        let Some(client) = self.fds.client.take() else {
            return;
        };
        let mut buf = [0u8; IN_CHUNK];
        while !self.client_input_eof && self.pending_in.len() < HANGUP_INPUT_LIMIT {
            match nix::unistd::read(&client, &mut buf) {
                Ok(0) => break,
                Ok(n) => self.pending_in.extend(&buf[..n]),
                Err(Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        {
            // Writers read the number under the output lock: retire it there before the close.
            let _out = self.shared.out();
            self.shared.client_fd.store(-1, Ordering::SeqCst);
        }
        drop(client);
        self.client_input_eof = false;
        self.shared.client_connected.store(false, Ordering::SeqCst);
        if let Kind::Socket { path } = &self.kind {
            tracing::info!(path = %path.display(),
                "console client detached; buffering guest output until the next client");
        }
    }

    /// Accepts waiting connections: the first becomes the client if none is attached, the rest
    /// get the busy line and are closed.
    fn accept_clients(&mut self) {
        let Kind::Socket { path } = &self.kind else {
            return;
        };
        let Some(listener) = self.fds.listener.as_ref() else {
            return;
        };
        loop {
            let raw = match accept4(
                listener.as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(fd) => fd,
                Err(Errno::EINTR) | Err(Errno::ECONNABORTED) => continue,
                Err(Errno::EAGAIN) => return,
                Err(e) => {
                    // E.g. EMFILE: the connection stays queued; retry on the next event.
                    tracing::warn!(path = %path.display(), error = %e,
                        "cannot accept a console client");
                    return;
                }
            };
            // SAFETY: accept4 succeeded, so `raw` is a new fd that nothing else owns.
            let conn = unsafe { OwnedFd::from_raw_fd(raw) };
            if self.fds.client.is_some() {
                let line = format!("{BUSY_PREFIX}{}\n", path.display());
                let _ = send(
                    conn.as_raw_fd(),
                    line.as_bytes(),
                    MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                );
                tracing::warn!(path = %path.display(),
                    "refused a second console client: one is already attached");
                continue;
            }
            let (buffered, dropped) = {
                let out = self.shared.out();
                (out.data.len(), out.dropped)
            };
            tracing::info!(path = %path.display(), buffered,
                dropped_since_last_client = dropped - self.reported_dropped.min(dropped),
                "console client attached");
            self.reported_dropped = dropped;
            self.shared
                .client_fd
                .store(conn.as_raw_fd(), Ordering::SeqCst);
            self.fds.client = Some(conn);
            self.client_input_eof = false;
            self.shared.client_connected.store(true, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::AtomicUsize;

    const LIMIT: Duration = Duration::from_secs(20);

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "vmmd-console-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + LIMIT;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn connect(path: &Path) -> UnixStream {
        let s = UnixStream::connect(path).expect("connect to console socket");
        s.set_read_timeout(Some(LIMIT)).expect("set timeout");
        s
    }

    fn read_exact_bytes(r: &mut impl Read, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        r.read_exact(&mut buf).expect("read console output");
        buf
    }

    /// A sink collecting input, accepting at most `per_call` bytes per call (0 every other call
    /// when `stutter`).
    fn collecting_sink(per_call: usize, stutter: bool) -> (InputSink, Arc<Mutex<Vec<u8>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = Arc::clone(&got);
        let mut refuse_next = false;
        let sink: InputSink = Box::new(move |bytes: &[u8]| {
            if stutter {
                refuse_next = !refuse_next;
                if !refuse_next {
                    return 0;
                }
            }
            let n = bytes.len().min(per_call);
            g.lock().unwrap().extend_from_slice(&bytes[..n]);
            n
        });
        (sink, got)
    }

    fn socket_console(dir: &TempDir, cap: usize) -> (Console, PathBuf) {
        let path = dir.path("console.sock");
        let c = Console::open(&SerialBackendSpec::Socket(path.clone()), cap).expect("open");
        (c, path)
    }

    #[test]
    fn parse_and_display_round_trip() {
        for s in [
            "socket=/run/vmmd/a.sock",
            "file=/var/log/x.log",
            "pty",
            "null",
        ] {
            let spec: SerialBackendSpec = s.parse().expect("parse");
            assert_eq!(spec.to_string(), s);
        }
        assert_eq!(
            "socket=/p".parse::<SerialBackendSpec>().unwrap(),
            SerialBackendSpec::Socket("/p".into())
        );
        assert_eq!(
            "file=a=b".parse::<SerialBackendSpec>().unwrap(),
            SerialBackendSpec::File("a=b".into())
        );
    }

    #[test]
    fn parse_errors() {
        let e = "foo".parse::<SerialBackendSpec>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown serial backend \"foo\": use socket=PATH, file=PATH, pty or null"
        );
        for s in ["socket", "socket=", "file", "file="] {
            assert!(matches!(
                s.parse::<SerialBackendSpec>(),
                Err(ConsoleError::MissingPath { .. })
            ));
        }
        assert!(matches!(
            "pty=/dev/x".parse::<SerialBackendSpec>(),
            Err(ConsoleError::UnexpectedPath { backend: "pty" })
        ));
        assert!(matches!(
            "".parse::<SerialBackendSpec>(),
            Err(ConsoleError::UnknownBackend(_))
        ));
        assert!(matches!(
            Console::open(&SerialBackendSpec::Null, 0),
            Err(ConsoleError::ZeroBuffer)
        ));
    }

    #[test]
    fn output_before_connect_is_delivered_in_order() {
        let dir = TempDir::new("order");
        let (console, path) = socket_console(&dir, DEFAULT_BUFFER_BYTES);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut w = console.writer();
        w.write_all(b"hello ").unwrap();
        w.clone().write_all(b"world\n").unwrap();
        assert!(!console.client_connected());
        let mut client = connect(&path);
        assert_eq!(read_exact_bytes(&mut client, 12), b"hello world\n");
        // Output while attached flows straight through.
        for i in 0..1000u32 {
            w.write_all(format!("{i};").as_bytes()).unwrap();
        }
        let expect: String = (0..1000u32).map(|i| format!("{i};")).collect();
        assert_eq!(
            read_exact_bytes(&mut client, expect.len()),
            expect.as_bytes()
        );
        assert_eq!(console.dropped_bytes(), 0);
        let names: Vec<String> = console.raw_fds().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"console-listener".to_owned()));
        wait_until("client attached", || console.client_connected());
        assert!(console.raw_fds().iter().any(|(n, _)| n == "console-client"));

        // After the client leaves, output is buffered again for the next one.
        drop(client);
        wait_until("client detached", || !console.client_connected());
        w.write_all(b"again\n").unwrap();
        let mut client = connect(&path);
        assert_eq!(read_exact_bytes(&mut client, 6), b"again\n");

        drop(console);
        assert!(!path.exists(), "socket file removed on drop");
    }

    #[test]
    fn full_buffer_drops_oldest_and_counts() {
        let dir = TempDir::new("bound");
        let (console, path) = socket_console(&dir, 16);
        let mut w = console.writer();
        w.write_all(b"0123456789").unwrap();
        w.write_all(b"abcdefghij").unwrap();
        assert_eq!(console.dropped_bytes(), 4);
        w.write_all(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ").unwrap();
        assert_eq!(console.dropped_bytes(), 4 + 26);
        assert_eq!(console.buffered_bytes(), 16);
        let mut client = connect(&path);
        assert_eq!(read_exact_bytes(&mut client, 16), b"KLMNOPQRSTUVWXYZ");
        w.write_all(b"!").unwrap();
        assert_eq!(read_exact_bytes(&mut client, 1), b"!");
        assert_eq!(console.dropped_bytes(), 30);
    }

    #[test]
    fn slow_client_never_blocks_the_writer() {
        let dir = TempDir::new("slow");
        let (console, path) = socket_console(&dir, 4096);
        let _client = connect(&path); // never reads
        wait_until("client attached", || console.client_connected());
        let mut w = console.writer();
        let chunk = [b'x'; 4096];
        let total = 4 << 20;
        let start = Instant::now();
        for _ in 0..total / chunk.len() {
            w.write_all(&chunk).unwrap();
        }
        assert!(start.elapsed() < LIMIT);
        assert!(console.buffered_bytes() <= 4096);
        assert!(console.dropped_bytes() > 0);
    }

    #[test]
    fn second_client_is_told_busy_and_first_keeps_working() {
        let dir = TempDir::new("busy");
        let (console, path) = socket_console(&dir, DEFAULT_BUFFER_BYTES);
        let (sink, got) = collecting_sink(usize::MAX, false);
        console.set_input_sink(sink);
        let mut first = connect(&path);
        wait_until("first client attached", || console.client_connected());

        let mut second = connect(&path);
        let mut line = String::new();
        second.read_to_string(&mut line).expect("read busy line");
        assert_eq!(
            line,
            format!(
                "vmmd: console busy: another client is attached to {}\n",
                path.display()
            )
        );
        assert!(console.client_connected());

        console.writer().write_all(b"still here\n").unwrap();
        assert_eq!(read_exact_bytes(&mut first, 11), b"still here\n");
        first.write_all(b"typed").unwrap();
        wait_until("input", || got.lock().unwrap().as_slice() == b"typed");
    }

    #[test]
    fn input_reaches_sink_in_order_with_partial_accepts() {
        let dir = TempDir::new("input");
        let (console, path) = socket_console(&dir, DEFAULT_BUFFER_BYTES);
        let data: Vec<u8> = (0..6_000u32).map(|i| (i % 251) as u8).collect();
        let mut client = connect(&path);
        // Sent before any sink exists: kept until one is set.
        client.write_all(&data[..100]).unwrap();
        wait_until("client attached", || console.client_connected());
        let (sink, got) = collecting_sink(3, true);
        console.set_input_sink(sink);
        let writer = {
            let mut client = client.try_clone().unwrap();
            let rest = data[100..].to_vec();
            std::thread::spawn(move || client.write_all(&rest).unwrap())
        };
        wait_until("all input", || got.lock().unwrap().len() >= data.len());
        writer.join().unwrap();
        assert_eq!(*got.lock().unwrap(), data);
    }

    #[test]
    fn input_sent_just_before_hangup_is_kept() {
        let dir = TempDir::new("hangup");
        let (console, path) = socket_console(&dir, DEFAULT_BUFFER_BYTES);
        let (sink, got) = collecting_sink(1, false);
        console.set_input_sink(sink);
        {
            let mut client = connect(&path);
            client.write_all(b"VERIFY\n").unwrap();
        }
        wait_until("input", || got.lock().unwrap().as_slice() == b"VERIFY\n");
        wait_until("client detached", || !console.client_connected());
    }

    #[test]
    fn stale_socket_replaced_and_others_refused() {
        let dir = TempDir::new("stale");
        let path = dir.path("c.sock");
        drop(UnixListener::bind(&path).unwrap()); // leaves a stale socket file
        let c = Console::open(&SerialBackendSpec::Socket(path.clone()), 64).expect("open");
        // A live one is not stolen.
        assert!(matches!(
            Console::open(&SerialBackendSpec::Socket(path.clone()), 64),
            Err(ConsoleError::SocketInUse { .. })
        ));
        drop(c);
        let regular = dir.path("regular");
        std::fs::write(&regular, b"x").unwrap();
        assert!(matches!(
            Console::open(&SerialBackendSpec::Socket(regular.clone()), 64),
            Err(ConsoleError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&regular).unwrap(), b"x");
        let long = dir.path(&"x".repeat(200));
        assert!(matches!(
            Console::open(&SerialBackendSpec::Socket(long), 64),
            Err(ConsoleError::SocketPathTooLong { .. })
        ));
    }

    #[test]
    fn file_backend_appends() {
        let dir = TempDir::new("file");
        let path = dir.path("serial.log");
        std::fs::write(&path, b"old\n").unwrap();
        let console = Console::open(&SerialBackendSpec::File(path.clone()), 1024).expect("open");
        console.writer().write_all(b"new ").unwrap();
        wait_until("file output", || {
            std::fs::read(&path).unwrap() == b"old\nnew "
        });
        console.writer().write_all(b"line\n").unwrap();
        drop(console); // flushes what is left
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nnew line\n");

        let fresh = dir.path("fresh.log");
        let console = Console::open(&SerialBackendSpec::File(fresh.clone()), 1024).expect("open");
        assert!(console.raw_fds().iter().any(|(n, _)| n == "console-file"));
        console.writer().write_all(b"x").unwrap();
        drop(console);
        assert_eq!(std::fs::read(&fresh).unwrap(), b"x");
    }

    #[test]
    fn null_backend_discards() {
        let console = Console::open(&SerialBackendSpec::Null, 16).expect("open");
        console.writer().write_all(&[0u8; 100]).unwrap();
        assert_eq!(console.dropped_bytes(), 0);
        assert_eq!(console.buffered_bytes(), 0);
        assert!(console.pty_path().is_none());
        assert!(console.raw_fds().is_empty());
        assert_eq!(console.spec(), &SerialBackendSpec::Null);
    }

    #[test]
    fn pty_round_trip() {
        let console = Console::open(&SerialBackendSpec::Pty, 1024).expect("open pty");
        let slave_path = console.pty_path().expect("pty path").to_owned();
        let names: Vec<String> = console.raw_fds().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"console-pty-master".to_owned()));
        let (sink, got) = collecting_sink(2, true);
        console.set_input_sink(sink);

        // Output written while nobody has the slave open is not lost.
        console.writer().write_all(b"boot\r\n").unwrap();
        let slave = open(
            &slave_path,
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .expect("open slave");
        let mut slave = File::from(slave);
        console.writer().write_all(b"ready\n").unwrap();
        let mut got_out = Vec::new();
        let deadline = Instant::now() + LIMIT;
        while got_out.len() < 12 {
            assert!(Instant::now() < deadline, "timed out reading the pty");
            let mut pfd = [PollFd::new(slave.as_fd(), PollFlags::POLLIN)];
            if poll(&mut pfd, PollTimeout::from(100u16)).unwrap() == 0 {
                continue;
            }
            let mut buf = [0u8; 64];
            let n = slave.read(&mut buf).unwrap();
            got_out.extend_from_slice(&buf[..n]);
        }
        // Raw mode: no CR/LF translation, no echo of our own output.
        assert_eq!(got_out, b"boot\r\nready\n");

        slave.write_all(b"cmd\r\n").unwrap();
        wait_until("pty input", || got.lock().unwrap().as_slice() == b"cmd\r\n");
        drop(console);
    }
}
