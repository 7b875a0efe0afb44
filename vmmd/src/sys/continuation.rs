//! Continuing a thread's work in a child that shares this address space and so outlives `execve`.
//!
//! `execve` kills every thread of the process but the caller. A task created with `CLONE_VM` and
//! without `CLONE_THREAD` is a separate process that shares the address space: the exec only drops
//! the process's reference to it, and the child goes on running the old binary's code on the old
//! memory. vmmd uses that to keep the guest running while the new binary starts (the cpr-exec
//! bridge, `cpr::bridge`); [`super::relocate`] moves a thread's loop into one.
//!
//! The child is a *continuation* of the thread that creates it: it keeps that thread's TLS (glibc's
//! thread pointer is not changed without `CLONE_SETTLS`), so the thread must not run any code that
//! touches its TLS (allocation, locks with owners, errno) until the child has exited. The creating
//! thread therefore only waits, with raw system calls, in [`Continuation::wait`]; or it is killed by
//! the exec, after which the child has the TLS to itself.

use std::os::fd::RawFd;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

/// Stack of a continuation: the vCPU loop, the console loop and the state save run on it.
const STACK_BYTES: usize = 2 << 20;

/// Why a continuation could not start.
#[derive(Debug, thiserror::Error)]
pub enum ContinuationError {
    /// clone(2) failed.
    #[error("cannot start a child sharing vmmd's address space (clone CLONE_VM)")]
    Clone(#[source] std::io::Error),
}

/// Where a continuation leaves its result for whoever waits for it.
pub struct ResultSlot<T> {
    value: Mutex<Option<T>>,
    ready: Condvar,
}

impl<T> ResultSlot<T> {
    fn new() -> Arc<ResultSlot<T>> {
        Arc::new(ResultSlot {
            value: Mutex::new(None),
            ready: Condvar::new(),
        })
    }

    pub(super) fn put(&self, v: T) {
        *self.value.lock().unwrap_or_else(PoisonError::into_inner) = Some(v);
        self.ready.notify_all();
    }

    /// Takes the result once the continuation has left it, waiting at most `timeout`. For tasks
    /// other than the creating thread (which uses [`Continuation::wait`]).
    pub fn take_within(&self, timeout: Duration) -> Option<T> {
        let v = self.value.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut v, _) = self
            .ready
            .wait_timeout_while(v, timeout, |v| v.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        v.take()
    }
}

struct Start<V, T> {
    value: V,
    work: fn(V) -> T,
    slot: Arc<ResultSlot<T>>,
    keep: Vec<RawFd>,
    sigmask: libc::sigset_t,
}

/// Closes every fd of this (child's own) table but stdio and `keep`: what the child holds keeps
/// files open past the parent's exec (a client's connection would never see its end).
fn close_all_but(keep: &mut [RawFd]) {
    keep.sort_unstable();
    let mut from: u32 = 3;
    for &fd in keep.iter() {
        let Ok(fd) = u32::try_from(fd) else { continue };
        if fd > from {
            // SAFETY: closes a range of this child's own fd table (no CLONE_FILES).
            unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32) };
        }
        from = from.max(fd + 1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
}

extern "C" fn continuation_main<V, T>(arg: *mut libc::c_void) -> libc::c_int {
    // The start record is never freed here: until the creating thread waits or is gone, it may
    // still allocate through the TLS this child shares, and a free from this side could race
    // with it in glibc's per-thread cache. Its few bytes are left to the address space.
    // SAFETY: `arg` is the `Box<Start<V, T>>` leaked by `Continuation::start` for this child
    // alone; its fields are read once each and the box is not used afterwards.
    let start = unsafe { &mut *arg.cast::<Start<V, T>>() };
    close_all_but(&mut start.keep);
    // SAFETY: as above; `value` and `slot` are moved out exactly once and never dropped in place.
    let (value, slot) = unsafe { (std::ptr::read(&start.value), std::ptr::read(&start.slot)) };
    // SAFETY: restores the creating thread's signal mask in this child (all were blocked at clone).
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &start.sigmask, std::ptr::null_mut()) };
    let work = start.work;
    let code = match std::panic::catch_unwind(AssertUnwindSafe(|| work(value))) {
        Ok(v) => {
            slot.put(v);
            0
        }
        Err(_) => 101,
    };
    // The slot may be the last reference in an address space whose other users are gone: leave
    // it to the exit rather than run its destructor here.
    std::mem::forget(slot);
    // SAFETY: ends this child (its own thread group); nothing of it is used afterwards.
    unsafe { libc::_exit(code) }
}

/// A running continuation.
pub struct Continuation<T> {
    pid: libc::pid_t,
    slot: Arc<ResultSlot<T>>,
    stack: Vec<u8>,
}

impl<T: Send + 'static> Continuation<T> {
    /// Starts `work(value)` in a `CLONE_VM` child of this process, on its own stack, with its own
    /// copy of the fd table in which only stdio and `keep` stay open. The calling thread must only call
    /// [`Continuation::wait`] (or be ended by an exec) afterwards: the child uses its TLS. When the
    /// child cannot start, `value` comes back with the error.
    pub fn start<V: Send + 'static>(
        value: V,
        work: fn(V) -> T,
        keep: &[RawFd],
    ) -> Result<Continuation<T>, (ContinuationError, V)> {
        let slot = ResultSlot::new();
        let mut stack = vec![0u8; STACK_BYTES];
        // SAFETY: a zeroed sigset_t is a valid out buffer; SIG_SETMASK with no new set only reads
        // this thread's mask, which the child restores once it has set itself up.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), &mut old) };
        let start = Box::into_raw(Box::new(Start {
            value,
            work,
            slot: Arc::clone(&slot),
            keep: keep.to_vec(),
            sigmask: old,
        }));
        // SAFETY: the stack lives in the returned `Continuation` until `wait` has reaped the
        // child (or is leaked with it after an exec); `start` is leaked to the child, which
        // alone uses it.
        let pid = unsafe {
            clone_vm(
                &mut stack,
                continuation_main::<V, T>,
                start.cast(),
                libc::CLONE_VM | libc::SIGCHLD,
            )
        };
        match pid {
            Ok(pid) => Ok(Continuation { pid, slot, stack }),
            Err(e) => {
                // SAFETY: the child does not exist, so the box is still ours.
                let start = unsafe { Box::from_raw(start) };
                Err((ContinuationError::Clone(e), start.value))
            }
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The slot the child leaves its result in, for tasks other than the creating thread.
    pub fn slot(&self) -> Arc<ResultSlot<T>> {
        Arc::clone(&self.slot)
    }

    /// Waits (raw `wait4`, no TLS use) until the child has exited, then returns its result (None
    /// when it panicked or someone else took the result).
    pub fn wait(self) -> Option<T> {
        reap(self.pid);
        let Continuation { slot, stack, .. } = self;
        drop(stack);
        let v = slot
            .value
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        v
    }

    /// After a successful exec the child's stack lives on in the old address space: never free it.
    pub fn forget(self) {
        std::mem::forget(self);
    }
}

/// Waits for child `pid` to exit with raw `wait4` calls. Only `wait4` can report ECHILD, so a
/// continuation's concurrent writes to the shared errno cannot end the loop early.
pub fn reap(pid: libc::pid_t) {
    let mut status = 0;
    loop {
        // SAFETY: wait4 on our own child with a valid status pointer and no rusage.
        let r = unsafe {
            libc::syscall(
                libc::SYS_wait4,
                pid,
                &mut status as *mut libc::c_int,
                libc::__WALL,
                std::ptr::null_mut::<libc::rusage>(),
            )
        };
        if r == libc::c_long::from(pid)
            || (r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD))
        {
            return;
        }
    }
}

/// `clone(flags)` of `main(arg)` on the top of `stack`, with every signal blocked in this thread
/// around the call, so the child starts with none deliverable (it unblocks what it wants).
///
/// # Safety
/// `flags` must include `CLONE_VM`; `stack` must stay allocated until the child has exited (or
/// forever, after an exec); `main` must only use `arg` and what it points to, which must stay
/// valid for as long as the child uses it.
pub(crate) unsafe fn clone_vm(
    stack: &mut [u8],
    main: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
    flags: libc::c_int,
) -> std::io::Result<libc::pid_t> {
    // SAFETY: zeroed sigset_t values are valid arguments for sigfillset/pthread_sigmask.
    let (mut all, mut old): (libc::sigset_t, libc::sigset_t) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: fills a sigset we own; blocks every signal in this thread until after clone.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: the stack pointer is the 16-byte aligned top of `stack`; the rest is the caller's
    // contract above.
    let pid = unsafe {
        let top = (stack.as_mut_ptr().add(stack.len()) as usize & !15) as *mut libc::c_void;
        libc::clone(main, top, flags, arg)
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: restores this thread's own mask.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if pid < 0 {
        Err(err)
    } else {
        Ok(pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn a_continuation_shares_memory_and_returns_its_result() {
        let shared = Arc::new(AtomicU32::new(0));
        let s = Arc::clone(&shared);
        let c = Continuation::start(
            s,
            |s| {
                s.store(7, Ordering::SeqCst);
                vec![1u8, 2, 3]
            },
            &[],
        )
        .map_err(|(e, _)| e)
        .expect("clone");
        assert_ne!(c.pid(), std::process::id() as i32);
        assert_eq!(c.wait(), Some(vec![1, 2, 3]));
        assert_eq!(
            shared.load(Ordering::SeqCst),
            7,
            "the child wrote our memory"
        );
    }

    #[test]
    fn a_continuation_keeps_only_the_fds_it_is_given() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let (r, w) = (fds[0], fds[1]);
        let c = Continuation::start(
            (r, w),
            |(r, w)| {
                // SAFETY: F_GETFD only queries this child's fd table.
                unsafe { (libc::fcntl(r, libc::F_GETFD), libc::fcntl(w, libc::F_GETFD)) }
            },
            &[r],
        )
        .map_err(|(e, _)| e)
        .expect("clone");
        let (r_flags, w_flags) = c.wait().expect("result");
        assert!(r_flags >= 0, "the kept fd is open in the child");
        assert_eq!(w_flags, -1, "the other one is closed in the child");
        // SAFETY: F_GETFD only queries; then close our ends.
        unsafe {
            assert!(libc::fcntl(w, libc::F_GETFD) >= 0, "still open here");
            libc::close(r);
            libc::close(w);
        }
    }

    #[test]
    fn another_task_can_take_the_result() {
        let c = Continuation::start((), |()| 42u64, &[])
            .map_err(|(e, _)| e)
            .expect("clone");
        let slot = c.slot();
        assert_eq!(slot.take_within(Duration::from_secs(10)), Some(42));
        assert_eq!(c.wait(), None, "already taken");
    }
}
