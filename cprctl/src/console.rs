//! `cprctl console`: attach the terminal (or a pipe) to a vmmd console socket.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::termios::{self, OutputFlags, SetArg, Termios};

/// The byte Ctrl-] sends; it detaches an interactive session.
pub const ESCAPE_BYTE: u8 = 0x1d;

/// What vmmd writes to a second client before closing it.
const BUSY_PREFIX: &[u8] = b"vmmd: console busy";

/// Why the console session could not run.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The console socket could not be opened.
    #[error(
        "cannot connect to console socket {}: {source}; check that vmmd is running with \
         --serial socket={}",
        path.display(),
        path.display()
    )]
    Connect {
        /// The console socket path.
        path: PathBuf,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// Another client holds the console.
    #[error(
        "console {} is busy: another client is attached; detach it (Ctrl-]) and retry",
        path.display()
    )]
    Busy {
        /// The console socket path.
        path: PathBuf,
    },
    /// The terminal could not be switched to raw mode.
    #[error(
        "cannot put the terminal into raw mode: {source}; run without a tty to use a plain pipe"
    )]
    RawMode {
        /// The termios error.
        #[source]
        source: nix::Error,
    },
    /// Copying console output to stdout failed.
    #[error("cannot write console output to stdout: {source}")]
    Stdout {
        /// The write error.
        #[source]
        source: std::io::Error,
    },
    /// The input thread could not be started.
    #[error("cannot start the console input thread: {source}")]
    Thread {
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
}

/// How the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The user pressed Ctrl-].
    Detached,
    /// stdin reached end of file (pipe mode) and the linger time passed.
    InputClosed,
    /// vmmd closed the console (VM gone or vmmd exiting).
    RemoteClosed,
}

const ENDED_NONE: u8 = 0;
const ENDED_DETACHED: u8 = 1;
const ENDED_INPUT: u8 = 2;

/// Attaches stdin/stdout to the console at `path` until detach, input EOF (+`linger`) or close.
///
/// A terminal on stdin is put in raw mode (restored on return) and Ctrl-] detaches; any other
/// stdin is a plain pipe.
pub fn attach(path: &Path, linger: Duration) -> Result<Ended, ConsoleError> {
    let interactive = termios::tcgetattr(std::io::stdin().as_fd()).is_ok();
    attach_with(path, linger, interactive)
}

fn attach_with(path: &Path, linger: Duration, interactive: bool) -> Result<Ended, ConsoleError> {
    let stream = UnixStream::connect(path).map_err(|source| ConsoleError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let input_stream = stream.try_clone().map_err(|source| ConsoleError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let _raw = if interactive {
        let guard = RawMode::enable()?;
        eprintln!("Connected to {}. Press Ctrl-] to detach.", path.display());
        Some(guard)
    } else {
        None
    };

    let ended = Arc::new(AtomicU8::new(ENDED_NONE));
    let ended_in = Arc::clone(&ended);
    std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || pump_input(input_stream, interactive, linger, &ended_in))
        .map_err(|source| ConsoleError::Thread { source })?;

    let busy = pump_output(stream)?;
    if busy {
        return Err(ConsoleError::Busy {
            path: path.to_path_buf(),
        });
    }
    let how = match ended.load(Ordering::SeqCst) {
        ENDED_DETACHED => Ended::Detached,
        ENDED_INPUT => Ended::InputClosed,
        _ => Ended::RemoteClosed,
    };
    if interactive {
        let what = match how {
            Ended::Detached => "detached",
            Ended::InputClosed => "input closed",
            Ended::RemoteClosed => "console closed by vmmd",
        };
        eprint!("\n[{what}]\n");
    }
    Ok(how)
}

/// Copies the socket to stdout until it closes; returns whether vmmd said the console is busy.
fn pump_output(mut stream: UnixStream) -> Result<bool, ConsoleError> {
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 4096];
    let mut head = Vec::with_capacity(BUSY_PREFIX.len());
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // A reset or a shutdown from the input thread both end the session.
            Err(_) => break,
        };
        if head.len() < BUSY_PREFIX.len() {
            let take = (BUSY_PREFIX.len() - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        stdout
            .write_all(&buf[..n])
            .and_then(|()| stdout.flush())
            .map_err(|source| ConsoleError::Stdout { source })?;
    }
    Ok(head == BUSY_PREFIX)
}

/// Copies stdin to the socket; ends the session on Ctrl-] (interactive) or on EOF after `linger`.
fn pump_input(mut stream: UnixStream, interactive: bool, linger: Duration, ended: &AtomicU8) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "reading stdin failed; closing the console input");
                0
            }
        };
        if n == 0 {
            // Give the guest time to answer what was just sent, then end the session.
            std::thread::sleep(linger);
            ended.store(ENDED_INPUT, Ordering::SeqCst);
            break;
        }
        let (data, detach) = split_at_escape(&buf[..n], interactive);
        if !data.is_empty() && stream.write_all(data).is_err() {
            // vmmd closed the console; the output side notices and ends the session.
            return;
        }
        if detach {
            ended.store(ENDED_DETACHED, Ordering::SeqCst);
            break;
        }
    }
    // Unblocks the output side's read.
    let _ = stream.shutdown(Shutdown::Both);
}

/// The bytes to forward and whether the escape byte was seen (only honoured when interactive).
pub fn split_at_escape(data: &[u8], interactive: bool) -> (&[u8], bool) {
    if !interactive {
        return (data, false);
    }
    match data.iter().position(|&b| b == ESCAPE_BYTE) {
        Some(i) => (&data[..i], true),
        None => (data, false),
    }
}

/// Raw terminal mode on stdin, restored on drop.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enable() -> Result<Self, ConsoleError> {
        let stdin = std::io::stdin();
        let saved =
            termios::tcgetattr(stdin.as_fd()).map_err(|source| ConsoleError::RawMode { source })?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        // Keep "\n" -> "\r\n" on output so guest lines start at column 0.
        raw.output_flags |= OutputFlags::OPOST | OutputFlags::ONLCR;
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
            .map_err(|source| ConsoleError::RawMode { source })?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        if let Err(e) = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &self.saved) {
            tracing::warn!(error = %e, "could not restore the terminal; run `stty sane`");
        }
    }
}

/// What a byte of guest console output meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// A `.` between lines.
    Heartbeat,
    /// A complete line.
    Line(String),
}

/// Splits the guest's console byte stream into heartbeats and lines.
///
/// A `\n` outside a line opens one; the next `\n` closes it. Bytes other than `.` outside a
/// line also open one, so unframed text (vmmd's own `vmmd: console busy` message) is a line too.
#[derive(Debug, Default)]
pub struct LineSplitter {
    in_line: bool,
    buf: Vec<u8>,
}

impl LineSplitter {
    /// Feeds one byte; returns what it completed, if anything.
    pub fn push(&mut self, b: u8) -> Option<Token> {
        match (self.in_line, b) {
            (false, b'.') => Some(Token::Heartbeat),
            (false, b'\n') => {
                self.in_line = true;
                None
            }
            (false, b'\r') => None,
            (false, other) => {
                self.in_line = true;
                self.buf.push(other);
                None
            }
            // "\n\n": an empty line is just a fresh opening.
            (true, b'\n') if self.buf.is_empty() => None,
            (true, b'\n') => {
                self.in_line = false;
                let text = String::from_utf8_lossy(&self.buf).into_owned();
                self.buf.clear();
                Some(Token::Line(text))
            }
            (true, b'\r') => None,
            (true, other) => {
                self.buf.push(other);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8]) -> Vec<Token> {
        let mut s = LineSplitter::default();
        input.iter().filter_map(|&b| s.push(b)).collect()
    }

    #[test]
    fn heartbeats_between_framed_lines() {
        let tokens = split(b"..\nREADY cpus=2\n...\nVERIFY OK 00ff\n.");
        assert_eq!(
            tokens,
            [
                Token::Heartbeat,
                Token::Heartbeat,
                Token::Line("READY cpus=2".into()),
                Token::Heartbeat,
                Token::Heartbeat,
                Token::Heartbeat,
                Token::Line("VERIFY OK 00ff".into()),
                Token::Heartbeat,
            ]
        );
    }

    #[test]
    fn dots_inside_a_line_are_text_and_unframed_text_is_a_line() {
        assert_eq!(
            split(b"vmmd: console busy: a.b\n"),
            [Token::Line("vmmd: console busy: a.b".into())]
        );
        assert_eq!(
            split(b"\nA\n\nB\n"),
            [Token::Line("A".into()), Token::Line("B".into())]
        );
        assert_eq!(split(b"\nPARTIAL"), []);
    }

    #[test]
    fn escape_detaches_only_interactively_and_forwards_what_came_before() {
        assert_eq!(split_at_escape(b"ab\x1dcd", true), (&b"ab"[..], true));
        assert_eq!(
            split_at_escape(b"ab\x1dcd", false),
            (&b"ab\x1dcd"[..], false)
        );
        assert_eq!(split_at_escape(b"v", true), (&b"v"[..], false));
    }

    #[test]
    fn busy_console_is_reported_as_an_error() {
        let dir = std::env::temp_dir().join(format!("cprctl-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let path = dir.join("console.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind console");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            // The client may already be gone on a slow machine; its assertion says what happened.
            let _ = s.write_all(b"vmmd: console busy: another client is attached\n");
        });
        let err =
            attach_with(&path, Duration::from_secs(5), false).expect_err("busy console must fail");
        server.join().expect("server thread");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(err, ConsoleError::Busy { .. }), "{err:?}");
        assert!(err.to_string().contains("console.sock"), "{err}");
    }
}
