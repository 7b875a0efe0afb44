//! The error core every workflow wraps: talking to vmmd failed.

use crate::client::ClientError;

/// Why a workflow's request to vmmd did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// vmmd could not be reached (no socket, connection refused).
    #[error(transparent)]
    Unreachable(ClientError),
    /// vmmd returned an error to a request, or did not answer in time.
    #[error(transparent)]
    Rpc(ClientError),
}

impl SessionError {
    /// vmmd answered request `op` with `status`.
    pub fn rpc(op: &'static str, status: tonic::Status) -> Self {
        Self::Rpc(ClientError::rpc(op, status))
    }

    /// Request `op` got no answer within `what` (e.g. `10s`).
    pub fn timeout(op: &'static str, detail: String) -> Self {
        Self::rpc(op, tonic::Status::deadline_exceeded(detail))
    }

    /// Whether vmmd could not be reached at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable(_))
    }
}
