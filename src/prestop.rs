//! `wsgate prestop`: the pod-deletion hook of the native-sidecar layout, run
//! as a small container of its own beside the app.
//!
//! Why (docs/operations.md#pod-deletion): with wsgate as a native sidecar,
//! the kubelet signals the app first and wsgate only after the app has
//! exited, so wsgate's own SIGTERM would come after every session was cut.
//! Regular containers are all signalled at the start of a pod's deletion:
//! this one waits for that SIGTERM, asks the wsgate of its pod over loopback
//! (`POST /shutdown` on the admin port) to run its shutdown (not ready, the
//! delay, the paced drain), and exits once that is over, while the app's
//! own pre-stop pause keeps it serving. Loopback needs no token: only a
//! process inside the pod can connect from there.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long the connection to the admin port may take: it is in the same
/// pod, so anything longer means nobody is there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The most of an unexpected answer's body quoted in the error.
const QUOTED_BODY: usize = 200;

/// Why the hook could not get the drain done.
#[derive(Debug)]
pub enum PrestopError {
    /// The signal handlers could not be installed.
    Signals(std::io::Error),
    /// Talking to the admin port failed after the connection was made.
    Exchange(String),
    /// wsgate answered something other than 200.
    Answer(StatusCode, String),
}

impl fmt::Display for PrestopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Signals(e) => write!(f, "cannot install the signal handlers: {e}"),
            Self::Exchange(e) => write!(f, "POST /shutdown failed: {e}"),
            Self::Answer(status, body) => {
                write!(f, "POST /shutdown was answered {status}: {body}")
            }
        }
    }
}

impl std::error::Error for PrestopError {}

/// Waits for SIGTERM (or SIGINT), then asks the wsgate whose admin port is
/// `admin` to shut down and returns when it answers that the drain is over.
/// A wsgate that is not listening any more has nothing to drain: that is a
/// success. A second signal while waiting returns at once.
///
/// # Errors
/// The signal handlers cannot be installed, the exchange fails midway, or
/// wsgate refuses the request.
pub async fn prestop(admin: SocketAddr) -> Result<(), PrestopError> {
    let mut signals = Signals::install().map_err(PrestopError::Signals)?;
    tracing::info!(%admin, "prestop: waiting for the pod's deletion (SIGTERM)");
    signals.next().await;
    tracing::info!(%admin, "prestop: the pod is being deleted; asking wsgate to drain");
    tokio::select! {
        result = ask_to_drain(admin) => result,
        () = signals.next() => {
            tracing::warn!("prestop: a second signal; not waiting for the drain any more");
            Ok(())
        }
    }
}

/// `POST /shutdown` to `admin`, waiting for the answer.
async fn ask_to_drain(admin: SocketAddr) -> Result<(), PrestopError> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(admin)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::info!(%admin, error = %e, "prestop: wsgate is not listening; nothing to drain");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!(%admin, "prestop: no answer to the connection; nothing drained");
            return Ok(());
        }
    };
    let exchange = |e: hyper::Error| PrestopError::Exchange(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(exchange)?;
    tokio::spawn(async move {
        // Errors surface through `send_request` below.
        let _ = conn.await;
    });
    let request = Request::builder()
        .method(Method::POST)
        .uri("/shutdown")
        .header(header::HOST, admin.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| PrestopError::Exchange(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(exchange)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&body[..body.len().min(QUOTED_BODY)])
        .trim()
        .to_owned();
    if status == StatusCode::OK {
        tracing::info!("prestop: wsgate has drained ({body})");
        Ok(())
    } else {
        Err(PrestopError::Answer(status, body))
    }
}

/// SIGTERM and SIGINT as one stream of "a signal came".
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
