//! Connection to vmmd's gRPC API over its unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use vmmd_proto::v1::vmm_client::VmmClient;

/// How long to wait for the socket to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The typed client cprctl and the tests use.
pub type Client = VmmClient<Channel>;

/// Why vmmd could not be reached or refused a request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API socket does not exist.
    #[error(
        "vmmd API socket {} does not exist: check that vmmd is running and that --socket \
         (or VMMD_SOCKET) names its --api-socket",
        path.display()
    )]
    SocketMissing {
        /// The socket path that was tried.
        path: PathBuf,
    },
    /// The socket exists but the connection failed (refused, permission, timeout).
    #[error(
        "cannot connect to vmmd at {}: {detail}; check that vmmd is running and that you may \
         open its socket",
        path.display()
    )]
    Connect {
        /// The socket path that was tried.
        path: PathBuf,
        /// The innermost cause, spelled out for the operator.
        detail: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// vmmd answered the request with a gRPC error.
    #[error("vmmd {op} failed: {} ({})", status.message(), code_name(status.code()))]
    Rpc {
        /// The request, e.g. `pause`.
        op: &'static str,
        /// The gRPC status vmmd returned.
        #[source]
        status: tonic::Status,
    },
}

impl ClientError {
    /// Wraps a gRPC status returned for request `op`.
    pub fn rpc(op: &'static str, status: tonic::Status) -> Self {
        Self::Rpc { op, status }
    }
}

/// Connects to vmmd's API socket at `path`.
pub async fn connect(path: &Path) -> Result<Client, ClientError> {
    if !path.exists() {
        return Err(ClientError::SocketMissing {
            path: path.to_path_buf(),
        });
    }
    let socket = path.to_path_buf();
    // The authority is ignored: every connection goes to the unix socket.
    let endpoint = Endpoint::from_static("http://[::]:50051").connect_timeout(CONNECT_TIMEOUT);
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            detail: innermost_cause(&source),
            source,
        })?;
    Ok(VmmClient::new(channel))
}

/// The message of the deepest error in `err`'s source chain (e.g. "Connection refused").
fn innermost_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut last: &(dyn std::error::Error + 'static) = err;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// The canonical upper-case name of a gRPC status code, e.g. `FAILED_PRECONDITION`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_socket_names_the_path_and_suggests_checking_vmmd() {
        let path = Path::new("/nonexistent/cprctl-test/api.sock");
        let err = connect(path)
            .await
            .expect_err("connecting to a missing socket must fail");
        assert!(matches!(err, ClientError::SocketMissing { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/cprctl-test/api.sock"), "{msg}");
        assert!(msg.contains("vmmd is running"), "{msg}");
    }

    #[tokio::test]
    async fn refused_connection_names_the_path_and_cause() {
        let dir = std::env::temp_dir().join(format!("cprctl-refused-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let path = dir.join("api.sock");
        // Bind and drop the listener: the socket file stays but nobody accepts.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind test socket"));
        let err = connect(&path)
            .await
            .expect_err("connecting to a dead socket must fail");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.to_lowercase().contains("refused"), "{msg}");
    }

    #[test]
    fn rpc_error_shows_code_and_message() {
        let err = ClientError::rpc(
            "migrate",
            tonic::Status::invalid_argument("unsupported URI scheme tcp"),
        );
        assert_eq!(
            err.to_string(),
            "vmmd migrate failed: unsupported URI scheme tcp (INVALID_ARGUMENT)"
        );
    }
}
