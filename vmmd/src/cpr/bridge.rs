//! The cpr-exec bridge: the guest keeps running while the new binary starts.
//!
//! Without it, cpr-exec pauses the guest, saves, `execve`s, and the new process builds its VM
//! (memory slots, irqchip, vCPUs) before it can load the state: all of that is inside the pause.
//! With it, the old process moves its vCPU loops, its console loop and a control loop into
//! continuation children (`CLONE_VM`, see [`crate::sys::continuation`]) that share its address space and
//! so survive the `execve`; the guest pauses only for that move (well under a millisecond). The new
//! process starts and builds its VM while the guest runs, then asks the bridge for it over the
//! control socket: the bridge stops its vCPUs, writes the state file and answers with a
//! [`BridgeReply`]; the new process loads the state and resumes. The pause is that exchange.
//!
//! Protocol on the control socket (a `SOCK_STREAM` pair; the new process holds one end, the
//! bridge's control task the other):
//! - new process → bridge: one byte, [`TAKE_OVER`]; the old process sends [`ABORT`] when its
//!   `execve` failed and it takes the loops back itself.
//! - bridge → new process: a [`BridgeReply`] in a versioned, checksummed frame. A second request
//!   (a rollback re-exec of the previous binary) gets the same answer.
//! - The new process closes its end once the guest runs on it: the bridge stops its vCPU loops and
//!   exits, and the old address space and KVM VM go with its last task. If the end closes before
//!   any take-over (the new process died), the bridge saves the state file anyway and exits, as a
//!   crash inside the classic pause would have left it.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::state::handover::{
    frame_version, BridgeReply, HandoverError, BRIDGE_REPLY_MAGIC, FRAME_HEADER,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// The new process asks for the guest.
pub const TAKE_OVER: u8 = b'T';
/// The old process's `execve` failed: the bridge ends without touching the guest.
pub const ABORT: u8 = b'A';

/// Why the new process could not take the guest over from the bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The socket failed (the bridge is gone, or did not answer in time).
    #[error("cpr-exec bridge: {op} failed")]
    Io {
        /// What was done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The answer does not decode.
    #[error("cpr-exec bridge sent an invalid answer")]
    Reply(#[source] HandoverError),
    /// The bridge could not save the state; the guest runs on in it.
    #[error("the cpr-exec bridge could not save the guest's state ({0}); the guest runs on in the previous binary's bridge")]
    NotSaved(String),
}

/// Asks the bridge for the guest and waits at most `timeout` for its answer. On success the state
/// file is written and the bridge's vCPUs are stopped.
pub fn take_over(ctl: &UnixStream, timeout: Duration) -> Result<BridgeReply, BridgeError> {
    let io = |op| move |source| BridgeError::Io { op, source };
    let mut ctl = ctl;
    ctl.set_read_timeout(Some(timeout))
        .map_err(io("set a read timeout"))?;
    ctl.write_all(&[TAKE_OVER])
        .map_err(io("send the request"))?;
    let mut header = [0u8; FRAME_HEADER];
    ctl.read_exact(&mut header)
        .map_err(io("read the answer's header"))?;
    // Any version's header: the body length is at the same place in all of them.
    frame_version(BRIDGE_REPLY_MAGIC, &header).map_err(BridgeError::Reply)?;
    let len = u32::from_le_bytes([header[16], header[17], header[18], header[19]]) as usize;
    let mut bytes = header.to_vec();
    bytes.resize(FRAME_HEADER + len, 0);
    ctl.read_exact(&mut bytes[FRAME_HEADER..])
        .map_err(io("read the answer"))?;
    let reply = BridgeReply::decode(&bytes).map_err(BridgeError::Reply)?;
    match &reply.saved {
        Ok(()) => Ok(reply),
        Err(why) => Err(BridgeError::NotSaved(why.clone())),
    }
}

/// Tells the bridge that the `execve` failed (old process only).
pub fn abort(ctl: &UnixStream) -> std::io::Result<()> {
    let mut ctl = ctl;
    ctl.write_all(&[ABORT])
}

/// How the bridge's control loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The old process's exec failed; it takes the loops back.
    Aborted,
    /// The new process let go (after a take-over, or because it died before one).
    Released {
        /// Whether a take-over had saved the state.
        saved: bool,
    },
}

/// The bridge's control loop (in the control continuation): answers take-over requests with
/// `take_over()` (called again only if it failed), until an abort or the new process's end of the
/// socket closes. When the end closes before any take-over (the new process died),
/// `orphaned()` says where to go on: a socket whose other end a rollback process holds (serving
/// goes on there), or None (the loop ends).
///
/// A new process that has not asked for the guest within `patience` of the serving's start gets
/// `give_up()` once (which kills it: its end of the socket then closes and `orphaned()` follows).
pub fn serve(
    ctl: &UnixStream,
    patience: Duration,
    mut take_over: impl FnMut() -> BridgeReply,
    mut orphaned: impl FnMut() -> Option<UnixStream>,
    mut give_up: impl FnMut(),
) -> Ended {
    let mut answer: Option<Vec<u8>> = None;
    let mut next: Option<UnixStream> = None;
    let mut deadline = Some(std::time::Instant::now() + patience);
    loop {
        let ctl = next.as_ref().unwrap_or(ctl);
        let mut fds = [PollFd::new(ctl.as_fd(), PollFlags::POLLIN)];
        let wait = match deadline {
            Some(d) => {
                PollTimeout::try_from(d.saturating_duration_since(std::time::Instant::now()))
                    .unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        match poll(&mut fds, wait) {
            Ok(0) if answer.is_none() => {
                if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    deadline = None;
                    give_up();
                }
                continue;
            }
            Ok(_) => {}
            Err(_) => continue,
        }
        let mut byte = [0u8; 1];
        let mut reader = ctl;
        match reader.read(&mut byte) {
            Ok(1) if byte[0] == ABORT => return Ended::Aborted,
            Ok(1) if byte[0] == TAKE_OVER => {
                if answer.is_none() {
                    deadline = None;
                    let reply = take_over();
                    let saved = reply.saved.is_ok();
                    let encoded = reply.encode().unwrap_or_else(|e| {
                        BridgeReply {
                            saved: Err(format!("cannot encode the answer: {e}")),
                            ..reply
                        }
                        .encode()
                        .unwrap_or_default()
                    });
                    // A failed save is tried again on the next request.
                    if saved {
                        answer = Some(encoded.clone());
                    }
                    let mut w = ctl;
                    let _ = w.write_all(&encoded);
                } else if let Some(a) = &answer {
                    let mut w = ctl;
                    let _ = w.write_all(a);
                }
            }
            Ok(1) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // End of stream (or a dead socket): the new process is gone or done.
            _ => {
                let saved = answer.is_some();
                if !saved {
                    if let Some(rollback) = orphaned() {
                        // No deadline for the rollback process: it is this very binary.
                        next = Some(rollback);
                        continue;
                    }
                }
                return Ended::Released { saved };
            }
        }
    }
}

/// Waits for a bridge process, named by a pidfd, to exit and reaps it.
pub fn reap_pidfd(pidfd: &impl AsRawFd) {
    const P_PIDFD: libc::idtype_t = 3;
    // SAFETY: a zeroed siginfo_t is a valid out buffer.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waitid on a pidfd of our child with a valid siginfo buffer.
        let r = unsafe {
            libc::waitid(
                P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::__WALL,
            )
        };
        if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// A pidfd for process `pid`.
pub fn pidfd_open(pid: libc::pid_t) -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open with no flags; the result is checked and owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENCE: Duration = Duration::from_secs(60);

    fn ok_reply() -> BridgeReply {
        BridgeReply {
            saved: Ok(()),
            paused_at_ns: 5,
            phases: vec![("save-state".into(), 120)],
            guest_events: Vec::new(),
            legacy: None,
        }
    }

    #[test]
    fn a_take_over_is_answered_and_repeated() {
        let (new, bridge) = UnixStream::pair().expect("pair");
        let server = std::thread::spawn(move || {
            let mut calls = 0;
            let ended = serve(
                &bridge,
                PATIENCE,
                || {
                    calls += 1;
                    ok_reply()
                },
                || panic!("not orphaned"),
                || panic!("no deadline"),
            );
            (ended, calls)
        });
        let a = take_over(&new, Duration::from_secs(10)).expect("first");
        let b = take_over(&new, Duration::from_secs(10)).expect("second");
        assert_eq!(a, ok_reply());
        assert_eq!(a, b);
        drop(new);
        let (ended, calls) = server.join().expect("join");
        assert_eq!(ended, Ended::Released { saved: true });
        assert_eq!(calls, 1, "the state is saved once");
    }

    #[test]
    fn a_failed_save_is_reported_and_tried_again() {
        let (new, bridge) = UnixStream::pair().expect("pair");
        let server = std::thread::spawn(move || {
            let mut calls = 0;
            serve(
                &bridge,
                PATIENCE,
                || {
                    calls += 1;
                    if calls == 1 {
                        BridgeReply {
                            saved: Err("disk full".into()),
                            ..ok_reply()
                        }
                    } else {
                        ok_reply()
                    }
                },
                || None,
                || panic!("no deadline"),
            )
        });
        let err = take_over(&new, Duration::from_secs(10)).expect_err("refused");
        assert!(err.to_string().contains("disk full"), "{err}");
        take_over(&new, Duration::from_secs(10)).expect("second try");
        drop(new);
        assert_eq!(
            server.join().expect("join"),
            Ended::Released { saved: true }
        );
    }

    #[test]
    fn a_new_process_that_dies_first_leaves_the_bridge_to_its_fallback() {
        let (new, bridge) = UnixStream::pair().expect("pair");
        drop(new);
        let mut asked = 0;
        let ended = serve(
            &bridge,
            PATIENCE,
            ok_reply,
            || {
                asked += 1;
                None
            },
            || panic!("no deadline"),
        );
        assert_eq!(ended, Ended::Released { saved: false });
        assert_eq!(asked, 1);
    }

    #[test]
    fn a_rollback_process_takes_the_guest_over_after_the_new_one_died() {
        let (new, bridge) = UnixStream::pair().expect("pair");
        let (rollback, rollback_bridge) = UnixStream::pair().expect("pair");
        drop(new);
        let mut spare = Some(rollback_bridge);
        let server = std::thread::spawn(move || {
            let mut calls = 0;
            let ended = serve(
                &bridge,
                PATIENCE,
                || {
                    calls += 1;
                    ok_reply()
                },
                || spare.take(),
                || panic!("no deadline"),
            );
            (ended, calls)
        });
        let reply = take_over(&rollback, Duration::from_secs(10)).expect("rollback takes over");
        assert_eq!(reply, ok_reply());
        drop(rollback);
        let (ended, calls) = server.join().expect("join");
        assert_eq!(ended, Ended::Released { saved: true });
        assert_eq!(calls, 1);
    }

    #[test]
    fn a_process_that_never_asks_is_given_up_on_then_rolled_back() {
        let (hung, bridge) = UnixStream::pair().expect("pair");
        let (rollback, rollback_bridge) = UnixStream::pair().expect("pair");
        let hung = std::sync::Mutex::new(Some(hung));
        let mut spare = Some(rollback_bridge);
        let server = std::thread::scope(|scope| {
            let t = scope.spawn(|| {
                serve(
                    &bridge,
                    Duration::from_millis(50),
                    ok_reply,
                    || spare.take(),
                    // "Kill" the hung process: its end closes.
                    || drop(hung.lock().expect("lock").take()),
                )
            });
            let reply = take_over(&rollback, Duration::from_secs(10)).expect("rollback");
            assert_eq!(reply, ok_reply());
            drop(rollback);
            t.join().expect("join")
        });
        assert_eq!(server, Ended::Released { saved: true });
    }

    #[test]
    fn abort_ends_the_bridge_without_a_save() {
        let (old, bridge) = UnixStream::pair().expect("pair");
        abort(&old).expect("abort");
        let ended = serve(
            &bridge,
            PATIENCE,
            || panic!("no take-over"),
            || panic!("not orphaned"),
            || panic!("no deadline"),
        );
        assert_eq!(ended, Ended::Aborted);
    }

    #[test]
    fn garbage_and_silence_are_errors_not_hangs() {
        let (new, bridge) = UnixStream::pair().expect("pair");
        let t = std::thread::spawn(move || {
            let mut b = [0u8; 1];
            (&bridge).read_exact(&mut b).expect("request");
            (&bridge).write_all(&[0u8; FRAME_HEADER]).expect("garbage");
            bridge
        });
        assert!(matches!(
            take_over(&new, Duration::from_secs(10)),
            Err(BridgeError::Reply(_))
        ));
        let _bridge = t.join().expect("join");
        assert!(matches!(
            take_over(&new, Duration::from_millis(50)),
            Err(BridgeError::Io { .. })
        ));
    }
}
