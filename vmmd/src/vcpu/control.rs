//! Pause/resume control shared by the VM and its vCPU threads.
//!
//! Pausing: the controller raises a flag, then sends `SIGRTMIN` to every vCPU thread. The signal handler
//! sets `kvm_run.immediate_exit` through a thread-local pointer, so a vCPU that was just about to enter
//! the guest returns at once instead of missing the kick. Each thread then parks on a condvar and is
//! counted as paused; vCPU ioctls to save or restore state are only made while all threads are parked.
//! Parked loops move into continuation children and back through [`crate::sys::relocate`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::sys::relocate::{RelocateError, Relocation};

use super::run::kick_signal;
use super::{VcpuError, VcpuEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Exit,
}

/// What a parked vCPU loop is told to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Park {
    Run,
    Exit,
    Detach,
}

struct ControlState {
    request: Request,
    parked: usize,
}

/// Who runs a vCPU's loop, for kicks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KickTarget {
    /// A thread of this process.
    Thread(libc::pthread_t),
    /// A continuation child (its own thread group).
    Task(libc::pid_t),
}

/// Pause/resume control shared by the VM and its vCPU threads.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    pause_flag: AtomicBool,
    pub(super) threads: Mutex<Vec<KickTarget>>,
    /// Moves of the parked vCPU loops into continuation children (see `cpr::bridge`) and back.
    pub(super) relocation: Relocation<()>,
    /// Guest requests and failures seen by continuations, which cannot reach the event channel;
    /// the successor re-raises them.
    pub(super) bridged_events: Mutex<Vec<VcpuEvent>>,
    /// When the first vCPU went back into the guest after the last resume (0: not yet).
    first_run_ns: std::sync::atomic::AtomicU64,
}

impl VcpuControl {
    /// A control whose vCPUs start paused.
    pub fn new_paused() -> Arc<VcpuControl> {
        Arc::new(VcpuControl {
            state: Mutex::new(ControlState {
                request: Request::Pause,
                parked: 0,
            }),
            changed: Condvar::new(),
            pause_flag: AtomicBool::new(true),
            threads: Mutex::new(Vec::new()),
            relocation: Relocation::new(),
            bridged_events: Mutex::new(Vec::new()),
            first_run_ns: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request(&self, r: Request) {
        let mut st = self.lock();
        if st.request != Request::Exit {
            st.request = r;
        }
        self.pause_flag
            .store(st.request != Request::Run, Ordering::Release);
        self.changed.notify_all();
    }

    /// Wakes the parked loops to look at a new relocation request.
    fn wake_parked(&self) {
        let _st = self.lock();
        self.changed.notify_all();
    }

    pub(super) fn kick_all(&self) {
        let me = pthread_self();
        for &t in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            match t {
                KickTarget::Thread(t) if t != me => {
                    // SAFETY: `t` is the pthread of a vCPU thread that is alive until `join` in
                    // `VcpuSet::shutdown`, which clears the list first.
                    unsafe { libc::pthread_kill(t, kick_signal()) };
                }
                KickTarget::Thread(_) => {}
                KickTarget::Task(pid) => {
                    // SAFETY: tgkill to a continuation child of this process; it is in the list
                    // only while it runs a vCPU loop (a stale pid gets ESRCH at worst).
                    unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, kick_signal()) };
                }
            }
        }
    }

    pub(super) fn set_kick_target(&self, id: u8, target: KickTarget) {
        let mut list = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = list.get_mut(usize::from(id)) {
            *slot = target;
        }
    }

    /// Moves the loops of `count` parked vCPUs into continuation children (which keep only `keep`
    /// and stdio in their fd tables) and returns their pids; the vCPUs stay paused. On failure
    /// every loop is back on its thread.
    pub fn detach(
        &self,
        count: usize,
        keep: Vec<libc::c_int>,
        timeout: Duration,
    ) -> Result<Vec<libc::pid_t>, VcpuError> {
        self.relocation.ask_move(keep);
        self.wake_parked();
        if let Err(source) = self.relocation.wait_moved(count, timeout) {
            // Whatever got detached comes back, paused.
            self.reattach(count, timeout)?;
            return Err(VcpuError::Detach { source });
        }
        Ok(self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|t| match t {
                KickTarget::Task(pid) => Some(*pid),
                KickTarget::Thread(_) => None,
            })
            .collect())
    }

    /// Ends the continuations of paused vCPUs: their threads take the loops back, paused.
    pub fn reattach(&self, count: usize, timeout: Duration) -> Result<(), VcpuError> {
        if let Err(e) = self.relocation.bring_back(timeout, || self.wake_parked()) {
            let missing = match e {
                RelocateError::NotBack { away, .. } => away,
                _ => self.relocation.moved(),
            };
            return Err(VcpuError::PauseTimeout { missing, timeout });
        }
        let (st, done) = self.wait_until(timeout, |st| st.parked >= count);
        if !done {
            let missing = count.saturating_sub(st.parked);
            return Err(VcpuError::PauseTimeout { missing, timeout });
        }
        Ok(())
    }

    /// Waits at most `timeout` for `done` to hold; returns the state and whether it held.
    fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&ControlState) -> bool,
    ) -> (MutexGuard<'_, ControlState>, bool) {
        let (st, waited) = self
            .changed
            .wait_timeout_while(self.lock(), timeout, |st| !done(st))
            .unwrap_or_else(|e| e.into_inner());
        let held = !waited.timed_out() || done(&st);
        (st, held)
    }

    /// In the bridge after a take-over: the (parked) continuation loops exit.
    pub fn end_bridged(&self) {
        self.exit();
    }

    /// Takes the guest requests and failures that continuations recorded.
    pub fn take_bridged_events(&self) -> Vec<VcpuEvent> {
        std::mem::take(
            &mut *self
                .bridged_events
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Stops every vCPU and waits until all are parked.
    pub fn pause(&self, count: usize, timeout: Duration) -> Result<(), VcpuError> {
        self.request(Request::Pause);
        self.kick_all();
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while st.parked < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing = count - st.parked;
                drop(st);
                self.request(Request::Run);
                return Err(VcpuError::PauseTimeout { missing, timeout });
            }
            st = self
                .changed
                .wait_timeout(st, left.min(Duration::from_millis(5)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if st.parked < count {
                drop(st);
                // A kick can race with a thread entering KVM_RUN; kick again until all are parked.
                self.kick_all();
                st = self.lock();
            }
        }
        Ok(())
    }

    /// Called by a vCPU thread that must stop the whole VM itself (guest suspend or poweroff).
    pub fn pause_from_vcpu(&self) {
        self.request(Request::Pause);
        self.kick_all();
    }

    /// Lets every vCPU run.
    pub fn resume(&self) {
        self.first_run_ns.store(0, Ordering::Release);
        self.request(Request::Run);
    }

    /// CLOCK_MONOTONIC (ns) at which the first vCPU left its park to enter the guest after the
    /// last [`VcpuControl::resume`], waiting at most `timeout` for it.
    pub fn first_run_ns(&self, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let ns = self.first_run_ns.load(Ordering::Acquire);
            if ns != 0 {
                return Some(ns);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::yield_now();
        }
    }

    pub(super) fn exit(&self) {
        let mut st = self.lock();
        st.request = Request::Exit;
        self.pause_flag.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// Parks the calling vCPU loop while a pause is requested, after `before_park`, and says what
    /// to do next. A loop on its thread (`on_thread`) may be told to detach; a loop in a
    /// continuation is told to exit when its thread takes it back.
    pub(super) fn park_if_requested(&self, on_thread: bool, before_park: impl FnOnce()) -> Park {
        if !self.pause_flag.load(Ordering::Acquire) {
            // A thread that first gets here after the resume never parked: it enters now.
            if self.first_run_ns.load(Ordering::Relaxed) == 0 {
                self.note_first_run();
            }
            return Park::Run;
        }
        before_park();
        let mut st = self.lock();
        st.parked += 1;
        self.changed.notify_all();
        let next = loop {
            match st.request {
                Request::Run => break Park::Run,
                Request::Exit => break Park::Exit,
                Request::Pause if on_thread && self.relocation.must_move() => break Park::Detach,
                Request::Pause if !on_thread && self.relocation.must_leave() => break Park::Exit,
                Request::Pause => st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        };
        st.parked -= 1;
        self.changed.notify_all();
        drop(st);
        if next == Park::Run {
            self.note_first_run();
        }
        next
    }

    fn note_first_run(&self) {
        let _ = self.first_run_ns.compare_exchange(
            0,
            crate::sys::fd::monotonic_ns(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

pub(super) fn pthread_self() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}
