//! The demo's processes: the vmmd it starts and the guest console it timestamps heartbeats on.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use vmmd_proto::v1::InfoRequest;

use super::{DemoError, COMMAND_TIMEOUT, START_TIMEOUT};
use crate::client::{self, Client};
use crate::console::{LineSplitter, Token};

/// How to start one vmmd of the demo.
pub(super) struct VmmdSpec<'a> {
    pub(super) vmmd: &'a Path,
    pub(super) kernel: &'a Path,
    pub(super) dir: &'a Path,
    pub(super) vcpus: u32,
    pub(super) memory: &'a str,
    pub(super) console: &'a Path,
}

/// A running vmmd, killed if the demo stops early.
pub(super) struct Vmmd {
    pub(super) child: Child,
    pub(super) pid: u32,
    pub(super) api: Client,
    pub(super) api_socket: PathBuf,
    pub(super) log: PathBuf,
}

impl VmmdSpec<'_> {
    pub(super) async fn spawn(&self, name: &str) -> Result<Vmmd, DemoError> {
        let api_socket = self.dir.join(format!("{name}.sock"));
        let log = self.dir.join(format!("{name}.log"));
        let io_err = |op, source| DemoError::Io {
            op,
            path: log.clone(),
            source,
        };
        let log_file = std::fs::File::create(&log).map_err(|e| io_err("create", e))?;
        let log_err = log_file.try_clone().map_err(|e| io_err("open", e))?;
        let mut cmd = Command::new(self.vmmd);
        cmd.arg("--api-socket")
            .arg(&api_socket)
            .arg("--kernel")
            .arg(self.kernel)
            .arg("--vcpus")
            .arg(self.vcpus.to_string())
            .arg("--memory")
            .arg(format!("size={}", self.memory))
            .arg("--serial")
            .arg(format!("socket={}", self.console.display()));
        let mut child = cmd
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| DemoError::Spawn {
                path: self.vmmd.to_path_buf(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(exited(status, "before its API answered", &log));
            }
            if let Ok(mut api) = client::connect(&api_socket).await {
                if api.info(InfoRequest {}).await.is_ok() {
                    return Ok(Vmmd {
                        child,
                        pid,
                        api,
                        api_socket,
                        log,
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(DemoError::Timeout {
                    what: format!("vmmd's API on {}", api_socket.display()),
                    timeout: START_TIMEOUT,
                    dir: self.dir.to_path_buf(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Vmmd {
    /// A fresh API connection (connections to the process before an update die with the exec).
    pub(super) async fn reconnect(&mut self) -> Result<&mut Client, DemoError> {
        self.api = client::connect(&self.api_socket).await?;
        Ok(&mut self.api)
    }

    /// Waits for vmmd to exit after Quit; a non-zero status is an error.
    pub(super) async fn wait_exit(&mut self) -> Result<(), DemoError> {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .map_err(|_| DemoError::Timeout {
                what: format!("vmmd {} to exit after quit", self.pid),
                timeout: Duration::from_secs(30),
                dir: self.log.parent().map(Path::to_path_buf).unwrap_or_default(),
            })?
            .map_err(|source| DemoError::Io {
                op: "wait for vmmd of",
                path: self.log.clone(),
                source,
            })?;
        if !status.success() {
            return Err(exited(status, "after quit", &self.log));
        }
        Ok(())
    }
}

pub(super) fn exited(
    status: std::process::ExitStatus,
    when: &'static str,
    log: &Path,
) -> DemoError {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(15).collect();
    DemoError::VmmdExited {
        status,
        when,
        log: log.to_path_buf(),
        tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
    }
}

/// What the console reader shares: every heartbeat's arrival time.
#[derive(Default)]
pub(super) struct Beats {
    pub(super) at: Vec<Instant>,
}

/// The guest console: lines arrive on a channel (with the heartbeat count when they completed),
/// heartbeats are timestamped.
pub(super) struct GuestConsole {
    pub(super) writer: OwnedWriteHalf,
    pub(super) lines: mpsc::UnboundedReceiver<(String, u64)>,
    pub(super) beats: Arc<Mutex<Beats>>,
    pub(super) path: PathBuf,
    pub(super) dir: PathBuf,
}

pub(super) fn lock(beats: &Mutex<Beats>) -> std::sync::MutexGuard<'_, Beats> {
    beats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl GuestConsole {
    pub(super) async fn connect(path: &Path, dir: &Path) -> Result<Self, DemoError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(source) => {
                    return Err(DemoError::Console {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        let (mut reader, writer) = stream.into_split();
        let (tx, lines) = mpsc::unbounded_channel();
        let beats = Arc::new(Mutex::new(Beats::default()));
        let shared = Arc::clone(&beats);
        tokio::spawn(async move {
            let mut splitter = LineSplitter::default();
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let at = Instant::now();
                let mut b = lock(&shared);
                for &byte in &buf[..n] {
                    match splitter.push(byte) {
                        Some(Token::Heartbeat) => b.at.push(at),
                        Some(Token::Line(line)) => {
                            let count = b.at.len() as u64;
                            // The demo stopped listening: nothing more to do.
                            if tx.send((line, count)).is_err() {
                                return;
                            }
                        }
                        None => {}
                    }
                }
            }
        });
        Ok(Self {
            writer,
            lines,
            beats,
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
        })
    }

    pub(super) fn timeout(&self, what: String, timeout: Duration) -> DemoError {
        DemoError::Timeout {
            what,
            timeout,
            dir: self.dir.clone(),
        }
    }

    /// The next line starting with `prefix` and the heartbeats received before it; a failure line
    /// on the way is an error.
    pub(super) async fn wait_line(
        &mut self,
        prefix: &str,
        timeout: Duration,
    ) -> Result<(String, u64), DemoError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .map_err(|_| self.timeout(format!("the guest's {prefix} line"), timeout))?;
            let Some((line, beats)) = line else {
                return Err(DemoError::Console {
                    path: self.path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("closed while waiting for {prefix}"),
                    ),
                });
            };
            if line.starts_with(prefix) {
                return Ok((line, beats));
            }
            if line.starts_with("FAIL") || line.starts_with("PANIC") {
                return Err(DemoError::Guest {
                    problem: "reported a failure",
                    line,
                });
            }
        }
    }

    /// Sends a one-byte command and waits for its answer.
    pub(super) async fn command(
        &mut self,
        cmd: u8,
        answer: &str,
    ) -> Result<(String, u64), DemoError> {
        self.writer
            .write_all(&[cmd])
            .await
            .map_err(|source| DemoError::Console {
                path: self.path.clone(),
                source,
            })?;
        self.wait_line(answer, COMMAND_TIMEOUT).await
    }

    /// Waits until `n` more heartbeats arrived.
    pub(super) async fn wait_heartbeats(&self, n: u64, timeout: Duration) -> Result<(), DemoError> {
        let count = || lock(&self.beats).at.len() as u64;
        let target = count() + n;
        let deadline = Instant::now() + timeout;
        while count() < target {
            if Instant::now() > deadline {
                return Err(self.timeout("heartbeats after the update".into(), timeout));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// The longest gap between heartbeats inside `[from, to]` (the window's edges bound it).
    pub(super) fn max_gap(&self, from: Instant, to: Instant) -> Duration {
        let b = lock(&self.beats);
        let start = b.at.partition_point(|&t| t < from);
        let end = b.at.partition_point(|&t| t <= to);
        let mut prev = from;
        let mut gap = Duration::ZERO;
        for &t in &b.at[start..end] {
            gap = gap.max(t - prev);
            prev = t;
        }
        gap.max(to.saturating_duration_since(prev))
    }

    /// The longest gap between consecutive heartbeats from the last one before `from` to the
    /// first one after `to`: the guest-visible blackout of something that ran in `[from, to]`.
    pub(super) fn max_gap_across(&self, from: Instant, to: Instant) -> Duration {
        let b = lock(&self.beats);
        max_gap_across(&b.at, from, to)
    }
}

/// See [`GuestConsole::max_gap_across`].
pub(super) fn max_gap_across(beats: &[Instant], from: Instant, to: Instant) -> Duration {
    let start = beats.partition_point(|&t| t < from).saturating_sub(1);
    let end = (beats.partition_point(|&t| t <= to) + 1).min(beats.len());
    beats[start..end]
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blackout_is_the_longest_gap_from_the_beat_before_to_the_beat_after() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Beats every 1 ms, a 7 ms hole from 10 to 17, then beats again.
        let beats: Vec<Instant> = (0..=10).chain(17..=25).map(ms).collect();
        // The update ran from 11 to 16: the hole straddles its edges.
        assert_eq!(
            max_gap_across(&beats, ms(11), ms(16)),
            Duration::from_millis(7)
        );
        // A window without the hole sees the 1 ms rhythm.
        assert_eq!(
            max_gap_across(&beats, ms(2), ms(5)),
            Duration::from_millis(1)
        );
        assert_eq!(max_gap_across(&[], ms(2), ms(5)), Duration::ZERO);
    }
}
