//! Shutdown: the OS signal future and the [`Shutdown`] handle shared by every
//! task.
//!
//! Two tokens and one tracker. `draining` is cancelled at the first
//! SIGTERM/SIGINT: readiness turns 503, new upgrades are refused, the listener
//! closes, HTTP connections get `graceful_shutdown()`. `hard_stop` is
//! cancelled when `shutdown_grace` has passed (or at a second signal): every
//! remaining connection and tunnel ends at once. The tracker holds every
//! connection and tunnel task, because hyper forgets a connection the moment
//! it is upgraded: without it, a drain would not see the tunnels at all.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared shutdown state: clone it into every task.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    draining: CancellationToken,
    hard_stop: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    /// A fresh handle: not draining.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts draining (idempotent).
    pub fn start_draining(&self) {
        self.draining.cancel();
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Resolves when draining starts.
    pub async fn draining(&self) {
        self.draining.cancelled().await;
    }

    /// Cuts every remaining connection (idempotent); implies draining.
    pub fn stop_now(&self) {
        self.draining.cancel();
        self.hard_stop.cancel();
    }

    /// Resolves when every connection must end now.
    pub async fn stopped(&self) {
        self.hard_stop.cancelled().await;
    }

    /// The tracker every connection and tunnel task is spawned on.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }
}

/// What the process is told from outside (OS signals in production, a
/// channel in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// SIGTERM/SIGINT: the first drains, a second stops at once.
    Shutdown,
}

/// Forwards SIGTERM and SIGINT (ctrl-c where there are no Unix signals) as
/// [`Control::Shutdown`], every time one arrives. Must be called inside the
/// runtime; the handlers are installed before it returns, so no signal sent
/// after this call is missed.
///
/// # Errors
/// Installing the signal handlers can fail (rarely: out of resources).
pub fn os_signals() -> std::io::Result<mpsc::UnboundedReceiver<Control>> {
    let (tx, rx) = mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                if tx.send(Control::Shutdown).is_err() {
                    return; // nobody listens any more: the process is ending
                }
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if tx.send(Control::Shutdown).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
