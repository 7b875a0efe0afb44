//! cpr-exec with the bridge (the default; module `crate::cpr::bridge` has the protocol): the
//! guest keeps running in `CLONE_VM` continuations of this process across the `execve`, and pauses
//! only while its loops move (the hand-off) and while the new process takes it over.
//!
//! | step | what it does | compensation |
//! | --- | --- | --- |
//! | clear the state file | an earlier update's state must not be taken for this one's | — |
//! | console to the bridge | the console loop moves into a continuation | it comes back |
//! | pause, vCPUs to the bridge, resume | the hand-off pause: each vCPU loop moves into a continuation | the loops are parked and come back |
//! | control continuation | waits on a socket pair for the new process's take-over | abort: it ends |
//! | hand over and exec | the hand-over (fds, pidfds of the bridge's processes, the state memfd) in a memfd; `execve` | close-on-exec set again |
//!
//! In the bridge, after the exec: the take-over stops the vCPUs, takes the console's undelivered
//! bytes, writes the state into the memfd and answers ([`BridgeView::take_over`]). If the new
//! process dies first, the bridge writes the state to the operator's state file instead.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cpr_common::state::{write_state_without_ram, StateFileError};
use tracing::warn;

use super::{process, Compensation, Compensations};
use crate::console::{Console, ConsoleState};
use crate::cpr::bridge;
use crate::cpr::CprError;
use crate::state::handover::{fd_names, BridgeReply, BridgedEvent};
use crate::state::SavedRunState;
use crate::sys::continuation::Continuation;
use crate::sys::fd::monotonic_ns;
use crate::vcpu::VcpuControl;
use crate::vm::snapshot::SnapshotSource;
use crate::vm::{MigrationReport, PhaseClock, UpdateStatus, Vm, VmError, PAUSE_TIMEOUT};

/// How long moving the console or vCPU loops into (or out of) the bridge may take.
pub(crate) const BRIDGE_MOVE_TIMEOUT: Duration = Duration::from_secs(5);

impl Vm {
    /// Runs the bridged path's steps; returns only when one failed, after every compensation ran.
    pub(super) fn exec_bridged(
        &mut self,
        path: &Path,
        saved: SavedRunState,
        previous: &OwnedFd,
        clock: &mut PhaseClock,
    ) -> CprError {
        let mut undo = Compensations::default();
        let err = self.bridged_steps(path, saved, previous, clock, &mut undo);
        undo.unwind(self).unwrap_or(err)
    }

    fn bridged_steps(
        &mut self,
        path: &Path,
        saved: SavedRunState,
        previous: &OwnedFd,
        clock: &mut PhaseClock,
        undo: &mut Compensations,
    ) -> CprError {
        // A state file from an earlier update must not be taken for this one's: the bridge writes
        // it at the take-over (or when the new process dies first).
        if let Err(source) = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
        {
            return StateFileError::Io {
                path: path.to_path_buf(),
                op: "truncate",
                source,
            }
            .into();
        }
        let count = self.vcpus.count();
        let was_running = saved == SavedRunState::Running;

        // The console loop to the bridge.
        self.update_status = UpdateStatus::InProgress("moving the console to the bridge");
        let Some(console) = self.console.as_ref() else {
            return VmError::Internal("the console is missing").into();
        };
        let keep = self.bridge_fds();
        if let Err(e) = console.detach_to_bridge(keep.clone(), BRIDGE_MOVE_TIMEOUT) {
            return VmError::from(e).into();
        }
        let console_pid = console.bridge_pid();
        undo.push(Compensation::ConsoleFromBridge);
        clock.lap("console-bridge");

        // The hand-off pause: the vCPU loops to the bridge.
        self.update_status = UpdateStatus::InProgress("moving the vCPUs to the bridge");
        if was_running {
            // Also when the pause fails half-way: a vCPU that did park must run again.
            undo.push(Compensation::ResumeVcpus);
            if let Err(e) = self.pause_vcpus() {
                return e.into();
            }
        }
        let paused_at = monotonic_ns();
        let vcpu_pids = match self
            .vcpus
            .control
            .detach(count, keep.clone(), BRIDGE_MOVE_TIMEOUT)
        {
            Ok(p) => p,
            Err(e) => return VmError::from(e).into(),
        };
        undo.push(Compensation::VcpusFromBridge);
        // The hand-off pause ends when a vCPU is back in the guest, now in the bridge.
        let handoff_end = if was_running {
            self.vcpus.control.resume();
            self.vcpus
                .control
                .first_run_ns(Duration::from_millis(50))
                .unwrap_or_else(monotonic_ns)
        } else {
            monotonic_ns()
        };
        let handoff_us = handoff_end.saturating_sub(paused_at) / 1000;
        clock.lap("handoff");

        // The control continuation.
        let (mine, theirs) = match std::os::unix::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                return CprError::BridgeSetup(format!("cannot create the control socket: {e}"))
            }
        };
        let state = match state_memfd() {
            Ok(fd) => fd,
            Err(e) => return CprError::BridgeSetup(format!("cannot create the state memfd: {e}")),
        };
        let mut keep = keep;
        keep.extend([theirs.as_raw_fd(), state.as_raw_fd()]);
        // If the new process dies before the take-over, the bridge runs this binary again, which
        // takes the guest over the way the new process would have.
        let rollback = self.prepare_bridge_rollback(path, paused_at, previous, state.as_raw_fd());
        // The rollback's own fds move into the continuation with it; this process's copies are
        // closed below if the exec fails (and by the exec, close-on-exec, if it succeeds).
        let rollback_fds = rollback.as_ref().map(BridgeRollback::own_fds);
        if let Some(r) = &rollback {
            keep.extend(r.fds());
        }
        // SAFETY: see `BridgeView::of`: this thread keeps the VM alive and untouched until the
        // continuation ends (`control.wait()` below) or the exec replaced this process's image.
        let view = unsafe { BridgeView::of(self) };
        let task = BridgeTask {
            view,
            ctl: theirs.as_raw_fd(),
            state: PathBuf::from(format!("/proc/self/fd/{}", state.as_raw_fd())),
            path: path.to_path_buf(),
            saved,
            rollback: RefCell::new(rollback),
            patience: self.config.cpr_takeover_timeout,
            exec_pid: std::process::id() as libc::pid_t,
        };
        self.update_status = UpdateStatus::InProgress("exec");
        let control = match Continuation::start(task, bridge_control_main, &keep) {
            Ok(c) => c,
            Err((e, _)) => return CprError::BridgeSetup(e.to_string()),
        };

        // Hand over and exec. From here to the exec this thread shares its TLS with the control
        // continuation, which only waits on the socket until the new process (or the abort below)
        // writes to it.
        let mut pids = vcpu_pids;
        pids.extend(console_pid);
        pids.push(control.pid());
        let err = self.exec_to_bridge(
            path,
            paused_at,
            handoff_us,
            previous,
            [mine.as_raw_fd(), state.as_raw_fd()],
            pids,
        );
        // The exec failed: the control continuation ends, then the loops come back (`undo`).
        if let Err(e) = bridge::abort(&mine) {
            warn!(error = %e, "cannot tell the bridge that the exec failed");
        }
        control.wait();
        drop(theirs);
        for fd in rollback_fds.into_iter().flatten() {
            // SAFETY: fds this process opened for the rollback, whose owners moved into the
            // continuation (which closed only its own copies): nothing else here uses them.
            unsafe { libc::close(fd) };
        }
        err
    }

    /// The exec the bridge runs when the new process died before taking the guest over: this
    /// binary, with a hand-over whose bridge control socket is a fresh pair's end (the bridge
    /// serves the other) and `rollback_reason` set. None (and a warning) when it cannot be
    /// prepared: the bridge then falls back to saving the state file.
    fn prepare_bridge_rollback(
        &self,
        path: &Path,
        paused_at_ns: u64,
        previous: &OwnedFd,
        state: RawFd,
    ) -> Option<BridgeRollback> {
        let (process_end, bridge_end) = match std::os::unix::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "no rollback for a new process that dies before the take-over");
                return None;
            }
        };
        let mut fds = vec![
            (
                fd_names::BRIDGE_CONTROL.to_string(),
                process_end.as_raw_fd(),
            ),
            (fd_names::BRIDGE_STATE.to_string(), state),
        ];
        if let Some(c) = &self.console {
            fds.extend(c.raw_fds());
        }
        let handover = self.handover(path, paused_at_ns, previous).fds(fds).build();
        let reason = "the new binary exited (or was killed) before taking the guest over";
        match process::PreparedExec::rollback(&handover, reason) {
            Ok(Some(exec)) => Some(BridgeRollback {
                exec,
                process_end,
                bridge_end,
                stack: vec![0u8; ROLLBACK_STACK],
            }),
            Ok(None) => None,
            Err(e) => {
                warn!(error = %e, "no rollback for a new process that dies before the take-over");
                None
            }
        }
    }

    fn exec_to_bridge(
        &self,
        path: &Path,
        paused_at_ns: u64,
        handoff_us: u64,
        previous: &OwnedFd,
        [ctl, state]: [RawFd; 2],
        bridge_pids: Vec<libc::pid_t>,
    ) -> CprError {
        let mut pidfds = Vec::new();
        for &pid in &bridge_pids {
            match bridge::pidfd_open(pid) {
                Ok(fd) => pidfds.push(fd),
                Err(e) => {
                    return CprError::BridgeSetup(format!(
                        "pidfd_open of bridge process {pid}: {e}"
                    ))
                }
            }
        }
        let mut fds = vec![
            (fd_names::BRIDGE_CONTROL.to_string(), ctl),
            (fd_names::BRIDGE_STATE.to_string(), state),
        ];
        for (i, fd) in pidfds.iter().enumerate() {
            fds.push((
                format!("{}-{i}", fd_names::BRIDGE_TASK_PREFIX),
                fd.as_raw_fd(),
            ));
        }
        if let Some(c) = &self.console {
            fds.extend(c.raw_fds());
        }
        // Only the hand-off paused the guest; the rest ran beside it.
        let handover = self
            .handover(path, paused_at_ns, previous)
            .fds(fds)
            .phases(&[("handoff".into(), Duration::from_micros(handoff_us))])
            .build();
        // Under systemd the control continuation is the unit's main process until the new one
        // runs the guest (it names itself then): a new binary that dies is not the unit's end.
        if let Some(&control) = bridge_pids.last() {
            crate::notify::notify(&format!("MAINPID={control}"));
        }
        self.exec_with_handover(&handover, "cpr-exec: exec (guest running in the bridge)")
    }

    /// The fds the bridge's processes use: KVM, guest RAM, the console's and the UART's. Everything
    /// else (API connections above all) is closed in them, so that the exec closes it.
    fn bridge_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![
            self.kvm.as_raw_fd(),
            self.vm_fd.as_raw_fd(),
            self.ram.raw_fd(),
            self.devices.serial().irq_fd(),
        ];
        fds.extend_from_slice(self.vcpus.raw_fds());
        if let Some(c) = &self.console {
            fds.extend(c.loop_fds());
        }
        fds
    }
}

/// What the bridge's control continuation may touch of the VM: the vCPUs' control, what a
/// capture reads, and the console. It runs after this process's `execve`, on the same memory.
struct BridgeView {
    control: &'static VcpuControl,
    vcpus: usize,
    snapshot: SnapshotSource<'static>,
    console: Option<&'static Console>,
    /// The console's bytes of a take-over whose save failed, for the next try.
    console_kept: RefCell<Option<ConsoleState>>,
}

impl BridgeView {
    /// # Safety
    /// `vm` must stay alive and unused by its owner for as long as the view is used: until the
    /// control continuation ends, or forever after a successful `execve` (the old address space
    /// then lives on in the bridge's processes, and nothing in it frees the VM).
    unsafe fn of(vm: &Vm) -> BridgeView {
        // SAFETY: guaranteed by the caller; the references only outlive their borrow in time, never
        // the memory they point to.
        let vm: &'static Vm = unsafe { &*(vm as *const Vm) };
        BridgeView {
            control: &vm.vcpus.control,
            vcpus: vm.vcpus.count(),
            snapshot: vm.snapshot_source(),
            console: vm.console.as_ref(),
            console_kept: RefCell::new(None),
        }
    }

    /// Stops the guest and the console's continuation (at once), takes the console's undelivered
    /// bytes, writes the state to `path`, and answers with the guest events the bridge saw. A
    /// failed save lets the guest run on (its console bytes are kept for the next try).
    fn take_over(&self, path: &Path, saved: SavedRunState) -> BridgeReply {
        let paused_at_ns = monotonic_ns();
        let mut reply = BridgeReply {
            saved: Ok(()),
            paused_at_ns,
            phases: Vec::new(),
            guest_events: Vec::new(),
            legacy: None,
        };
        // The console's continuation stops while the vCPUs park; output written meanwhile stays
        // in its buffer and is taken below.
        let finishing = self.console.map(Console::begin_finish_bridge);
        let paused = self.control.pause(self.vcpus, PAUSE_TIMEOUT);
        let mut console = self.console_kept.borrow_mut().take().unwrap_or_default();
        if let Some(f) = finishing {
            let now = f.complete(BRIDGE_MOVE_TIMEOUT);
            console.output.extend_from_slice(&now.output);
            console.input.extend_from_slice(&now.input);
        }
        if let Err(e) = paused {
            *self.console_kept.borrow_mut() = Some(console);
            reply.saved = Err(e.to_string());
            return reply;
        }
        let lap = |phases: &mut Vec<(String, u64)>, name: &str, since: u64| {
            let now = monotonic_ns();
            phases.push((name.into(), now.saturating_sub(since) / 1000));
            now
        };
        let t = lap(&mut reply.phases, "bridge-pause", paused_at_ns);
        let written = self
            .snapshot
            .encode(saved, console.clone(), &mut MigrationReport::default())
            .map_err(|e| e.to_string())
            .and_then(|meta| {
                write_state_without_ram(path, &meta, false)
                    .map(drop)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            // The guest runs on in the bridge; the new process rolls back and asks again.
            *self.console_kept.borrow_mut() = Some(console);
            if saved == SavedRunState::Running {
                self.control.resume();
            }
            reply.saved = Err(e);
            return reply;
        }
        lap(&mut reply.phases, "save-state", t);
        reply.guest_events = self
            .control
            .take_bridged_events()
            .into_iter()
            .map(BridgedEvent::from)
            .collect();
        reply
    }
}

/// Stack of the short-lived child that execs the rollback (it only clears flags and execs).
const ROLLBACK_STACK: usize = 64 << 10;

/// The rollback the bridge runs when the new process died before the take-over.
struct BridgeRollback {
    exec: process::PreparedExec,
    /// The rolled-back process's end of its control socket (passed on by the exec).
    process_end: std::os::unix::net::UnixStream,
    /// The bridge's end, served once the rollback runs.
    bridge_end: std::os::unix::net::UnixStream,
    stack: Vec<u8>,
}

impl BridgeRollback {
    /// The fds it owns (the hand-over memfd and both socket ends), by number.
    fn own_fds(&self) -> [RawFd; 3] {
        [
            self.exec.handover_fd(),
            self.process_end.as_raw_fd(),
            self.bridge_end.as_raw_fd(),
        ]
    }

    /// What the control continuation must keep open for it.
    fn fds(&self) -> Vec<RawFd> {
        let mut v = self.exec.fds();
        v.extend([self.process_end.as_raw_fd(), self.bridge_end.as_raw_fd()]);
        v
    }

    /// In the control continuation: starts the rolled-back process (a `CLONE_VFORK` child that
    /// execs the previous binary; this task waits until it has) and returns the socket to serve
    /// its take-over on. Err when the exec failed.
    fn start(mut self) -> Result<std::os::unix::net::UnixStream, std::io::Error> {
        let arg = (&self.exec as *const process::PreparedExec)
            .cast_mut()
            .cast();
        // SAFETY: CLONE_VM | CLONE_VFORK: this task is suspended until the child has exec'd or
        // exited, so `self.exec` and the stack outlive every use the child makes of them; the
        // child runs only `rollback_child_main`, which calls async-signal-safe functions.
        let pid = unsafe {
            crate::sys::continuation::clone_vm(
                &mut self.stack,
                rollback_child_main,
                arg,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            )
        }?;
        let mut status = 0;
        // SAFETY: a non-blocking wait for our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Err(std::io::Error::other(format!(
                "the rollback exec of the previous binary failed (status {status})"
            )));
        }
        // Only the rolled-back process holds its end now: its death ends the serving again.
        drop(self.process_end);
        // The stack stays with the address space: the child ran on it (never freed here).
        std::mem::forget(self.stack);
        Ok(self.bridge_end)
    }
}

/// The vfork child of a bridge rollback: signals unblocked (the clone blocked them all), then the
/// exec. Allocation-free.
extern "C" fn rollback_child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: an empty sigset_t, then SIG_SETMASK of it: the exec'd binary starts with no signal
    // blocked.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    // SAFETY: `arg` is the `PreparedExec` of a `BridgeRollback` whose task is suspended until
    // this child execs or exits (CLONE_VFORK).
    let exec = unsafe { &*arg.cast::<process::PreparedExec>() };
    exec.exec_now();
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(127) }
}

/// What the bridge's control continuation works with.
struct BridgeTask {
    view: BridgeView,
    ctl: RawFd,
    /// The state memfd, as a path in the bridge's fd table.
    state: PathBuf,
    /// The operator's state file: where the state goes when the new process died first.
    path: PathBuf,
    saved: SavedRunState,
    /// Taken (once) when the new process dies before the take-over.
    rollback: RefCell<Option<BridgeRollback>>,
    /// How long the new process may take to ask for the guest.
    patience: Duration,
    /// The pid that execs the new binary (the new process's pid).
    exec_pid: libc::pid_t,
}

// SAFETY: the view's references are only used by the continuation, while the thread that owns the
// VM is blocked (until the continuation exits) or gone (after the exec); see `BridgeView::of`.
unsafe impl Send for BridgeTask {}

/// A memfd for the bridge's state file (close-on-exec: the exec path clears the flag).
fn state_memfd() -> std::io::Result<OwnedFd> {
    // SAFETY: memfd_create with a valid C string; the result is checked and owned below.
    let fd = unsafe { libc::memfd_create(c"vmmd-bridge-state".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The bridge's control continuation (see `cpr::bridge`): serves the new process's take-over,
/// then ends the vCPU loops. On an abort (the exec failed) it only returns: the old process takes
/// the loops back itself.
fn bridge_control_main(task: BridgeTask) {
    // SAFETY: the socket fd is this continuation's copy of the bridge end, open until it exits.
    let ctl = std::mem::ManuallyDrop::new(unsafe {
        <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(task.ctl)
    });
    let view = &task.view;
    let ended = bridge::serve(
        &ctl,
        task.patience,
        || view.take_over(&task.state, task.saved),
        || {
            // The new process died before taking the guest over: run this binary again, which
            // takes it over from the bridge.
            let rollback = task.rollback.borrow_mut().take();
            let failed = match rollback.map(BridgeRollback::start) {
                Some(Ok(ctl)) => return Some(ctl),
                Some(Err(e)) => format!(" ({e})"),
                None => String::new(),
            };
            // Nobody will take the guest: leave it stopped, in the state file, as a crash inside
            // the classic pause would (`vmmd --incoming file:PATH` on the same RAM resumes it).
            let reply = view.take_over(&task.path, task.saved);
            let msg = match reply.saved {
                Ok(()) => format!(
                    "vmmd cpr-exec bridge: the new process exited before taking the guest over and no rollback could start{failed}; the guest is stopped and its state is in {}\n",
                    task.path.display()
                ),
                Err(e) => format!(
                    "vmmd cpr-exec bridge: the new process exited before taking the guest over, and the state could not be saved to {}: {e}\n",
                    task.path.display()
                ),
            };
            // SAFETY: write(2) of a live buffer to stderr (no locks: other threads of the old
            // process may have died holding Rust's stderr lock).
            unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
            None
        },
        || {
            // The new process hangs: kill it (its end of the socket closes, the rollback follows).
            let msg = b"vmmd cpr-exec bridge: the new process did not take the guest over in time; killing it\n";
            // SAFETY: write(2) of a live buffer to stderr (no locks, as above); kill(2) of the
            // process that holds the other end of the control socket.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::kill(task.exec_pid, libc::SIGKILL);
            }
        },
    );
    if ended != bridge::Ended::Aborted {
        view.control.end_bridged();
    }
}
