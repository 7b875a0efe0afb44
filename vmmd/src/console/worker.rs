//! The console thread (`vmmd-console`): owns the backend's fds, moves guest output out of the ring
//! and user input into the UART's sink, and only ever waits in `poll(2)`. In the cpr-exec bridge
//! its loop runs in a continuation (see [`crate::sys::relocate`]).

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{accept4, send, MsgFlags, SockFlag};

use crate::sys::relocate::Moved;

use super::backend::ConsoleFds;
use super::ring::OUT_CHUNK;
use super::{ConsoleError, SerialBackendSpec, Shared};

/// Line sent to a second socket client before it is closed (followed by the path and a newline).
const BUSY_PREFIX: &str = "vmmd: console busy: another client is attached to ";
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

/// What the console thread gives back when it stops.
pub(super) struct Stopped {
    pub(super) fds: ConsoleFds,
    pub(super) pending_in: Vec<u8>,
}

impl Stopped {
    /// A thread that lost its fds (it panicked, or never ran).
    pub(super) fn nothing() -> Stopped {
        Stopped {
            fds: ConsoleFds::default(),
            pending_in: Vec::new(),
        }
    }
}

/// Starts the console thread serving `fds` for `spec` (none for `null`).
pub(super) fn spawn(
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

/// The loop in the bridge's continuation, until it is asked back or to finish.
fn serve_bridged(mut w: Worker) -> Worker {
    // No logging here: a thread the exec killed may have died holding the log writer's lock.
    let quiet = tracing::dispatcher::set_default(&tracing::Dispatch::none());
    w.serve(true);
    w.pump_output();
    drop(quiet);
    w
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
pub(super) struct Worker {
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
            if self.shared.stop.load(Ordering::SeqCst) || !self.shared.relocation.must_move() {
                break;
            }
            match self.continue_in_child() {
                Some(w) => self = w,
                None => {
                    tracing::error!("the console's bridge failed; the console stops");
                    return Stopped::nothing();
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
        let on_move = |pid: Option<libc::pid_t>| {
            shared.bridge_pid.store(pid.unwrap_or(0), Ordering::SeqCst);
        };
        match shared.relocation.run_moved(self, serve_bridged, on_move) {
            Moved::Returned(w) => w,
            // Not asked anymore, or the child could not start (the controller learns why).
            Moved::Stayed(w) => Some(w),
        }
    }

    /// Input read but not yet taken by the UART.
    pub(super) fn pending_input(&self) -> Vec<u8> {
        self.pending_in.iter().copied().collect()
    }

    /// The loop: until stopped, or told to detach (`bridged` false) or to return (`bridged` true).
    fn serve(&mut self, bridged: bool) {
        let shared = Arc::clone(&self.shared);
        let leave = || match bridged {
            true => shared.relocation.must_leave(),
            false => shared.relocation.must_move(),
        };
        let mut in_buf = vec![0u8; IN_CHUNK];
        while !self.shared.stop.load(Ordering::SeqCst) && !leave() {
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
