//! Shutdown: the OS signal future and the [`Shutdown`] handle shared by every
//! task.
//!
//! Three tokens and one tracker, one per step of the timeline (SPEC §5, §7):
//! `signalled` at the first SIGTERM/SIGINT (readiness turns 503; admissions
//! continue through `shutdown_delay`); `draining` when the delay is over (new
//! upgrades are refused, the listener closes, HTTP connections get
//! `graceful_shutdown()`, the gradual drain starts); `hard_stop` when
//! `shutdown_grace` has passed (every remaining tunnel sends its Close
//! frames and ends within `close_timeout`); `abort` at a second signal
//! (everything is cut at once). The tracker holds every
//! connection and tunnel task, because hyper forgets a connection the moment
//! it is upgraded: without it, a drain would not see the tunnels at all.

use tokio::sync::mpsc;

use crate::config::{Config, ConfigError, ConfigSource};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared shutdown state: clone it into every task.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    signalled: CancellationToken,
    draining: CancellationToken,
    hard_stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    /// A fresh handle: not draining.
    pub fn new() -> Self {
        Self::default()
    }

    /// A shutdown signal arrived: readiness turns 503 (idempotent).
    pub fn signal_received(&self) {
        self.signalled.cancel();
    }

    /// Whether a shutdown signal arrived.
    pub fn is_signalled(&self) -> bool {
        self.signalled.is_cancelled()
    }

    /// Starts draining (idempotent); implies the signal.
    pub fn start_draining(&self) {
        self.signalled.cancel();
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
        self.signalled.cancel();
        self.draining.cancel();
        self.hard_stop.cancel();
    }

    /// Resolves when every connection must end now.
    pub async fn stopped(&self) {
        self.hard_stop.cancelled().await;
    }

    /// Cuts everything at once, without closing handshakes (idempotent).
    pub fn abort_now(&self) {
        self.stop_now();
        self.abort.cancel();
    }

    /// Resolves when everything must be cut at once.
    pub async fn aborted(&self) {
        self.abort.cancelled().await;
    }

    /// The tracker every connection and tunnel task is spawned on.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }
}

/// What the process is told from outside (OS signals in production, a
/// channel in tests).
#[derive(Debug)]
pub enum Control {
    /// SIGTERM/SIGINT: the first drains, a second stops at once.
    Shutdown,
    /// SIGHUP: the configuration read afresh (or why it could not be).
    Reload(Box<Result<Config, ConfigError>>),
}

/// Forwards SIGTERM and SIGINT (ctrl-c where there are no Unix signals) as
/// [`Control::Shutdown`], every time one arrives, and SIGHUP as
/// [`Control::Reload`] with the configuration loaded afresh from `source`.
/// Must be called inside the runtime; the handlers are installed before it
/// returns, so no signal sent after this call is missed.
///
/// # Errors
/// Installing the signal handlers can fail (rarely: out of resources).
pub fn os_signals(source: ConfigSource) -> std::io::Result<mpsc::UnboundedReceiver<Control>> {
    let (tx, rx) = mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = term.recv() => Control::Shutdown,
                    _ = int.recv() => Control::Shutdown,
                    _ = hup.recv() => Control::Reload(Box::new(source.load())),
                };
                if tx.send(message).is_err() {
                    return; // nobody listens any more: the process is ending
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = source;
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
