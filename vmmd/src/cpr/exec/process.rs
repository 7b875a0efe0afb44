//! The process mechanisms of cpr-exec: checking the new binary, fds that survive `execve`, the exec
//! itself, the rollback exec, and the children that keep or tear down the old address space. The
//! update's steps that use them are in [`super::classic`] and [`super::bridged`].
//!
//! - [`preflight`]: the new binary exists, is an executable ELF, and its arguments make it incoming.
//!   Nothing is changed yet.
//! - [`PreservedFds::clear_cloexec`] / [`PreservedFds::restore_cloexec`]: the fds that must survive.
//! - [`exec`]: `execve` in place. If it returns, the caller rolls back and resumes the guest.
//! - [`roll_back`] (in the new process): re-exec the previous binary, still held open, with the same
//!   state and fds, when the new one cannot load the state; [`arm_crash_rollback`] does the same from a
//!   signal handler if the new process crashes before the guest runs again.

use std::ffi::{CString, OsStr};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::state::handover::{fd_names, CprHandover, HandoverError, HANDOVER_ENV};
use crate::sys::continuation::clone_vm;
pub use crate::sys::continuation::reap;
use crate::sys::fd::set_cloexec;

/// Why a cpr-exec step failed. Before `execve` succeeds, the guest keeps running on this binary.
#[derive(Debug, thiserror::Error)]
pub enum CprExecError {
    /// No exec arguments were set.
    #[error("no exec arguments for cpr-exec: set them with set-migration-parameters (the new binary and its arguments)")]
    NoExecArgs,
    /// The new binary is missing.
    #[error("new vmmd binary {path} cannot be used: {source}")]
    Binary {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The new binary is not executable.
    #[error("new vmmd binary {0} is not an executable regular file: chmod +x it or pick another")]
    NotExecutable(PathBuf),
    /// The new binary is not an ELF.
    #[error("new vmmd binary {0} is not an ELF executable: point exec-args at a vmmd build")]
    NotElf(PathBuf),
    /// The arguments would not make the new process incoming.
    #[error("exec arguments must include --incoming defer or --incoming file:PATH, or the new vmmd would boot the guest afresh")]
    NotIncoming,
    /// An fd flag could not be changed.
    #[error("cannot change close-on-exec on {name} (fd {fd})")]
    Cloexec {
        /// Table name.
        name: String,
        /// The fd.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The hand-over could not be written.
    #[error(transparent)]
    Handover(#[from] HandoverError),
    /// The previous binary could not be opened for rollback.
    #[error("cannot keep the running binary open for rollback")]
    OpenSelf(#[source] std::io::Error),
    /// An argument contains a NUL byte.
    #[error("exec argument {0:?} contains a NUL byte")]
    BadArg(String),
    /// execve failed.
    #[error("execve of {path} failed; the guest keeps running on the current binary")]
    Exec {
        /// The binary.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Checks the new binary and its arguments before anything is paused.
pub fn preflight(argv: &[String]) -> Result<(), CprExecError> {
    let path = PathBuf::from(argv.first().ok_or(CprExecError::NoExecArgs)?);
    let binary = |source| CprExecError::Binary {
        path: path.clone(),
        source,
    };
    let meta = std::fs::metadata(&path).map_err(binary)?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(CprExecError::NotExecutable(path));
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                CprExecError::NotElf(path.clone())
            } else {
                binary(e)
            }
        })?;
    if magic != *b"\x7fELF" {
        return Err(CprExecError::NotElf(path));
    }
    if incoming_arg(argv).is_none() {
        return Err(CprExecError::NotIncoming);
    }
    Ok(())
}

/// The value of `--incoming` in `argv`, if any.
pub fn incoming_arg(argv: &[String]) -> Option<&str> {
    argv.iter().enumerate().find_map(|(i, a)| {
        if a == "--incoming" {
            argv.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix("--incoming=")
        }
    })
}

/// `argv` with `--incoming` set to `file:STATE` (and fault injection dropped): how to restart a binary
/// so that it loads the saved state at once.
pub fn with_incoming_file(argv: &[String], state: &Path) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len() + 2);
    let mut skip = false;
    for (i, a) in argv.iter().enumerate() {
        if skip {
            skip = false;
            continue;
        }
        if i > 0 && (a == "--incoming" || a == "--fault-inject") {
            skip = true;
            continue;
        }
        if a.starts_with("--incoming=") || a.starts_with("--fault-inject=") {
            continue;
        }
        out.push(a.clone());
    }
    out.push("--incoming".into());
    out.push(format!("file:{}", state.display()));
    out
}

/// Opens the running binary so a failed update can come back to it even if its path was replaced.
pub fn open_self() -> Result<OwnedFd, CprExecError> {
    let file = std::fs::File::open("/proc/self/exe").map_err(CprExecError::OpenSelf)?;
    Ok(OwnedFd::from(file))
}

/// The fds listed in a hand-over, whose close-on-exec flag the exec clears and a failure restores.
pub struct PreservedFds {
    fds: Vec<(String, RawFd)>,
    cleared: usize,
}

impl PreservedFds {
    /// The fds to preserve (names as in the hand-over table).
    pub fn new(fds: Vec<(String, RawFd)>) -> PreservedFds {
        PreservedFds { fds, cleared: 0 }
    }

    /// Lets every fd survive `execve`. On failure the ones already changed are restored.
    pub fn clear_cloexec(&mut self) -> Result<(), CprExecError> {
        for (name, fd) in &self.fds {
            // SAFETY: the fd is held open by its owner for the duration of the exec attempt.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
            if let Err(source) = set_cloexec(&borrowed, false) {
                let err = CprExecError::Cloexec {
                    name: name.clone(),
                    fd: *fd,
                    source,
                };
                self.restore_cloexec();
                return Err(err);
            }
            self.cleared += 1;
        }
        Ok(())
    }

    /// Puts close-on-exec back (compensation of [`PreservedFds::clear_cloexec`]).
    pub fn restore_cloexec(&mut self) {
        for (name, fd) in &self.fds[..self.cleared] {
            // SAFETY: as above.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
            if let Err(e) = set_cloexec(&borrowed, true) {
                tracing::warn!(name, fd, error = %e, "cannot restore close-on-exec");
            }
        }
        self.cleared = 0;
    }
}

fn cstrings(items: impl IntoIterator<Item = Vec<u8>>) -> Result<Vec<CString>, CprExecError> {
    items
        .into_iter()
        .map(|b| {
            CString::new(b)
                .map_err(|e| CprExecError::BadArg(String::from_utf8_lossy(&e.into_vec()).into()))
        })
        .collect()
}

/// The environment for the next process: ours, with the hand-over fd set.
fn env_with_handover(handover_fd: RawFd) -> Vec<Vec<u8>> {
    let mut env: Vec<Vec<u8>> = std::env::vars_os()
        .filter(|(k, _)| k != OsStr::new(HANDOVER_ENV))
        .map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            e
        })
        .collect();
    env.push(format!("{HANDOVER_ENV}={handover_fd}").into_bytes());
    env
}

fn pointers(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Replaces this process with `argv[0]` (or with the binary open as `binary_fd`), handing over
/// `handover_fd`. Returns only on failure.
pub fn exec(argv: &[String], binary_fd: Option<RawFd>, handover_fd: RawFd) -> CprExecError {
    let path = PathBuf::from(argv.first().map(String::as_str).unwrap_or_default());
    let args = match cstrings(argv.iter().map(|a| a.clone().into_bytes())) {
        Ok(a) => a,
        Err(e) => return e,
    };
    let env = match cstrings(env_with_handover(handover_fd)) {
        Ok(e) => e,
        Err(e) => return e,
    };
    let (argp, envp) = (pointers(&args), pointers(&env));
    match binary_fd {
        // SAFETY: NUL-terminated argument and environment arrays of live CStrings.
        Some(fd) => unsafe { execveat_empty(fd, argp.as_ptr(), envp.as_ptr()) },
        None => {
            let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
                return CprExecError::BadArg(path.display().to_string());
            };
            // SAFETY: as above, plus a NUL-terminated path.
            unsafe { libc::execve(cpath.as_ptr(), argp.as_ptr(), envp.as_ptr()) };
        }
    }
    CprExecError::Exec {
        path,
        source: std::io::Error::last_os_error(),
    }
}

/// `execveat(fd, "", argv, envp, AT_EMPTY_PATH)`: executes an open binary.
///
/// # Safety
/// `argv` and `envp` must be NUL-terminated arrays of valid C strings. Async-signal-safe.
unsafe fn execveat_empty(
    fd: RawFd,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) {
    let empty = c"".as_ptr();
    // SAFETY: guaranteed by the caller; the kernel only reads the arrays.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            empty,
            argv,
            envp,
            libc::AT_EMPTY_PATH,
        );
    }
}

/// Re-executes the previous binary with the same state and fds because the new one cannot go on.
/// Returns only when that is impossible too.
pub fn roll_back(handover: &CprHandover, reason: &str) -> CprExecError {
    tracing::error!(reason, "cpr-exec: rolling back to the previous vmmd binary");
    let Some(prev) = handover.fd(fd_names::PREVIOUS_BINARY) else {
        return CprExecError::OpenSelf(std::io::Error::other(
            "no previous binary in the hand-over",
        ));
    };
    let mut back = handover.clone();
    back.rollback_reason = Some(reason.to_string());
    let memfd = match back.to_memfd() {
        Ok(m) => m,
        Err(e) => return e.into(),
    };
    let mut with_memfd = back.fds.clone();
    with_memfd.push(("cpr-handover".into(), memfd.as_raw_fd()));
    let mut fds = PreservedFds::new(with_memfd);
    if let Err(e) = fds.clear_cloexec() {
        return e;
    }
    let err = exec(&back.rollback_argv, Some(prev), memfd.as_raw_fd());
    fds.restore_cloexec();
    err
}

/// An exec of the previous binary prepared in advance, for where nothing may allocate: a signal
/// handler, or the bridge's control continuation after this process's image is gone. Holds the
/// hand-over memfd (its `rollback_reason` set), the argument and environment arrays, and the fds
/// whose close-on-exec flag [`PreparedExec::exec_now`] clears.
pub struct PreparedExec {
    prev_binary: RawFd,
    fds: Vec<RawFd>,
    _args: Vec<CString>,
    _env: Vec<CString>,
    argp: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    memfd: OwnedFd,
}

// SAFETY: the raw pointers point into the CStrings owned by the same struct, which is never mutated
// after construction.
unsafe impl Send for PreparedExec {}
// SAFETY: as above: read-only after construction.
unsafe impl Sync for PreparedExec {}

impl PreparedExec {
    /// Prepares re-executing the previous binary `handover` names, with `handover` (its
    /// `rollback_reason` set to `reason`) and its rollback command line. None when the hand-over
    /// names no previous binary.
    pub fn rollback(
        handover: &CprHandover,
        reason: &str,
    ) -> Result<Option<PreparedExec>, CprExecError> {
        let Some(prev) = handover.fd(fd_names::PREVIOUS_BINARY) else {
            return Ok(None);
        };
        let mut back = handover.clone();
        back.rollback_reason = Some(reason.to_string());
        let memfd = back.to_memfd()?;
        let args = cstrings(back.rollback_argv.iter().map(|a| a.clone().into_bytes()))?;
        let env = cstrings(env_with_handover(memfd.as_raw_fd()))?;
        let (argp, envp) = (pointers(&args), pointers(&env));
        let mut fds: Vec<RawFd> = back.fds.iter().map(|(_, fd)| *fd).collect();
        fds.push(memfd.as_raw_fd());
        Ok(Some(PreparedExec {
            prev_binary: prev,
            fds,
            _args: args,
            _env: env,
            argp,
            envp,
            memfd,
        }))
    }

    /// Every fd the exec passes on (the hand-over memfd and the previous binary included): what a
    /// continuation that may run this exec must keep open.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = self.fds.clone();
        v.push(self.prev_binary);
        v.push(self.memfd.as_raw_fd());
        v
    }

    /// The hand-over memfd's number.
    pub fn handover_fd(&self) -> RawFd {
        self.memfd.as_raw_fd()
    }

    /// Clears close-on-exec on the fds and executes the previous binary. Async-signal-safe and
    /// allocation-free; returns only when the exec failed.
    pub fn exec_now(&self) {
        for &fd in &self.fds {
            // SAFETY: fcntl is async-signal-safe; the fds stay open until exec.
            unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        }
        // SAFETY: prepared NUL-terminated arrays; execveat is async-signal-safe.
        unsafe { execveat_empty(self.prev_binary, self.argp.as_ptr(), self.envp.as_ptr()) };
    }
}

static CRASH_ROLLBACK: OnceLock<PreparedExec> = OnceLock::new();
const CRASH_SIGNALS: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
];

extern "C" fn on_crash(_: libc::c_int) {
    if let Some(r) = CRASH_ROLLBACK.get() {
        r.exec_now();
    }
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + libc::SIGABRT) };
}

/// In a new process that has not resumed the guest yet: if it crashes, re-exec the previous binary
/// from the signal handler (everything is prepared now so the handler allocates nothing).
pub fn arm_crash_rollback(handover: &CprHandover) -> Result<(), CprExecError> {
    let Some(prepared) =
        PreparedExec::rollback(handover, "the new vmmd crashed before the guest resumed")?
    else {
        return Ok(());
    };
    let _ = CRASH_ROLLBACK.set(prepared);
    for sig in CRASH_SIGNALS {
        // SAFETY: installs a handler that only calls async-signal-safe functions.
        unsafe { libc::signal(sig, on_crash as *const () as libc::sighandler_t) };
    }
    Ok(())
}

/// Once the guest runs again on this binary: crashes are ordinary crashes again.
pub fn disarm_crash_rollback() {
    for sig in CRASH_SIGNALS {
        // SAFETY: restores the default disposition.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}

/// Keeps this process's current address space alive across `execve`: a child created with
/// `CLONE_VM` shares it, so the exec only drops a reference instead of tearing down every mapping (and
/// KVM's shadow page tables of the old VM, through its MMU notifier) inside the guest's pause. The
/// child closes all its fds but one pipe and exits when the pipe's write end, handed to the next
/// process, is closed after the guest runs again; the teardown then happens in the child's exit.
pub struct AddressSpaceKeeper {
    pid: libc::pid_t,
    release: OwnedFd,
    stack: Vec<u8>,
}

const KEEPER_STACK: usize = 64 << 10;

extern "C" fn keeper_main(arg: *mut libc::c_void) -> libc::c_int {
    let fd = arg as usize as libc::c_int;
    // Only raw syscalls here: this runs on a borrowed stack in the parent's address space, with all
    // signals blocked.
    // SAFETY: closing descriptors of this child's own (copied) fd table; read/_exit on a pipe.
    unsafe {
        if fd > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, (fd - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (fd + 1) as u32, u32::MAX, 0u32);
        let mut b = 0u8;
        loop {
            let n = libc::read(fd, (&mut b as *mut u8).cast(), 1);
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
        libc::_exit(0)
    }
}

impl AddressSpaceKeeper {
    /// Starts the keeper.
    pub fn spawn() -> std::io::Result<AddressSpaceKeeper> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills the two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned by nobody else.
        let (read, release) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut stack = vec![0u8; KEEPER_STACK];
        // SAFETY: the stack stays in `self` until the child is reaped (or in the old address space
        // after an exec); the child only makes raw syscalls on the fd number it is given (see
        // `keeper_main`).
        let pid = unsafe {
            clone_vm(
                &mut stack,
                keeper_main,
                read.as_raw_fd() as usize as *mut libc::c_void,
                libc::CLONE_VM | libc::SIGCHLD,
            )
        }?;
        drop(read);
        Ok(AddressSpaceKeeper {
            pid,
            release,
            stack,
        })
    }

    /// The pipe end whose closing lets the keeper go (hand it to the next process).
    pub fn release_fd(&self) -> RawFd {
        self.release.as_raw_fd()
    }

    /// The keeper's pid (the next process reaps it).
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Lets the keeper exit and reaps it (when no exec happened).
    pub fn release(self) {
        let AddressSpaceKeeper {
            pid,
            release,
            stack,
        } = self;
        drop(release);
        reap(pid);
        drop(stack);
    }

    /// After a successful exec: the old address space's stack copy must not be freed by us.
    pub fn forget(self) {
        std::mem::forget(self);
    }
}

extern "C" fn teardown_main(arg: *mut libc::c_void) -> libc::c_int {
    let pidfd = arg as usize as libc::c_int;
    // Only raw syscalls: this runs on a leaked stack in the exiting process's address space, with
    // all signals blocked.
    // SAFETY: poll on a pidfd this child shares (CLONE_FILES), then _exit.
    unsafe {
        let mut p = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        while libc::poll(&mut p, 1, -1) < 0 && *libc::__errno_location() == libc::EINTR {}
        libc::_exit(0)
    }
}

/// Lets this process exit at once and leaves its teardown to a child: one created with `CLONE_VM |
/// CLONE_FILES` shares the address space and the fd table, so the exit only drops references. The
/// child waits (on a pidfd) until this process is gone, then exits, and the kernel unmaps guest RAM,
/// destroys the KVM VM (its irqchip alone takes ~15 ms here) and closes every fd there. Used when a
/// successor is about to start on the saved state (after a cpr-reboot or a normal save): whoever
/// waits for this process sees it exit without waiting for the teardown. The caller must exit
/// right after.
pub fn detach_teardown() -> std::io::Result<libc::pid_t> {
    // SAFETY: pidfd_open on our own pid; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as libc::c_int;
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The child runs on this stack until it exits; the process exits first, so it is never freed.
    let stack = Box::leak(vec![0u8; KEEPER_STACK].into_boxed_slice());
    // SAFETY: the stack is leaked; the child only makes raw syscalls on the pidfd number it is
    // given (see `teardown_main`).
    unsafe {
        clone_vm(
            stack,
            teardown_main,
            pidfd as usize as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_FILES,
        )
    }
    .inspect_err(|_| {
        // SAFETY: closing the pidfd opened above, which nothing else uses.
        unsafe { libc::close(pidfd) };
    })
}

/// Takes ownership of an inherited fd and makes it close-on-exec again.
///
/// # Safety
/// `fd` must be an open fd inherited across `execve` that nothing else in this process owns.
pub unsafe fn adopt_fd(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: guaranteed by the caller.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(&owned, true)?;
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn rollback_argv_loads_the_state() {
        let a = args(&[
            "vmmd",
            "--api-socket",
            "/s",
            "--incoming",
            "defer",
            "--fault-inject",
            "crash-during-load",
            "--vcpus",
            "2",
        ]);
        let b = with_incoming_file(&a, Path::new("/tmp/st"));
        assert_eq!(
            b,
            args(&[
                "vmmd",
                "--api-socket",
                "/s",
                "--vcpus",
                "2",
                "--incoming",
                "file:/tmp/st"
            ])
        );
        assert_eq!(incoming_arg(&b), Some("file:/tmp/st"));
        assert_eq!(
            incoming_arg(&args(&["x", "--incoming=defer"])),
            Some("defer")
        );
        assert_eq!(incoming_arg(&args(&["x"])), None);
    }

    #[test]
    fn preflight_refuses_bad_binaries() {
        let dir = std::env::temp_dir().join(format!("vmmd-preflight-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let missing = dir.join("missing");
        assert!(matches!(
            preflight(&args(&[
                missing.to_str().expect("utf8"),
                "--incoming",
                "defer"
            ])),
            Err(CprExecError::Binary { .. })
        ));
        let script = dir.join("script");
        std::fs::write(&script, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let s = script.to_str().expect("utf8");
        assert!(matches!(
            preflight(&args(&[s, "--incoming", "defer"])),
            Err(CprExecError::NotExecutable(_))
        ));
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(matches!(
            preflight(&args(&[s, "--incoming", "defer"])),
            Err(CprExecError::NotElf(_))
        ));
        let exe = std::env::current_exe().expect("exe");
        let e = exe.to_str().expect("utf8");
        assert!(matches!(
            preflight(&args(&[e])),
            Err(CprExecError::NotIncoming)
        ));
        preflight(&args(&[e, "--incoming", "defer"])).expect("an ELF with --incoming passes");
        assert!(matches!(preflight(&[]), Err(CprExecError::NoExecArgs)));
    }

    #[test]
    fn cloexec_is_restored_on_failure() {
        let good = open_self().expect("open");
        let mut p = PreservedFds::new(vec![
            ("good".into(), good.as_raw_fd()),
            ("bad".into(), 9999),
        ]);
        assert!(p.clear_cloexec().is_err());
        // SAFETY: F_GETFD only queries.
        let flags = unsafe { libc::fcntl(good.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "the good fd got its flag back");
    }
}
