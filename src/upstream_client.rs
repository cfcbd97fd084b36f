//! The pooled client for plain HTTP to the upstream (docs/behaviour.md#the-client-port: keep-alive to
//! the upstream), over TCP or a Unix socket (docs/operations.md#unix-socket-upstream).
//!
//! hyper-util's legacy `Client` pools connections by scheme and authority
//! and takes any connector that is a `tower_service::Service<Uri>`. Over
//! TCP that is hyper-util's `HttpConnector`; over a Unix socket it is
//! [`UnixConnector`], which opens the socket file whatever the URI says.
//! The URI still carries the upstream's authority (`localhost`): the pool's
//! key, and the `Host` hyper sets when the client sent none.
//!
//! Two clients of two types rather than one client with a connector that
//! can be either: `Client::request` returns the same future type for both,
//! so the choice costs one `match` per request and no IO wrapper that
//! forwards every read and write.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::UnixStream;

use crate::body_timeout::TimedBody;
use crate::config::{Config, Endpoint};

/// A client's request body as it goes upstream: cut when it stalls.
pub(crate) type RequestBody = TimedBody<Incoming>;

/// How long a keep-alive connection to the upstream may sit idle in the
/// plain-HTTP pool before it is closed (evicted on a tick of the same length).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Pooled keep-alive connections to the upstream for plain HTTP.
#[derive(Debug)]
pub(crate) enum UpstreamClient {
    /// A `host:port` upstream.
    Tcp(Client<HttpConnector, RequestBody>),
    /// A `unix:/path` upstream.
    Unix(Client<UnixConnector, RequestBody>),
}

impl UpstreamClient {
    /// The client for `config.upstream`: connects within
    /// `upstream_connect_timeout`; TCP connections get `TCP_NODELAY` and
    /// `tcp_keepalive`, Unix ones no options (they have none of these).
    pub(crate) fn new(config: &Config) -> Self {
        let mut builder = Client::builder(TokioExecutor::new());
        // Without a timer the pool never evicts idle connections: each
        // would hold a descriptor and a task until the upstream closed it.
        builder
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT);
        match &config.upstream.endpoint {
            Endpoint::Tcp { .. } => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(config.upstream_connect_timeout));
                connector.set_keepalive(config.tcp_keepalive);
                UpstreamClient::Tcp(builder.build(connector))
            }
            Endpoint::Unix(path) => UpstreamClient::Unix(builder.build(UnixConnector {
                path: Arc::from(path.as_path()),
                timeout: config.upstream_connect_timeout,
            })),
        }
    }

    /// Sends `req` (its URI absolute, naming the upstream's authority) on a
    /// pooled connection, or a new one.
    pub(crate) fn request(&self, req: Request<RequestBody>) -> ResponseFuture {
        match self {
            UpstreamClient::Tcp(client) => client.request(req),
            UpstreamClient::Unix(client) => client.request(req),
        }
    }
}

/// Opens a connection to the Unix socket at `path`, for any URI.
#[derive(Debug, Clone)]
pub(crate) struct UnixConnector {
    /// The socket file.
    path: Arc<Path>,
    /// `upstream_connect_timeout`, as `HttpConnector` applies it to TCP.
    timeout: Duration,
}

impl tower_service::Service<Uri> for UnixConnector {
    type Response = TokioIo<UnixStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = Arc::clone(&self.path);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, UnixStream::connect(&*path)).await {
                Ok(stream) => stream.map(TokioIo::new),
                // `TimedOut`, as `HttpConnector` reports its own: the proxy
                // answers 504 for it, 502 for any other connect error.
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {} timed out", path.display()),
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use tower_service::Service;

    use super::*;

    #[tokio::test]
    async fn the_unix_connector_opens_the_socket_file_whatever_the_uri() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("app.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let mut connector = UnixConnector {
            path: Arc::from(path.as_path()),
            timeout: Duration::from_secs(5),
        };
        let uri = Uri::from_static("http://localhost/health");
        let (io, accepted) = tokio::join!(connector.call(uri.clone()), listener.accept());
        io.expect("connected");
        accepted.expect("accepted");
        drop(listener);
        std::fs::remove_file(&path).expect("remove the socket file");
        let e = connector.call(uri).await.expect_err("no socket file");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
