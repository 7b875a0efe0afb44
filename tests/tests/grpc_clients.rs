//! gRPC clients other than tonic reach vmmd over its unix socket with their default settings.
//!
//! Python grpcio (C-core, as behind C++, Ruby and PHP) sends the percent-encoded socket path as
//! `:authority`, grpc-java the raw path, grpc-go `localhost`; `tests/grpc/grpc_clients.py`
//! tries all three with health, reflection (no .proto) and `vmmd.v1` calls, and tonic is checked
//! here. grpcio must be installed (`.ci/run` does): without it this test fails and says how.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cpr_tests::{VmmdOptions, VmmdProcess};
use vmmd_proto::v1::RunState;

const PIP: &str = "python3 -m pip install grpcio grpcio-reflection grpcio-health-checking protobuf";

/// Sends `bytes` on a fresh connection, closes its sending side and returns what vmmd answers.
fn raw_exchange(socket: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s.write_all(bytes).expect("write to vmmd");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .expect("vmmd closes the connection");
    answer
}

/// The GOAWAY frame's error code in a server's byte stream, if it sent one.
fn goaway_code(mut bytes: &[u8]) -> Option<u32> {
    while bytes.len() >= 9 {
        let len =
            (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2]);
        let payload = bytes.get(9..9 + len)?;
        if bytes[3] == 0x7 {
            return payload
                .get(4..8)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        }
        bytes = &bytes[9 + len..];
    }
    None
}

#[test]
fn python_grpcio_and_tonic_with_every_authority() {
    let vmm = VmmdProcess::spawn(VmmdOptions::new(1, "64M"));
    let socket = vmm.api().socket().to_path_buf();

    // Malformed clients get h2's own answer and change nothing: a header block naming a dynamic
    // table entry that does not exist is a GOAWAY(PROTOCOL_ERROR), as without the shim.
    let mut bad = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bad.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    bad.extend_from_slice(&[0, 0, 2, 0x1, 0x5, 0, 0, 0, 1, 0x82, 0xc0]);
    assert_eq!(
        goaway_code(&raw_exchange(&socket, &bad)),
        Some(0x1),
        "GOAWAY(PROTOCOL_ERROR)"
    );
    raw_exchange(&socket, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    raw_exchange(&socket, &bad[..30]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc/grpc_clients.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&socket)
        .arg(vmm.pid().to_string())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run python3 {}: {e}; install Python 3 and: {PIP}",
                script.display()
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}{stderr}\n(if grpcio is missing: {PIP})\nvmmd log:\n{}",
        script.display(),
        out.status,
        vmm.log()
    );
    assert!(stdout.contains("all authorities served"), "{stdout}");

    // tonic (cprctl's client, authority `[::]:50051`) still works on the same vmmd afterwards.
    let info = vmm.api().info().expect("tonic Info");
    assert_eq!(info.run_state, RunState::Running as i32, "{info:?}");
    assert_eq!(info.pid, vmm.pid(), "{info:?}");
    assert_eq!(vmm.api().pause().expect("tonic Pause"), RunState::Paused);
    assert_eq!(vmm.api().resume().expect("tonic Resume"), RunState::Running);
}
