//! The connection every workflow uses: one vmmd API socket, one call timeout.
//!
//! Each request opens a fresh connection: across a cpr-exec the process behind the socket
//! changes, and the old process's connections die with it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmmd_proto::v1::{InfoRequest, InfoResponse, MigrationParameters, RunState, WorkflowStep};

use crate::client::{self, Client};
use crate::output::mode_name;
use crate::workflow::error::SessionError;

/// How long a connection or an Info call may take, unless a workflow says otherwise.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long telling vmmd the workflow's step may take (best effort).
const STEP_REPORT_TIMEOUT: Duration = Duration::from_millis(500);

/// The vmmd a workflow talks to.
#[derive(Debug, Clone)]
pub struct Session {
    socket: PathBuf,
    call_timeout: Duration,
}

impl Session {
    /// A session with vmmd's API socket `socket`, with [`CALL_TIMEOUT`].
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            call_timeout: CALL_TIMEOUT,
        }
    }

    /// The same session with another timeout for connections and Info calls.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The timeout of connections and Info calls.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// A fresh connection, within the call timeout.
    pub async fn connect(&self) -> Result<Client, SessionError> {
        match tokio::time::timeout(self.call_timeout, client::connect(&self.socket)).await {
            Ok(r) => r.map_err(SessionError::Unreachable),
            Err(_) => Err(SessionError::timeout(
                "connect",
                format!("no connection within {}s", self.call_timeout.as_secs()),
            )),
        }
    }

    /// Info on a fresh connection, within the call timeout.
    pub async fn info(&self) -> Result<InfoResponse, SessionError> {
        let mut vmm = self.connect().await?;
        match tokio::time::timeout(self.call_timeout, vmm.info(InfoRequest {})).await {
            Ok(r) => r
                .map(tonic::Response::into_inner)
                .map_err(|s| SessionError::rpc("info", s)),
            Err(_) => Err(SessionError::timeout(
                "info",
                format!("no answer within {}s", self.call_timeout.as_secs()),
            )),
        }
    }

    /// The compensation of a `set-mode` step: puts `prev` back; what it did.
    pub async fn restore_migration_parameters(&self, prev: MigrationParameters) -> String {
        let mode = prev.mode;
        let r = match self.connect().await {
            Ok(mut vmm) => vmm
                .set_migration_parameters(prev)
                .await
                .map(|_| ())
                .map_err(|s| s.message().to_owned()),
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(()) => format!("migration mode back to {}", mode_name(mode)),
            Err(e) => format!("cannot restore the migration mode: {e}"),
        }
    }

    /// Tells vmmd which step `orchestrator` is at (best effort: vmmd may be mid-exec).
    pub async fn report_step(&self, orchestrator: String, step: String) {
        let call = async {
            let mut vmm = client::connect(&self.socket).await.ok()?;
            vmm.set_workflow_step(WorkflowStep { orchestrator, step })
                .await
                .ok()
        };
        let _ = tokio::time::timeout(STEP_REPORT_TIMEOUT, call).await;
    }
}

/// The runstate in `info`.
pub fn run_state(info: &InfoResponse) -> RunState {
    RunState::try_from(info.run_state).unwrap_or(RunState::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_socket_is_unreachable() {
        let s = Session::new(Path::new("/nonexistent/cprctl-session/api.sock"))
            .with_call_timeout(Duration::from_secs(1));
        assert_eq!(s.call_timeout(), Duration::from_secs(1));
        let err = s.info().await.expect_err("no vmmd there");
        assert!(err.is_unreachable(), "{err:?}");
        assert!(err.to_string().contains("vmmd is running"), "{err}");
    }
}
