//! The console end to end: real sockets, files and pseudo-terminals.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::{open, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;

use super::*;

const LIMIT: Duration = Duration::from_secs(20);

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "vmmd-console-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect to console socket");
    s.set_read_timeout(Some(LIMIT)).expect("set timeout");
    s
}

fn read_exact_bytes(r: &mut impl Read, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).expect("read console output");
    buf
}

/// A sink collecting input, accepting at most `per_call` bytes per call (0 every other call
/// when `stutter`).
fn collecting_sink(per_call: usize, stutter: bool) -> (InputSink, Arc<Mutex<Vec<u8>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = Arc::clone(&got);
    let mut refuse_next = false;
    let sink: InputSink = Box::new(move |bytes: &[u8]| {
        if stutter {
            refuse_next = !refuse_next;
            if !refuse_next {
                return 0;
            }
        }
        let n = bytes.len().min(per_call);
        g.lock().unwrap().extend_from_slice(&bytes[..n]);
        n
    });
    (sink, got)
}

fn socket_console(dir: &TempDir, cap: usize) -> (Console, PathBuf) {
    let path = dir.path("console.sock");
    let c = Console::open(&SerialBackendSpec::Socket(path.clone()), cap).expect("open");
    (c, path)
}

#[test]
fn output_before_connect_is_delivered_in_order() {
    let dir = TempDir::new("order");
    let (console, path) = socket_console(&dir, DEFAULT_BUFFER_BYTES);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut w = console.writer();
    w.write_all(b"hello ").unwrap();
    w.clone().write_all(b"world\n").unwrap();
    assert!(!console.client_connected());
    let mut client = connect(&path);
    assert_eq!(read_exact_bytes(&mut client, 12), b"hello world\n");
    // Output while attached flows straight through.
    for i in 0..1000u32 {
        w.write_all(format!("{i};").as_bytes()).unwrap();
    }
    let expect: String = (0..1000u32).map(|i| format!("{i};")).collect();
    assert_eq!(
        read_exact_bytes(&mut client, expect.len()),
        expect.as_bytes()
    );
    assert_eq!(console.dropped_bytes(), 0);
    let names: Vec<String> = console.raw_fds().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"console-listener".to_owned()));
    wait_until("client attached", || console.client_connected());
    assert!(console.raw_fds().iter().any(|(n, _)| n == "console-client"));

    // After the client leaves, output is buffered again for the next one.
    drop(client);
    wait_until("client detached", || !console.client_connected());
    w.write_all(b"again\n").unwrap();
    let mut client = connect(&path);
    assert_eq!(read_exact_bytes(&mut client, 6), b"again\n");

    drop(console);
    assert!(!path.exists(), "socket file removed on drop");
}

#[test]
fn full_buffer_drops_oldest_and_counts() {
    let dir = TempDir::new("bound");
    let (console, path) = socket_console(&dir, 16);
    let mut w = console.writer();
    w.write_all(b"0123456789").unwrap();
    w.write_all(b"abcdefghij").unwrap();
    assert_eq!(console.dropped_bytes(), 4);
    w.write_all(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ").unwrap();
    assert_eq!(console.dropped_bytes(), 4 + 26);
    assert_eq!(console.buffered_bytes(), 16);
    let mut client = connect(&path);
    assert_eq!(read_exact_bytes(&mut client, 16), b"KLMNOPQRSTUVWXYZ");
    w.write_all(b"!").unwrap();
    assert_eq!(read_exact_bytes(&mut client, 1), b"!");
    assert_eq!(console.dropped_bytes(), 30);
}

#[test]
fn slow_client_never_blocks_the_writer() {
    let dir = TempDir::new("slow");
    let (console, path) = socket_console(&dir, 4096);
    let _client = connect(&path); // never reads
    wait_until("client attached", || console.client_connected());
    let mut w = console.writer();
    let chunk = [b'x'; 4096];
    let total = 4 << 20;
    let start = Instant::now();
    for _ in 0..total / chunk.len() {
        w.write_all(&chunk).unwrap();
    }
    assert!(start.elapsed() < LIMIT);
    assert!(console.buffered_bytes() <= 4096);
    assert!(console.dropped_bytes() > 0);
}

#[test]
fn second_client_is_told_busy_and_first_keeps_working() {
    let dir = TempDir::new("busy");
    let (console, path) = socket_console(&dir, DEFAULT_BUFFER_BYTES);
    let (sink, got) = collecting_sink(usize::MAX, false);
    console.set_input_sink(sink);
    let mut first = connect(&path);
    wait_until("first client attached", || console.client_connected());

    let mut second = connect(&path);
    let mut line = String::new();
    second.read_to_string(&mut line).expect("read busy line");
    assert_eq!(
        line,
        format!(
            "vmmd: console busy: another client is attached to {}\n",
            path.display()
        )
    );
    assert!(console.client_connected());

    console.writer().write_all(b"still here\n").unwrap();
    assert_eq!(read_exact_bytes(&mut first, 11), b"still here\n");
    first.write_all(b"typed").unwrap();
    wait_until("input", || got.lock().unwrap().as_slice() == b"typed");
}

#[test]
fn input_reaches_sink_in_order_with_partial_accepts() {
    let dir = TempDir::new("input");
    let (console, path) = socket_console(&dir, DEFAULT_BUFFER_BYTES);
    let data: Vec<u8> = (0..6_000u32).map(|i| (i % 251) as u8).collect();
    let mut client = connect(&path);
    // Sent before any sink exists: kept until one is set.
    client.write_all(&data[..100]).unwrap();
    wait_until("client attached", || console.client_connected());
    let (sink, got) = collecting_sink(3, true);
    console.set_input_sink(sink);
    let writer = {
        let mut client = client.try_clone().unwrap();
        let rest = data[100..].to_vec();
        std::thread::spawn(move || client.write_all(&rest).unwrap())
    };
    wait_until("all input", || got.lock().unwrap().len() >= data.len());
    writer.join().unwrap();
    assert_eq!(*got.lock().unwrap(), data);
}

#[test]
fn input_sent_just_before_hangup_is_kept() {
    let dir = TempDir::new("hangup");
    let (console, path) = socket_console(&dir, DEFAULT_BUFFER_BYTES);
    let (sink, got) = collecting_sink(1, false);
    console.set_input_sink(sink);
    {
        let mut client = connect(&path);
        client.write_all(b"VERIFY\n").unwrap();
    }
    wait_until("input", || got.lock().unwrap().as_slice() == b"VERIFY\n");
    wait_until("client detached", || !console.client_connected());
}

#[test]
fn stale_socket_replaced_and_others_refused() {
    let dir = TempDir::new("stale");
    let path = dir.path("c.sock");
    drop(UnixListener::bind(&path).unwrap()); // leaves a stale socket file
    let c = Console::open(&SerialBackendSpec::Socket(path.clone()), 64).expect("open");
    // A live one is not stolen.
    assert!(matches!(
        Console::open(&SerialBackendSpec::Socket(path.clone()), 64),
        Err(ConsoleError::SocketInUse { .. })
    ));
    drop(c);
    let regular = dir.path("regular");
    std::fs::write(&regular, b"x").unwrap();
    assert!(matches!(
        Console::open(&SerialBackendSpec::Socket(regular.clone()), 64),
        Err(ConsoleError::NotASocket { .. })
    ));
    assert_eq!(std::fs::read(&regular).unwrap(), b"x");
    let long = dir.path(&"x".repeat(200));
    assert!(matches!(
        Console::open(&SerialBackendSpec::Socket(long), 64),
        Err(ConsoleError::SocketPathTooLong { .. })
    ));
}

#[test]
fn file_backend_appends() {
    let dir = TempDir::new("file");
    let path = dir.path("serial.log");
    std::fs::write(&path, b"old\n").unwrap();
    let console = Console::open(&SerialBackendSpec::File(path.clone()), 1024).expect("open");
    console.writer().write_all(b"new ").unwrap();
    wait_until("file output", || {
        std::fs::read(&path).unwrap() == b"old\nnew "
    });
    console.writer().write_all(b"line\n").unwrap();
    drop(console); // flushes what is left
    assert_eq!(std::fs::read(&path).unwrap(), b"old\nnew line\n");

    let fresh = dir.path("fresh.log");
    let console = Console::open(&SerialBackendSpec::File(fresh.clone()), 1024).expect("open");
    assert!(console.raw_fds().iter().any(|(n, _)| n == "console-file"));
    console.writer().write_all(b"x").unwrap();
    drop(console);
    assert_eq!(std::fs::read(&fresh).unwrap(), b"x");
}

#[test]
fn null_backend_discards() {
    let console = Console::open(&SerialBackendSpec::Null, 16).expect("open");
    console.writer().write_all(&[0u8; 100]).unwrap();
    assert_eq!(console.dropped_bytes(), 0);
    assert_eq!(console.buffered_bytes(), 0);
    assert!(console.pty_path().is_none());
    assert!(console.raw_fds().is_empty());
    assert_eq!(console.spec(), &SerialBackendSpec::Null);
}

#[test]
fn pty_round_trip() {
    let console = Console::open(&SerialBackendSpec::Pty, 1024).expect("open pty");
    let slave_path = console.pty_path().expect("pty path").to_owned();
    let names: Vec<String> = console.raw_fds().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"console-pty-master".to_owned()));
    let (sink, got) = collecting_sink(2, true);
    console.set_input_sink(sink);

    // Output written while nobody has the slave open is not lost.
    console.writer().write_all(b"boot\r\n").unwrap();
    let slave = open(
        &slave_path,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .expect("open slave");
    let mut slave = File::from(slave);
    console.writer().write_all(b"ready\n").unwrap();
    let mut got_out = Vec::new();
    let deadline = Instant::now() + LIMIT;
    while got_out.len() < 12 {
        assert!(Instant::now() < deadline, "timed out reading the pty");
        let mut pfd = [PollFd::new(slave.as_fd(), PollFlags::POLLIN)];
        if poll(&mut pfd, PollTimeout::from(100u16)).unwrap() == 0 {
            continue;
        }
        let mut buf = [0u8; 64];
        let n = slave.read(&mut buf).unwrap();
        got_out.extend_from_slice(&buf[..n]);
    }
    // Raw mode: no CR/LF translation, no echo of our own output.
    assert_eq!(got_out, b"boot\r\nready\n");

    slave.write_all(b"cmd\r\n").unwrap();
    wait_until("pty input", || got.lock().unwrap().as_slice() == b"cmd\r\n");
    drop(console);
}

#[test]
fn a_stopped_console_saves_and_restores_its_bytes_through_persist() {
    use crate::persist::Persist;
    let dir = TempDir::new("persist");
    let (console, path) = socket_console(&dir, 64);
    console.writer().write_all(b"undelivered").unwrap();
    let stopped = console.quiesce();
    let state = stopped.save().expect("save");
    assert_eq!(state.output, b"undelivered");
    assert!(state.input.is_empty());
    let json = serde_json::to_vec(&state).expect("serialize");
    let state: ConsoleState = serde_json::from_slice(&json).expect("deserialize");
    assert!(matches!(
        StoppedConsole::restore(
            ConsoleArgs {
                handover: ConsoleHandover::inherited(SerialBackendSpec::Null, |_| None, None),
                buffer_bytes: 0,
            },
            &state,
        ),
        Err(ConsoleError::ZeroBuffer)
    ));
    let args = ConsoleArgs {
        handover: stopped.into_handover(),
        buffer_bytes: 64,
    };
    let console =
        Console::resume(StoppedConsole::restore(args, &state).expect("restore")).expect("resume");
    let mut client = connect(&path);
    assert_eq!(read_exact_bytes(&mut client, 11), b"undelivered");
    drop(console);
    assert!(!path.exists(), "the restored console owns the socket file");
}

#[test]
fn the_loop_serves_from_a_continuation_comes_back_and_finishes() {
    let dir = TempDir::new("bridge");
    let (console, path) = socket_console(&dir, DEFAULT_BUFFER_BYTES);
    let offered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let o = Arc::clone(&offered);
    console.set_input_sink(Box::new(move |bytes: &[u8]| {
        o.store(!bytes.is_empty(), Ordering::SeqCst);
        0
    }));
    let mut client = connect(&path);
    wait_until("client attached", || console.client_connected());

    console
        .detach_to_bridge(console.loop_fds(), LIMIT)
        .expect("move to the bridge");
    let pid = console.bridge_pid().expect("a continuation serves");
    assert_ne!(pid, std::process::id() as i32);
    console.writer().write_all(b"bridged\n").unwrap();
    assert_eq!(read_exact_bytes(&mut client, 8), b"bridged\n");

    console.reattach_from_bridge(LIMIT);
    assert!(console.bridge_pid().is_none());
    console.writer().write_all(b"home\n").unwrap();
    assert_eq!(read_exact_bytes(&mut client, 5), b"home\n");

    client.write_all(b"typed").unwrap();
    wait_until("input offered", || offered.load(Ordering::SeqCst));
    console
        .detach_to_bridge(console.loop_fds(), LIMIT)
        .expect("move again");
    let state = console.finish_bridge(LIMIT);
    assert_eq!(state.input, b"typed", "input the UART refused is handed on");
}
