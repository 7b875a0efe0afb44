//! A client of vmmd's console socket that timestamps what the test guest prints.
//!
//! The guest frames every line as `"\n<LINE>\n"` and emits a single `.` heartbeat byte about
//! every millisecond between lines. A background thread reads the socket, stamps each read with
//! the host monotonic clock, counts heartbeats and splits lines.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long `command` waits for the guest's answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// One complete line from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// When the read that completed the line returned.
    pub at: Instant,
    /// The line without framing newlines.
    pub text: String,
    /// Heartbeats received before this line.
    pub heartbeats_before: usize,
}

pub use cprctl::console::{LineSplitter, Token};

/// Everything received so far.
#[derive(Debug, Default)]
struct Record {
    raw: Vec<u8>,
    /// `(when, offset into raw)` of every read.
    reads: Vec<(Instant, usize)>,
    heartbeats: Vec<Instant>,
    lines: Vec<Line>,
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    record: Mutex<Record>,
    changed: Condvar,
}

/// A connected console client.
#[derive(Debug)]
pub struct Console {
    path: PathBuf,
    writer: UnixStream,
    shared: Arc<Shared>,
    /// Index of the first line `wait_for_line` has not consumed yet.
    cursor: usize,
    connected_at: Instant,
    reader: Option<JoinHandle<()>>,
}

impl Console {
    /// Connects to the console socket at `path`, retrying until `timeout` while it is absent.
    pub fn connect(path: &Path, timeout: Duration) -> Self {
        Self::connect_polling(path, timeout, Duration::from_millis(20))
    }

    /// Like [`Console::connect`], retrying every `interval`.
    pub fn connect_polling(path: &Path, timeout: Duration, interval: Duration) -> Self {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(interval),
                Err(e) => panic!("cannot connect to console {}: {e}", path.display()),
            }
        };
        let connected_at = Instant::now();
        let reader_stream = stream
            .try_clone()
            .expect("cannot clone the console socket for the reader thread");
        let shared = Arc::new(Shared::default());
        let reader_shared = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name("console-reader".into())
            .spawn(move || read_loop(reader_stream, &reader_shared))
            .expect("cannot spawn the console reader thread");
        Self {
            path: path.to_path_buf(),
            writer: stream,
            shared,
            cursor: 0,
            connected_at,
            reader: Some(reader),
        }
    }

    /// When the connection was established.
    pub fn connected_at(&self) -> Instant {
        self.connected_at
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&self) -> MutexGuard<'_, Record> {
        self.shared
            .record
            .lock()
            .expect("console reader thread panicked")
    }

    /// Sends bytes to the guest.
    pub fn send(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("cannot write to console {}: {e}", self.path.display()));
    }

    /// Waits for the next unconsumed line starting with `prefix`, consuming it and those before.
    pub fn try_wait_for_line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut rec = self.record();
        loop {
            if let Some(i) = rec.lines[self.cursor..]
                .iter()
                .position(|l| l.text.starts_with(prefix))
            {
                let i = self.cursor + i;
                let text = rec.lines[i].text.clone();
                drop(rec);
                self.cursor = i + 1;
                return Some(text);
            }
            let now = Instant::now();
            if rec.closed || now >= deadline {
                return None;
            }
            rec = self
                .shared
                .changed
                .wait_timeout(rec, deadline - now)
                .expect("console reader thread panicked")
                .0;
        }
    }

    /// Like [`Console::try_wait_for_line`] but panics with the recent output on timeout.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        match self.try_wait_for_line(prefix, timeout) {
            Some(line) => line,
            None => panic!(
                "no console line starting with {prefix:?} within {timeout:?} (closed: {}); \
                 recent output: {}",
                self.is_closed(),
                self.output_tail(600)
            ),
        }
    }

    /// Sends a one-byte guest command and returns its answer line.
    ///
    /// `v` → `VERIFY ...`, `c` → `COUNTERS ...`, `g` → `GAPS RESET`, `s` → `SUSPEND`, `q` → `POWEROFF`.
    pub fn command(&mut self, cmd: u8) -> String {
        let prefix = match cmd {
            b'v' => "VERIFY",
            b'c' => "COUNTERS",
            b'g' => "GAPS RESET",
            b's' => "SUSPEND",
            b'q' => "POWEROFF",
            other => panic!("unknown guest command {:?}", other as char),
        };
        // Only an answer printed after the command counts.
        let seen = self.record().lines.len();
        self.cursor = self.cursor.max(seen);
        self.send(&[cmd]);
        self.wait_for_line(prefix, COMMAND_TIMEOUT)
    }

    /// Sends `c` and parses the COUNTERS line.
    pub fn counters(&mut self) -> crate::guest::Counters {
        self.counters_and_received().0
    }

    /// Sends `c`; the parsed COUNTERS line and how many heartbeat bytes arrived before it.
    ///
    /// The guest reads its heartbeat counter as it starts the line and emits no heartbeat inside
    /// a line, so between two such answers the counter's increase must equal the bytes received.
    pub fn counters_and_received(&mut self) -> (crate::guest::Counters, usize) {
        let line = self.command(b'c');
        let counters = crate::guest::Counters::parse(&line)
            .unwrap_or_else(|e| panic!("bad COUNTERS line {line:?}: {e}"));
        let received = self
            .record()
            .lines
            .iter()
            .rev()
            .find(|l| l.text == line)
            .map(|l| l.heartbeats_before)
            .expect("the answer line is in the record");
        (counters, received)
    }

    /// Sends `g`: the guest forgets the largest gaps it saw (`Counters::maxgap_us`).
    pub fn reset_gaps(&mut self) {
        self.command(b'g');
    }

    /// Sends `v` and parses the VERIFY line.
    pub fn verify(&mut self) -> crate::guest::Verify {
        let line = self.command(b'v');
        crate::guest::Verify::parse(&line)
            .unwrap_or_else(|e| panic!("bad VERIFY line {line:?}: {e}"))
    }

    /// Heartbeats received in total.
    pub fn heartbeats(&self) -> usize {
        self.record().heartbeats.len()
    }

    /// Heartbeats received at or after `since`.
    pub fn heartbeats_since(&self, since: Instant) -> usize {
        let rec = self.record();
        let first = rec.heartbeats.partition_point(|&t| t < since);
        rec.heartbeats.len() - first
    }

    /// When the first heartbeat arrived, if one has.
    pub fn first_heartbeat(&self) -> Option<Instant> {
        self.record().heartbeats.first().copied()
    }

    /// When the first heartbeat at or after `since` arrived, if one has.
    pub fn first_heartbeat_since(&self, since: Instant) -> Option<Instant> {
        let rec = self.record();
        let i = rec.heartbeats.partition_point(|&t| t < since);
        rec.heartbeats.get(i).copied()
    }

    /// Waits until `n` heartbeats arrived after `since`; returns whether they did within `timeout`.
    pub fn wait_for_heartbeats(&self, since: Instant, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut rec = self.record();
        loop {
            let first = rec.heartbeats.partition_point(|&t| t < since);
            if rec.heartbeats.len() - first >= n {
                return true;
            }
            let now = Instant::now();
            if rec.closed || now >= deadline {
                return false;
            }
            rec = self
                .shared
                .changed
                .wait_timeout(rec, deadline - now)
                .expect("console reader thread panicked")
                .0;
        }
    }

    /// The longest stretch in `[from, to]` without a heartbeat (window edges count as bounds).
    pub fn max_heartbeat_gap(&self, from: Instant, to: Instant) -> Duration {
        let rec = self.record();
        let start = rec.heartbeats.partition_point(|&t| t < from);
        let end = rec.heartbeats.partition_point(|&t| t <= to);
        let mut prev = from;
        let mut gap = Duration::ZERO;
        for &t in &rec.heartbeats[start..end] {
            gap = gap.max(t - prev);
            prev = t;
        }
        gap.max(to.saturating_duration_since(prev))
    }

    /// The longest gap between consecutive heartbeats from the last one before `from` to the first
    /// one after `to`: the guest-visible blackout of something that ran in `[from, to]`.
    pub fn max_heartbeat_gap_across(&self, from: Instant, to: Instant) -> Duration {
        let rec = self.record();
        let start = rec
            .heartbeats
            .partition_point(|&t| t < from)
            .saturating_sub(1);
        let end = (rec.heartbeats.partition_point(|&t| t <= to) + 1).min(rec.heartbeats.len());
        rec.heartbeats[start..end]
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// All complete lines so far (consumed or not).
    pub fn lines(&self) -> Vec<Line> {
        self.record().lines.clone()
    }

    /// Lines reporting a guest-detected failure (`FAIL ...`, `VERIFY FAIL ...`, `PANIC ...`).
    pub fn failures(&self) -> Vec<String> {
        self.record()
            .lines
            .iter()
            .filter(|l| is_failure(&l.text))
            .map(|l| l.text.clone())
            .collect()
    }

    /// Whether vmmd closed the connection.
    pub fn is_closed(&self) -> bool {
        self.record().closed
    }

    /// Waits until vmmd closes the connection; returns whether it did within `timeout`.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut rec = self.record();
        while !rec.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            rec = self
                .shared
                .changed
                .wait_timeout(rec, deadline - now)
                .expect("console reader thread panicked")
                .0;
        }
        true
    }

    /// The last `max` bytes received, with runs of heartbeats shortened, for diagnostics.
    pub fn output_tail(&self, max: usize) -> String {
        let rec = self.record();
        let start = rec.raw.len().saturating_sub(max);
        let text = String::from_utf8_lossy(&rec.raw[start..]).into_owned();
        let mut out = String::with_capacity(text.len());
        let mut dots = 0usize;
        for c in text.chars() {
            if c == '.' {
                dots += 1;
                continue;
            }
            if dots > 0 {
                out.push_str(&if dots > 3 {
                    format!("<{dots} heartbeats>")
                } else {
                    ".".repeat(dots)
                });
                dots = 0;
            }
            out.push(c);
        }
        if dots > 0 {
            out.push_str(&format!("<{dots} heartbeats>"));
        }
        format!("{out:?}")
    }

    /// The raw bytes received so far, each read stamped with the host monotonic time.
    pub fn raw(&self) -> (Vec<u8>, Vec<(Instant, usize)>) {
        let rec = self.record();
        (rec.raw.clone(), rec.reads.clone())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Whether a guest line reports a failure.
pub fn is_failure(line: &str) -> bool {
    ["FAIL", "VERIFY FAIL", "PANIC"]
        .iter()
        .any(|p| line.starts_with(p))
}

fn read_loop(mut stream: UnixStream, shared: &Shared) {
    let mut splitter = LineSplitter::default();
    let mut buf = [0u8; 8192];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        let at = Instant::now();
        let mut rec = shared.record.lock().expect("console record poisoned");
        if n == 0 {
            rec.closed = true;
            shared.changed.notify_all();
            return;
        }
        let offset = rec.raw.len();
        rec.reads.push((at, offset));
        rec.raw.extend_from_slice(&buf[..n]);
        for &b in &buf[..n] {
            match splitter.push(b) {
                Some(Token::Heartbeat) => rec.heartbeats.push(at),
                Some(Token::Line(text)) => {
                    let heartbeats_before = rec.heartbeats.len();
                    rec.lines.push(Line {
                        at,
                        text,
                        heartbeats_before,
                    });
                }
                None => {}
            }
        }
        drop(rec);
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_records_lines_heartbeats_and_gaps() {
        let dir = crate::TestDir::new("console-unit");
        let path = dir.join("c.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            s.write_all(b"\nREADY cpus=1 ram_mib=64 seed=0000000000000001\n...")
                .expect("write");
            let mut cmd = [0u8; 1];
            s.read_exact(&mut cmd).expect("read command");
            assert_eq!(&cmd, b"v");
            std::thread::sleep(Duration::from_millis(150));
            s.write_all(b"..\nVERIFY OK 0123456789abcdef\n.")
                .expect("write");
        });
        let mut c = Console::connect(&path, Duration::from_secs(5));
        let ready = c.wait_for_line("READY", Duration::from_secs(5));
        assert!(ready.starts_with("READY cpus=1"));
        let start = Instant::now() - Duration::from_secs(60);
        assert!(c.wait_for_heartbeats(start, 3, Duration::from_secs(5)));
        // The server sends nothing more until it gets the command.
        let before = Instant::now();
        let answer = c.command(b'v');
        assert_eq!(answer, "VERIFY OK 0123456789abcdef");
        server.join().expect("server");
        assert!(c.wait_closed(Duration::from_secs(5)));
        let after = Instant::now();
        assert_eq!(c.heartbeats(), 6);
        assert_eq!(c.heartbeats_since(before), 3);
        assert!(c.max_heartbeat_gap(before, after) >= Duration::from_millis(100));
        assert!(c.failures().is_empty());
    }
}
