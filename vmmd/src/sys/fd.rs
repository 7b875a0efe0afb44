//! Small fd and clock helpers shared by every layer.

use std::os::fd::{AsRawFd, RawFd};

/// Whether `fd` is an open descriptor of this process.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Sets or clears close-on-exec.
pub fn set_cloexec(fd: &impl AsRawFd, on: bool) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFD/F_SETFD on a descriptor the caller holds; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let new = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        if libc::fcntl(fd, libc::F_SETFD, new) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds (system-wide: comparable between the old and the new process).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloexec_toggles() {
        let f = std::fs::File::open("/proc/self/stat").expect("open");
        set_cloexec(&f, false).expect("clear");
        // SAFETY: F_GETFD only queries.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, 0);
        set_cloexec(&f, true).expect("set");
        assert!(fd_is_open(f.as_raw_fd()));
        assert!(monotonic_ns() > 0);
    }
}
