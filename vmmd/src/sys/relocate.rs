//! Relocating a thread's loop into a continuation (see [`super::continuation`]), and back.
//!
//! The protocol, shared by the console worker and the vCPU loops:
//!
//! 1. the controller asks the loops to move ([`Relocation::ask_move`]) and wakes them its own way
//!    (an eventfd, a condition variable); it waits with [`Relocation::wait_moved`];
//! 2. a loop on its thread that sees [`Relocation::must_move`] calls [`Relocation::run_moved`]: its
//!    loop goes on in a `CLONE_VM` child, and the thread only waits for that child;
//! 3. the loop in the child runs until [`Relocation::must_leave`]: it is asked back
//!    ([`Relocation::bring_back`], a rollback: the thread takes the loop again) or to finish
//!    ([`Relocation::finish`]: the new process took over, the thread is gone, and whoever asks
//!    takes the loop's result).
//!
//! The rules of continuations hold throughout: while a child runs with its thread's TLS, the
//! thread neither allocates nor frees (it only takes futex locks, stores atomics and waits with raw
//! system calls), and the loop side of this protocol, as read by the child, is atomics only.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::continuation::{Continuation, ContinuationError, ResultSlot};

/// Why loops did not move into, or come back from, their continuations.
#[derive(Debug, thiserror::Error)]
pub enum RelocateError {
    /// A loop's continuation could not start; that loop stays on its thread.
    #[error("a loop could not move into a continuation")]
    Start(#[source] ContinuationError),
    /// Not every loop moved in time.
    #[error("only {moved} of {count} loop(s) moved into a continuation within {timeout:?}")]
    NotMoved {
        /// How many moved.
        moved: usize,
        /// How many were expected to.
        count: usize,
        /// How long the controller waited.
        timeout: Duration,
    },
    /// Loops asked back still ran in their continuations.
    #[error("{away} loop(s) did not come back from their continuation within {timeout:?}")]
    NotBack {
        /// How many are still in a continuation.
        away: usize,
        /// How long the controller waited.
        timeout: Duration,
    },
}

/// What the controller asks of the loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Ask {
    /// Stay on (or be back on) their threads.
    Stay = 0,
    /// Move into continuations, or keep running there.
    Move = 1,
    /// Come back: the continuations end, their threads take the loops again.
    Return = 2,
    /// End in the continuations: the threads are gone, the new process took over.
    Finish = 3,
}

impl Ask {
    fn from_u8(v: u8) -> Ask {
        match v {
            1 => Ask::Move,
            2 => Ask::Return,
            3 => Ask::Finish,
            _ => Ask::Stay,
        }
    }
}

/// How [`Relocation::run_moved`] ended.
#[derive(Debug)]
pub enum Moved<T, V> {
    /// The loop ran in a continuation and is back on this thread with the continuation's result
    /// (None when it panicked, or when [`Relocation::finish`] took the result).
    Returned(Option<T>),
    /// No continuation ran (no move was asked anymore, or the child could not start: the
    /// controller learns why from [`Relocation::wait_moved`]); here is the value back.
    Stayed(V),
}

struct Inner<T> {
    /// The only fds (besides stdio) a continuation keeps in its copy of the fd table.
    keep: Vec<RawFd>,
    /// Why a loop could not move (since the last [`Relocation::ask_move`]).
    failure: Option<ContinuationError>,
    /// Loops starting their continuations (outside the lock, so that several start at once).
    starting: usize,
    /// Where the first loop that moved leaves its result (for a relocation of one loop).
    slot: Option<Arc<ResultSlot<T>>>,
}

/// The shared state of one relocation protocol between a controller and one or more loops whose
/// continuations return `T`.
pub struct Relocation<T> {
    /// An [`Ask`], readable by the loops without a lock.
    asked: AtomicU8,
    /// Loops running in continuations (changed under `inner`'s lock).
    moved: AtomicUsize,
    inner: Mutex<Inner<T>>,
    changed: Condvar,
}

impl<T> Default for Relocation<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> std::fmt::Debug for Relocation<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relocation")
            .field("asked", &self.asked())
            .field("moved", &self.moved())
            .finish_non_exhaustive()
    }
}

impl<T> Relocation<T> {
    /// Loops on their threads, nothing asked.
    pub const fn new() -> Relocation<T> {
        Relocation {
            asked: AtomicU8::new(Ask::Stay as u8),
            moved: AtomicUsize::new(0),
            inner: Mutex::new(Inner {
                keep: Vec::new(),
                failure: None,
                starting: 0,
                slot: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, ask: Ask) {
        self.asked.store(ask as u8, Ordering::Release);
    }

    /// What the controller asks now.
    pub fn asked(&self) -> Ask {
        Ask::from_u8(self.asked.load(Ordering::Acquire))
    }

    /// How many loops run in continuations.
    pub fn moved(&self) -> usize {
        self.moved.load(Ordering::Acquire)
    }

    /// For a loop on its thread: whether to call [`Relocation::run_moved`].
    pub fn must_move(&self) -> bool {
        self.asked() == Ask::Move
    }

    /// For a loop in a continuation: whether to end it (asked back, or to finish).
    pub fn must_leave(&self) -> bool {
        matches!(self.asked(), Ask::Return | Ask::Finish)
    }

    /// Whether loops run in continuations and nobody asked them to leave.
    pub fn is_away(&self) -> bool {
        self.asked() == Ask::Move && self.moved() > 0
    }

    /// Asks the loops to move into continuations that keep only `keep` (and stdio) in their fd
    /// tables. The caller then wakes the loops.
    pub fn ask_move(&self, keep: Vec<RawFd>) {
        let mut inner = self.lock();
        inner.keep = keep;
        inner.failure = None;
        self.set(Ask::Move);
        self.changed.notify_all();
    }

    /// Waits at most `timeout` until `count` loops run in continuations. On an error, whatever
    /// moved is still away: [`Relocation::bring_back`] returns it.
    pub fn wait_moved(&self, count: usize, timeout: Duration) -> Result<(), RelocateError> {
        let inner = self.lock();
        let (mut inner, _) = self
            .changed
            .wait_timeout_while(inner, timeout, |i| {
                self.moved() < count && i.failure.is_none()
            })
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = inner.failure.take() {
            return Err(RelocateError::Start(e));
        }
        let moved = self.moved();
        if moved < count {
            return Err(RelocateError::NotMoved {
                moved,
                count,
                timeout,
            });
        }
        Ok(())
    }

    /// Asks the loops in continuations back, wakes them with `wake`, and waits at most `timeout`
    /// until every one is on its thread again; then nothing is asked anymore.
    pub fn bring_back(&self, timeout: Duration, wake: impl FnOnce()) -> Result<(), RelocateError> {
        {
            let inner = self.lock();
            if self.moved() == 0 && inner.starting == 0 {
                // A loop that saw the move but has not begun to start its child stays (see
                // `run_moved`).
                self.set(Ask::Stay);
                return Ok(());
            }
            self.set(Ask::Return);
        }
        wake();
        let inner = self.lock();
        // A child that starts now sees the request at once and ends.
        let (_inner, _) = self
            .changed
            .wait_timeout_while(inner, timeout, |i| self.moved() > 0 || i.starting > 0)
            .unwrap_or_else(PoisonError::into_inner);
        let away = self.moved();
        if away > 0 {
            return Err(RelocateError::NotBack { away, timeout });
        }
        self.set(Ask::Stay);
        Ok(())
    }

    /// In the bridge, after the exec (the threads are gone): asks the loop in its continuation to
    /// finish, wakes it with `wake`, and takes its result, waiting at most `timeout`. None when no
    /// loop was away or none left a result in time.
    pub fn finish(&self, timeout: Duration, wake: impl FnOnce()) -> Option<T> {
        self.ask_finish(wake).and_then(|s| s.take_within(timeout))
    }

    /// The first half of [`Relocation::finish`]: asks the loop to finish and wakes it, without
    /// waiting; the returned slot yields its result. None when no loop was away.
    pub fn ask_finish(&self, wake: impl FnOnce()) -> Option<Arc<ResultSlot<T>>> {
        let slot = {
            let inner = self.lock();
            if !self.is_away() {
                return None;
            }
            self.set(Ask::Finish);
            inner.slot.clone()
        };
        wake();
        slot
    }
}

impl<T: Send + 'static> Relocation<T> {
    /// On a loop's own thread, once [`Relocation::must_move`]: runs `work(value)` in a
    /// continuation and waits, without touching this thread's TLS, until the child has exited.
    /// `on_move` is called with the child's pid once it runs (before the controller learns that
    /// it moved) and with None once it is gone; while the child runs it must neither allocate nor
    /// free.
    pub fn run_moved<V: Send + 'static>(
        &self,
        value: V,
        work: fn(V) -> T,
        mut on_move: impl FnMut(Option<libc::pid_t>),
    ) -> Moved<T, V> {
        // Checked under the lock, so that a `bring_back` either comes first (and the loop stays)
        // or counts the loop as starting (and waits for it).
        let keep = {
            let mut inner = self.lock();
            if !self.must_move() {
                return Moved::Stayed(value);
            }
            inner.starting += 1;
            inner.keep.clone()
        };
        // Outside the lock: the loops of a relocation start their children in parallel.
        let started = Continuation::start(value, work, &keep);
        let mut inner = self.lock();
        inner.starting -= 1;
        let child = match started {
            Ok(c) => c,
            Err((e, value)) => {
                inner.failure = Some(e);
                // The other loops stay too: the controller brings back whatever moved.
                if self.must_move() {
                    self.set(Ask::Stay);
                }
                self.changed.notify_all();
                return Moved::Stayed(value);
            }
        };
        // From here until `wait` returns, the child uses this thread's TLS: nothing is freed
        // (`keep` goes after the wait).
        let mine = child.slot();
        if inner.slot.is_none() {
            inner.slot = Some(Arc::clone(&mine));
        }
        on_move(Some(child.pid()));
        self.moved.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_all();
        drop(inner);
        let mut result = child.wait();
        // Asked to finish while this thread still lives (tests; after an exec it is gone): the
        // result is the controller's, whichever of the two got to the slot first.
        if self.asked() == Ask::Finish {
            if let Some(v) = result.take() {
                mine.put(v);
            }
        }
        drop(keep);
        on_move(None);
        let mut inner = self.lock();
        if inner.slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &mine)) {
            inner.slot = None;
        }
        self.moved.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_all();
        Moved::Returned(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI32;

    const LIMIT: Duration = Duration::from_secs(20);

    /// The loop in the child: counts until it must leave.
    fn child_loop(r: Arc<Relocation<u64>>) -> u64 {
        let mut n = 0u64;
        while !r.must_leave() {
            n += 1;
            std::thread::yield_now();
        }
        n + 1
    }

    /// A thread whose loop moves when asked and ends after its first trip.
    fn loop_thread(
        r: &Arc<Relocation<u64>>,
        pid: &Arc<AtomicI32>,
    ) -> std::thread::JoinHandle<Option<u64>> {
        let (r, pid) = (Arc::clone(r), Arc::clone(pid));
        std::thread::spawn(move || loop {
            if r.must_move() {
                let on_move = |p: Option<libc::pid_t>| pid.store(p.unwrap_or(-1), Ordering::SeqCst);
                match r.run_moved(Arc::clone(&r), child_loop, on_move) {
                    Moved::Returned(v) => return v,
                    Moved::Stayed(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        })
    }

    #[test]
    fn a_loop_moves_and_comes_back_with_its_result() {
        let r = Arc::new(Relocation::new());
        let pid = Arc::new(AtomicI32::new(0));
        let t = loop_thread(&r, &pid);
        assert!(!r.is_away());
        r.ask_move(Vec::new());
        r.wait_moved(1, LIMIT).expect("moved");
        assert!(r.is_away());
        assert_eq!(r.moved(), 1);
        let child = pid.load(Ordering::SeqCst);
        assert!(child > 0 && child != std::process::id() as i32);
        r.bring_back(LIMIT, || {}).expect("back");
        assert_eq!(r.asked(), Ask::Stay);
        assert_eq!(r.moved(), 0);
        assert!(t.join().expect("thread").is_some_and(|n| n > 0));
        assert_eq!(pid.load(Ordering::SeqCst), -1, "on_move saw the end");
    }

    #[test]
    fn several_loops_move_together_and_all_come_back() {
        let r = Arc::new(Relocation::new());
        let pids: Vec<_> = (0..3).map(|_| Arc::new(AtomicI32::new(0))).collect();
        let threads: Vec<_> = pids.iter().map(|p| loop_thread(&r, p)).collect();
        r.ask_move(Vec::new());
        r.wait_moved(3, LIMIT).expect("all moved");
        let mut seen: Vec<i32> = pids.iter().map(|p| p.load(Ordering::SeqCst)).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 3, "one child each");
        r.bring_back(LIMIT, || {}).expect("back");
        for t in threads {
            assert!(t.join().expect("thread").is_some());
        }
    }

    #[test]
    fn finish_hands_the_result_to_the_controller() {
        let r = Arc::new(Relocation::new());
        let pid = Arc::new(AtomicI32::new(0));
        let t = loop_thread(&r, &pid);
        r.ask_move(Vec::new());
        r.wait_moved(1, LIMIT).expect("moved");
        assert!(r.finish(LIMIT, || {}).is_some_and(|n| n > 0));
        assert_eq!(r.asked(), Ask::Finish);
        assert_eq!(t.join().expect("thread"), None, "the result was taken");
        assert_eq!(r.moved(), 0);
        assert!(r.finish(LIMIT, || {}).is_none(), "nothing away");
    }

    #[test]
    fn a_move_nobody_makes_times_out_and_is_withdrawn() {
        let r: Relocation<u64> = Relocation::new();
        r.ask_move(vec![3]);
        match r.wait_moved(1, Duration::from_millis(20)) {
            Err(RelocateError::NotMoved {
                moved: 0, count: 1, ..
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
        r.bring_back(LIMIT, || panic!("nothing to wake"))
            .expect("back");
        assert_eq!(r.asked(), Ask::Stay);
        assert!(matches!(
            r.run_moved(7u32, |_| 0, |_| panic!("no child")),
            Moved::Stayed(7)
        ));
    }
}
