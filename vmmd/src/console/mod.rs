//! Host side of the guest's serial console (COM1): the backend, apart from the UART device.
//!
//! The 16550 UART model (`devices::serial`) writes guest output into a [`ConsoleWriter`], which
//! never blocks: bytes go into a bounded ring ([`ring`]) shared with one background thread
//! (`vmmd-console`, [`worker`]) that delivers them to the backend chosen with `--serial`
//! ([`spec`], [`backend`]). When the ring is full the oldest bytes are dropped and counted. Bytes
//! typed by the user are handed to the UART through an [`InputSink`]; the thread stops reading
//! from the backend while the sink has not taken everything (backpressure) and retries every 1 ms.
//!
//! All backend fds live in one [`ConsoleFds`] owned by the background thread, and the thread only
//! ever waits in `poll(2)` (listener, client or pty master, and an internal wake-up eventfd). Across
//! `execve` the fds travel as a [`ConsoleHandover`] and the undelivered bytes as a
//! [`ConsoleState`], saved and restored through [`crate::persist::Persist`] by a
//! [`StoppedConsole`]. In the cpr-exec bridge the thread's loop moves into a continuation
//! ([`crate::sys::relocate`]).

pub mod backend;
pub mod handover;
mod ring;
pub mod spec;
pub mod state;
mod worker;

use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::sys::relocate::{RelocateError, Relocation};

pub use backend::ConsoleFds;
pub use handover::ConsoleHandover;
pub use spec::SerialBackendSpec;
pub use state::{ConsoleArgs, ConsoleState, StoppedConsole};

use backend::{send_now, SocketFile};
use ring::OutBuf;
use worker::{Stopped, Worker};

/// Default size of the guest-output buffer kept while no client reads it.
#[allow(
    dead_code,
    reason = "for the --serial-buffer default; not every build uses it"
)]
pub const DEFAULT_BUFFER_BYTES: usize = 1 << 20;

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
    #[error("cannot hand the console to the cpr-exec bridge")]
    Bridge(#[source] RelocateError),
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
    /// Moves of the console thread's loop into the cpr-exec bridge and back. While it is away the
    /// loop accepts no new client (its fds would be its own).
    relocation: Relocation<Worker>,
    /// The pid of the continuation serving the console, or 0.
    bridge_pid: AtomicI32,
}

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
            // In the cpr-exec bridge the console loop competes for the CPU with the new
            // process's start: the vCPU sends straight to the client when nothing is queued.
            let rest = if out.data.is_empty() && self.shared.relocation.is_away() {
                let sent = send_now(self.shared.client_fd.load(Ordering::SeqCst), buf);
                out.head_seq += sent as u64;
                &buf[sent..]
            } else {
                buf
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
        let opened = backend::open_backend(spec)?;
        let mut console = Self::start(spec.clone(), opened.fds, buffer_bytes, Vec::new(), None)?;
        console.socket_file = opened.socket_file;
        console.pty_path = opened.pty_path;
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
        let fixed_fds = fds.fixed();
        let thread = worker::spawn(&spec, &shared, fds, pending_in)?;
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

    fn new_shared(
        spec: &SerialBackendSpec,
        fds: &ConsoleFds,
        buffer_bytes: usize,
    ) -> Result<Arc<Shared>, ConsoleError> {
        let wake =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ConsoleError::EventFd)?;
        Ok(Arc::new(Shared {
            out: Mutex::new(OutBuf::new(buffer_bytes)),
            sink: Mutex::new(None),
            wake,
            discard: AtomicBool::new(*spec == SerialBackendSpec::Null),
            stop: AtomicBool::new(false),
            client_connected: AtomicBool::new(fds.client.is_some()),
            client_fd: AtomicI32::new(fds.client.as_ref().map_or(-1, AsRawFd::as_raw_fd)),
            relocation: Relocation::new(),
            bridge_pid: AtomicI32::new(0),
        }))
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
            fixed_fds: h.fds.fixed(),
            spec: h.spec,
            shared,
            pty_path: h.pty_path,
            socket_file: h.socket_file,
            thread: None,
            quiesced: false,
            deferred: Some(h.fds),
        })
    }

    /// Starts the thread of a deferred console with the state the bridge stopped its console in
    /// (its undelivered output goes out first, then what the guest wrote since).
    pub fn start_deferred(&mut self, state: &ConsoleState) -> Result<(), ConsoleError> {
        let Some(fds) = self.deferred.take() else {
            return Ok(());
        };
        {
            // Output the guest wrote before this start comes after the bridge's.
            let mut out = self.shared.out();
            let mine: Vec<u8> = out.data.drain(..).collect();
            out.push(&state.output);
            out.push(&mine);
        }
        self.thread = worker::spawn(&self.spec, &self.shared, fds, state.input.clone())?;
        self.shared.signal();
        Ok(())
    }

    /// Moves the console thread's loop into a continuation child that outlives an `execve` and
    /// keeps only `keep` (and stdio) in its fd table; returns once the child serves. The child
    /// accepts no new client. Guest output keeps flowing.
    pub fn detach_to_bridge(
        &self,
        keep: Vec<RawFd>,
        timeout: Duration,
    ) -> Result<(), ConsoleError> {
        if self.thread.is_none() {
            return Ok(());
        }
        self.shared.relocation.ask_move(keep);
        self.shared.signal();
        if let Err(e) = self.shared.relocation.wait_moved(1, timeout) {
            // A loop that moved late comes back; one that could not start its child never left.
            self.reattach_from_bridge(timeout);
            return Err(ConsoleError::Bridge(e));
        }
        Ok(())
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
        if let Err(e) = self
            .shared
            .relocation
            .bring_back(timeout, || self.shared.signal())
        {
            tracing::warn!(error = %e, "the console loop did not come back from the bridge");
        }
    }

    /// In the bridge after the exec: stops the continuation and returns the state it stopped in
    /// (the guest output and input it had not delivered), for the successor's console. The fds
    /// stay open for the successor.
    pub fn finish_bridge(&self, timeout: Duration) -> ConsoleState {
        self.begin_finish_bridge().complete(timeout)
    }

    /// The first half of [`Console::finish_bridge`]: asks the continuation to stop, without
    /// waiting, so that its stop overlaps other work (the vCPUs' pause); guest output written
    /// meanwhile stays in the buffer and is taken by [`BridgeFinish::complete`].
    pub fn begin_finish_bridge(&self) -> BridgeFinish<'_> {
        BridgeFinish {
            console: self,
            slot: self.shared.relocation.ask_finish(|| self.shared.signal()),
        }
    }
}

/// A console whose bridge continuation was asked to stop ([`Console::begin_finish_bridge`]).
pub struct BridgeFinish<'a> {
    console: &'a Console,
    slot: Option<Arc<crate::sys::continuation::ResultSlot<Worker>>>,
}

impl BridgeFinish<'_> {
    /// Waits at most `timeout` for the continuation to stop and returns the state it stopped in.
    pub fn complete(self, timeout: Duration) -> ConsoleState {
        let mut input = Vec::new();
        if let Some(worker) = self.slot.and_then(|s| s.take_within(timeout)) {
            input = worker.pending_input();
            // Its fds are the successor's now: this copy of them closes with the bridge.
            std::mem::forget(worker);
        }
        ConsoleState {
            output: self.console.shared.out().take_all(),
            input,
        }
    }
}

impl Console {
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

    /// Every fd the console's loop uses (its backend and its wake-up eventfd): what a bridge
    /// continuation must keep.
    pub fn loop_fds(&self) -> Vec<RawFd> {
        let mut v: Vec<RawFd> = self.raw_fds().into_iter().map(|(_, fd)| fd).collect();
        v.push(self.shared.wake.as_raw_fd());
        v
    }

    /// The console's fds by name (`console-listener`, `console-client`, `console-pty-master`,
    /// `console-pty-slave`, `console-file`), for the CPR fd table. The client entry reflects the
    /// moment of the call: it can change while the thread runs.
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

    /// Stops the console thread without closing anything and returns its fds and state. The
    /// caller must make sure no more guest output arrives (vCPUs paused).
    pub fn quiesce(mut self) -> StoppedConsole {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.signal();
        let stopped = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(stopped)) => stopped,
            Some(Err(_)) => {
                tracing::error!(
                    "the console thread panicked; the console restarts without a client"
                );
                Stopped::nothing()
            }
            None => Stopped::nothing(),
        };
        let (output, buffer_bytes) = {
            let mut out = self.shared.out();
            (out.take_all(), out.capacity)
        };
        self.quiesced = true;
        StoppedConsole {
            handover: ConsoleHandover {
                spec: self.spec.clone(),
                fds: stopped.fds,
                pty_path: self.pty_path.take(),
                socket_file: self.socket_file.take(),
            },
            state: ConsoleState {
                output,
                input: stopped.pending_in,
            },
            buffer_bytes,
            shared: Some(Arc::clone(&self.shared)),
        }
    }

    /// Restarts a stopped console (after a failed exec, or in the new process).
    pub fn resume(stopped: StoppedConsole) -> Result<Console, ConsoleError> {
        let StoppedConsole {
            handover: h,
            state,
            buffer_bytes,
            shared,
        } = stopped;
        if buffer_bytes == 0 {
            return Err(ConsoleError::ZeroBuffer);
        }
        let mut console = Self::start(h.spec, h.fds, buffer_bytes, state.input, shared)?;
        console.socket_file = h.socket_file;
        console.pty_path = h.pty_path;
        if !state.output.is_empty() {
            console.shared.out().push(&state.output);
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
            file.remove();
        }
    }
}

#[cfg(test)]
mod tests;
