//! `cprctl exporter`: a host-level Prometheus exporter for every vmmd on the host (the
//! libvirt-exporter pattern). Each scrape of `/metrics` lists `<socket-dir>/*.sock`, asks each vmmd
//! for its Info (in parallel, with a short timeout) and writes the Prometheus text format, every
//! series labelled `vm="<socket name without .sock>"`. A vmmd that does not answer gives
//! `vmmd_up 0` and nothing else. The counters are vmmd's own, carried across live updates.

pub mod render;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};
use vmmd_proto::v1::InfoRequest;

pub use render::{render, VmScrape};

/// How long one vmmd may take to answer Info at a scrape.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// `cprctl exporter` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Metrics (label vm=\"<socket name>\"): vmmd_up, vmmd_info{version,pid}, \
                        vmmd_generation, vmmd_uptime_seconds, vmmd_runstate{state}, \
                        vmmd_updates_total{result=updated|failed|refused|rolled_back}, \
                        vmmd_rollbacks_total, vmmd_update_pause_seconds (histogram). \
                        Example: cprctl exporter --listen 127.0.0.1:9477"
)]
pub struct ExporterArgs {
    /// Address to serve `/metrics` on, e.g. `127.0.0.1:9477` or `[::]:9477`.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Where the vmmd API sockets are: every `<name>.sock` in it is scraped as vm `<name>`.
    #[arg(long, default_value = "/run/vmmd", value_name = "DIR")]
    pub socket_dir: PathBuf,
}

/// Why the exporter cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}; pick a free address with --listen")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Accepting connections failed.
    #[error("cannot accept connections on {addr}: {source}")]
    Accept {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// SIGTERM or Ctrl-C cannot be watched.
    #[error("cannot watch for SIGTERM/Ctrl-C: {source}")]
    Signal {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Serves `/metrics` until SIGTERM or Ctrl-C.
pub async fn run(args: &ExporterArgs) -> Result<(), ExporterError> {
    let addr = args.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ExporterError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    info!(listen = %local, socket_dir = %args.socket_dir.display(), "serving /metrics");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| ExporterError::Signal { source })?;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => {
                accepted.map_err(|source| ExporterError::Accept { addr: local, source })?
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let dir = args.socket_dir.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let dir = dir.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(req, &dir).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    info!("exporter stopping");
    Ok(())
}

/// The answer to one HTTP request.
async fn respond(req: Request<Incoming>, dir: &Path) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    let text = "text/plain; charset=utf-8";
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => match render(scrape_all(dir).await) {
            Ok(body) => reply(
                StatusCode::OK,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                body,
            ),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, text, format!("{e}\n")),
        },
        (&Method::GET, "/") => reply(
            StatusCode::OK,
            text,
            "cprctl exporter: vmmd metrics at /metrics\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            text,
            "not found: try /metrics\n".into(),
        ),
    }
}

/// The vmmd API sockets in `dir` (`<name>.sock`), sorted by name.
pub fn discover(dir: &Path) -> Vec<(String, PathBuf)> {
    use std::os::unix::fs::FileTypeExt;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot list the vmmd sockets");
            return Vec::new();
        }
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(".sock")?.to_owned();
            Some((name, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Asks every vmmd in `dir` for its Info, at most [`SCRAPE_TIMEOUT`] each, all at once.
pub async fn scrape_all(dir: &Path) -> Vec<VmScrape> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (vm, socket)) in discover(dir).into_iter().enumerate() {
        tasks.spawn(async move {
            let info = match tokio::time::timeout(SCRAPE_TIMEOUT, info(&socket)).await {
                Ok(Ok(info)) => Some(info),
                Ok(Err(e)) => {
                    debug!(%vm, error = %e, "vmmd did not answer Info");
                    None
                }
                Err(_) => {
                    debug!(%vm, timeout_ms = SCRAPE_TIMEOUT.as_millis() as u64, "vmmd Info timed out");
                    None
                }
            };
            (i, VmScrape { vm, info })
        });
    }
    let mut done: Vec<(usize, VmScrape)> = tasks.join_all().await;
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, s)| s).collect()
}

async fn info(socket: &Path) -> Result<vmmd_proto::v1::InfoResponse, crate::client::ClientError> {
    let mut client = crate::client::connect(socket).await?;
    let r = client
        .info(InfoRequest {})
        .await
        .map_err(|s| crate::client::ClientError::rpc("info", s))?;
    Ok(r.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_socket_is_scraped_as_down_and_other_files_are_ignored() {
        let dir = std::env::temp_dir().join(format!("cprctl-exporter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        drop(std::os::unix::net::UnixListener::bind(dir.join("dead.sock")).expect("bind"));
        std::fs::write(dir.join("notes.sock"), b"not a socket").expect("write");
        std::fs::write(dir.join("x.txt"), b"").expect("write");
        let scrapes = scrape_all(&dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(scrapes.len(), 1, "{scrapes:?}");
        assert_eq!(scrapes[0].vm, "dead");
        assert!(scrapes[0].info.is_none());
        let text = render(scrapes).expect("render");
        assert!(text.contains("vmmd_up{vm=\"dead\"} 0"), "{text}");
    }

    #[test]
    fn a_missing_socket_dir_is_an_empty_list() {
        assert!(discover(Path::new("/nonexistent/cprctl-exporter")).is_empty());
    }
}
