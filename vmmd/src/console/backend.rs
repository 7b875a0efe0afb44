//! The backends' host side: the unix socket server, the pseudo-terminal, the output file, and the
//! fds they consist of.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::socket::{
    bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use nix::sys::stat::{fchmod, Mode};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};

use super::{ConsoleError, SerialBackendSpec};

/// CPR fd-table name of the attached client.
const CLIENT: &str = "console-client";

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

impl ConsoleFds {
    /// The fds by CPR table name (`console-listener`, `console-client`, `console-pty-master`,
    /// `console-pty-slave`, `console-file`).
    pub fn named(&self) -> Vec<(&'static str, RawFd)> {
        [
            ("console-listener", &self.listener),
            (CLIENT, &self.client),
            ("console-pty-master", &self.pty_master),
            ("console-pty-slave", &self.pty_slave),
            ("console-file", &self.file),
        ]
        .into_iter()
        .filter_map(|(n, fd)| fd.as_ref().map(|fd| (n, fd.as_raw_fd())))
        .collect()
    }

    /// Those that stay fixed for the console's life: all but the client.
    pub(super) fn fixed(&self) -> Vec<(&'static str, RawFd)> {
        let mut v = self.named();
        v.retain(|(n, _)| *n != CLIENT);
        v
    }

    /// Takes each fd by CPR table name from `take` (fds inherited across `execve`).
    pub(super) fn take_named(mut take: impl FnMut(&str) -> Option<OwnedFd>) -> ConsoleFds {
        ConsoleFds {
            listener: take("console-listener"),
            client: take(CLIENT),
            pty_master: take("console-pty-master"),
            pty_slave: take("console-pty-slave"),
            file: take("console-file"),
        }
    }
}

/// A newly opened backend.
pub(super) struct Opened {
    pub(super) fds: ConsoleFds,
    pub(super) socket_file: Option<SocketFile>,
    pub(super) pty_path: Option<PathBuf>,
}

/// Opens the backend `spec` names (nothing for `null`).
pub(super) fn open_backend(spec: &SerialBackendSpec) -> Result<Opened, ConsoleError> {
    let mut opened = Opened {
        fds: ConsoleFds::default(),
        socket_file: None,
        pty_path: None,
    };
    match spec {
        SerialBackendSpec::Socket(path) => {
            let (listener, file) = listen_unix(path)?;
            tracing::info!(path = %path.display(), "guest serial console on unix socket");
            opened.fds.listener = Some(listener);
            opened.socket_file = Some(file);
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
            opened.fds.file = Some(OwnedFd::from(file));
        }
        SerialBackendSpec::Pty => {
            let (master, slave, path) = open_pty()?;
            tracing::info!(path = %path.display(), "guest serial console on pseudo-terminal");
            opened.fds.pty_master = Some(master);
            opened.fds.pty_slave = Some(slave);
            opened.pty_path = Some(path);
        }
        SerialBackendSpec::Null => {}
    }
    Ok(opened)
}

/// Sends what the client's socket takes at once (MSG_DONTWAIT) and returns how much. The caller
/// holds the output lock, under which the console loop retires the client fd before closing it.
pub(super) fn send_now(fd: RawFd, buf: &[u8]) -> usize {
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
pub(super) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The socket file at `path` as it is now (one inherited across `execve`).
    pub(super) fn at(path: &Path) -> Option<SocketFile> {
        std::fs::symlink_metadata(path).ok().map(|m| SocketFile {
            path: path.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Removes the path, but only if it is still the socket this console bound.
    pub(super) fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e,
                        "cannot remove the console socket");
                }
            }
            _ => {}
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
