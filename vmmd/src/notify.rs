//! systemd readiness notification (`sd_notify`): READY/RELOADING/STOPPING/STATUS on the datagram
//! socket named by `$NOTIFY_SOCKET`, so `Type=notify` units see vmmd come up, and see a cpr-exec live
//! update as a reload of the same main PID. Without `$NOTIFY_SOCKET` every call does nothing.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (newline-separated `KEY=VALUE` pairs) to systemd, if vmmd runs under it.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name),
        None => SocketAddr::from_pathname(std::path::Path::new(&path)),
    };
    let result = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The service is up (or back up after a live update).
pub fn ready(status: &str) {
    notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS={status}",
        std::process::id()
    ));
}

/// A live update started: systemd shows the unit as reloading until the next [`ready`].
pub fn reloading(status: &str) {
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS={status}",
        crate::sys::fd::monotonic_ns() / 1000
    ));
}

/// A status line for `systemctl status`.
pub fn status(status: &str) {
    notify(&format!("STATUS={status}"));
}

/// vmmd is shutting down.
pub fn stopping() {
    notify("STOPPING=1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_notify_socket() {
        let dir = std::env::temp_dir().join(format!("vmmd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).expect("bind");
        // SAFETY (test): no other test reads NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        ready("running");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).expect("recv");
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(msg.starts_with("READY=1\nMAINPID="), "{msg}");
        assert!(msg.ends_with("STATUS=running"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
