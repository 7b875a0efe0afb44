//! What a console hands over across `execve`: its backend's fds and process facts, never the
//! guest's bytes (those are a [`super::ConsoleState`]).

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

use super::backend::{ConsoleFds, SocketFile};
use super::SerialBackendSpec;

/// The fds of a stopped console, ready to be carried across `execve` or restarted after a failed
/// one.
#[derive(Debug)]
pub struct ConsoleHandover {
    /// The backend.
    pub spec: SerialBackendSpec,
    /// Its fds (close-on-exec as opened; the CPR engine clears the flag for the exec).
    pub fds: ConsoleFds,
    /// The pty slave path (pty backend).
    pub pty_path: Option<PathBuf>,
    pub(super) socket_file: Option<SocketFile>,
}

impl ConsoleHandover {
    /// The fds by CPR table name.
    pub fn named_fds(&self) -> Vec<(&'static str, RawFd)> {
        self.fds.named()
    }

    /// Rebuilds a hand-over from fds inherited across `execve`: `take(name)` yields each fd the
    /// previous process listed under that name.
    pub fn inherited(
        spec: SerialBackendSpec,
        take: impl FnMut(&str) -> Option<OwnedFd>,
        pty_path: Option<PathBuf>,
    ) -> ConsoleHandover {
        let fds = ConsoleFds::take_named(take);
        let socket_file = match (&spec, &fds.listener) {
            (SerialBackendSpec::Socket(path), Some(_)) => SocketFile::at(path),
            _ => None,
        };
        ConsoleHandover {
            spec,
            fds,
            pty_path,
            socket_file,
        }
    }
}
