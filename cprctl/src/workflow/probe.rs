//! Asking a vmmd binary something (`--check-state-version N`, `--version`).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// How long asking a vmmd binary something may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a vmmd binary could not be asked something.
#[derive(Debug, thiserror::Error)]
#[error("cannot run `{command}`: {detail}")]
pub struct ProbeError {
    /// The command line.
    pub command: String,
    /// What happened.
    pub detail: String,
}

/// What a vmmd binary answered.
#[derive(Debug)]
pub struct ProbeAnswer {
    /// Whether it exited successfully.
    pub success: bool,
    /// Its stdout and stderr, trimmed, joined by `; `.
    pub text: String,
}

/// Runs `binary args...` with [`PROBE_TIMEOUT`]; its exit status and output.
pub async fn probe(binary: &Path, args: &[String]) -> Result<ProbeAnswer, ProbeError> {
    let command = format!("{} {}", binary.display(), args.join(" "));
    let failed = |detail: String| ProbeError {
        command: command.clone(),
        detail,
    };
    let out = tokio::process::Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(PROBE_TIMEOUT, out)
        .await
        .map_err(|_| failed(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())))?
        .map_err(|e| failed(e.to_string()))?;
    let mut text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if !err.is_empty() {
        if !text.is_empty() {
            text.push_str("; ");
        }
        text.push_str(&err);
    }
    Ok(ProbeAnswer {
        success: out.status.success(),
        text,
    })
}
