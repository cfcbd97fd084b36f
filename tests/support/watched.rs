//! Clients watched by a task each until wsgate closes them: when the Close
//! came, with which code and reason, or the client back when it did not
//! (the operator drain's and the rebalancing tests).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{connect, within, Ws, DEADLINE};

/// How a watched client ended up.
#[derive(Debug)]
pub enum End {
    /// wsgate's Close frame arrived this long after the watch's start.
    Closed {
        code: Option<u16>,
        reason: String,
        at: Duration,
    },
    /// Still open when the watch stopped: the client, to use again.
    Open(Box<Ws>),
    /// Ended without a Close frame, or got something unexpected.
    Other(String),
}

/// A client read by a task of its own until it is closed or told to stop.
pub struct Watched {
    stop: Option<oneshot::Sender<()>>,
    /// The reading task; finished once the client ended.
    pub task: tokio::task::JoinHandle<End>,
}

impl Watched {
    /// Stops watching; how the client ended up.
    pub async fn end(mut self) -> End {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within("watcher", self.task).await.expect("join")
    }
}

/// Watches every client; `closes` counts Close frames as they arrive.
pub fn watch_all(clients: Vec<Ws>, start: Instant, closes: &Arc<AtomicUsize>) -> Vec<Watched> {
    clients
        .into_iter()
        .map(|ws| watch(ws, start, Arc::clone(closes)))
        .collect()
}

/// Watches one client; `closes` counts its Close frame.
pub fn watch(mut ws: Ws, start: Instant, closes: Arc<AtomicUsize>) -> Watched {
    let (stop, mut stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        // Nothing is sent to a watched client, so the first thing it reads
        // is its end.
        tokio::select! {
            biased;
            _ = &mut stopped => End::Open(Box::new(ws)),
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(frame))) => {
                    let at = start.elapsed();
                    closes.fetch_add(1, Ordering::SeqCst);
                    // Finish the closing handshake as a client does:
                    // tungstenite has queued its reply; read to the end.
                    let _ = tokio::time::timeout(DEADLINE, async {
                        while ws.next().await.is_some() {}
                    })
                    .await;
                    End::Closed {
                        code: frame.as_ref().map(|f| u16::from(f.code)),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                        at,
                    }
                }
                Some(Ok(other)) => End::Other(format!("unexpected message {other:?}")),
                Some(Err(e)) => End::Other(format!("error without a Close: {e}")),
                None => End::Other("ended without a Close frame".into()),
            },
        }
    });
    Watched {
        stop: Some(stop),
        task,
    }
}

/// Ends every watch: (index, close time) of the clients closed with
/// `want_code` and `want_reason`, and the clients still
/// open (index, client). Fails on any other ending.
pub async fn outcomes(
    watched: Vec<Watched>,
    want_code: u16,
    want_reason: &str,
) -> (Vec<(usize, Duration)>, Vec<(usize, Ws)>) {
    let (mut closed, mut open) = (Vec::new(), Vec::new());
    for (i, w) in watched.into_iter().enumerate() {
        match w.end().await {
            End::Closed { code, reason, at } => {
                assert_eq!(code, Some(want_code), "client {i}: close code");
                assert_eq!(reason, want_reason, "client {i}: close reason");
                closed.push((i, at));
            }
            End::Open(ws) => open.push((i, *ws)),
            End::Other(what) => panic!("client {i}: {what}"),
        }
    }
    (closed, open)
}

/// Polls until `closes` reaches `want`, or fails after [`DEADLINE`].
pub async fn wait_closes(closes: &AtomicUsize, want: usize) {
    let start = Instant::now();
    while closes.load(Ordering::SeqCst) < want {
        assert!(
            start.elapsed() < DEADLINE,
            "clients saw {} Close frames, wanted {want}",
            closes.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `n` clients connected to `proxy` one after the other, so their ages are
/// in order (the drains close the oldest first).
pub async fn open_in_order(proxy: SocketAddr, n: usize) -> Vec<Ws> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        v.push(
            within("connect", connect(&format!("ws://{proxy}/")))
                .await
                .unwrap_or_else(|e| panic!("client {i} not admitted: {e}")),
        );
    }
    v
}
