//! Shutdown: the OS signals that feed [`Control`], the [`Shutdown`] handle
//! shared by every task, and the timeline that drives it.
//!
//! Tokens and one tracker, one per step of the timeline (docs/behaviour.md#shutdown):
//! `requested` when the pod's pre-stop hook asks for the shutdown over the
//! admin port (docs/operations.md#pod-deletion: the native-sidecar layout,
//! where wsgate's own SIGTERM would come only after the app has gone);
//! `signalled` at the first SIGTERM/SIGINT or that request (readiness turns 503; admissions
//! continue through `shutdown_delay`); `draining` when the delay is over (new
//! upgrades are refused, the listener closes, HTTP connections get
//! `graceful_shutdown()`, the gradual drain starts); `hard_stop` when
//! `shutdown_grace` has passed (every remaining tunnel sends its Close
//! frames and ends within `close_timeout`); `abort` at a second signal
//! (everything is cut at once); `ended` when the timeline is over. The tracker holds every
//! connection and tunnel task, because hyper forgets a connection the moment
//! it is upgraded: without it, a drain would not see the tunnels at all.

use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, ConfigSource};
use crate::drain::{self, Tunnels};
use crate::file_watch::FileVersion;
use crate::reload;

/// After everything is cut, how long tasks get to drop their sockets
/// before the timeline returns anyway.
const HARD_STOP_MARGIN: Duration = Duration::from_secs(2);

/// Shared shutdown state: clone it into every task.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    requested: CancellationToken,
    signalled: CancellationToken,
    draining: CancellationToken,
    hard_stop: CancellationToken,
    abort: CancellationToken,
    ended: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    /// A fresh handle: not draining.
    pub fn new() -> Self {
        Self::default()
    }

    /// The pre-stop hook asked for the shutdown (idempotent): the serving
    /// loop starts the timeline as it would at SIGTERM.
    pub(crate) fn request(&self) {
        self.requested.cancel();
    }

    /// Resolves when the pre-stop hook has asked for the shutdown.
    pub(crate) async fn requested(&self) {
        self.requested.cancelled().await;
    }

    /// Resolves when the shutdown timeline is over: every connection has
    /// ended, or the grace has.
    pub(crate) async fn ended(&self) {
        self.ended.cancelled().await;
    }

    /// A shutdown signal arrived: readiness turns 503 (idempotent).
    pub(crate) fn signal_received(&self) {
        self.signalled.cancel();
    }

    /// Whether a shutdown signal arrived.
    pub(crate) fn is_signalled(&self) -> bool {
        self.signalled.is_cancelled()
    }

    /// A token cancelled when a shutdown signal arrives (what an operator's
    /// drain stops at: the shutdown's own drain takes over).
    pub(crate) fn signalled_token(&self) -> CancellationToken {
        self.signalled.clone()
    }

    /// Starts draining (idempotent); implies the signal.
    pub(crate) fn start_draining(&self) {
        self.signalled.cancel();
        self.draining.cancel();
    }

    /// Whether draining has started.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Resolves when draining starts.
    pub(crate) async fn draining(&self) {
        self.draining.cancelled().await;
    }

    /// Cuts every remaining connection (idempotent); implies draining.
    pub(crate) fn stop_now(&self) {
        self.signalled.cancel();
        self.draining.cancel();
        self.hard_stop.cancel();
    }

    /// Resolves when every connection must end now.
    pub(crate) async fn stopped(&self) {
        self.hard_stop.cancelled().await;
    }

    /// The hard stop's token alone, for a task that needs nothing else of
    /// the shutdown: a close-mode refusal, made in storms, clones one token
    /// instead of all of them.
    pub(crate) fn stopped_token(&self) -> CancellationToken {
        self.hard_stop.clone()
    }

    /// Cuts everything at once, without closing handshakes (idempotent).
    pub(crate) fn abort_now(&self) {
        // The abort first: a tunnel woken by the hard stop on another worker
        // must already see it, or it would start the end-of-grace closing
        // handshake that the abort is there to skip.
        self.abort.cancel();
        self.stop_now();
    }

    /// Resolves when everything must be cut at once.
    pub(crate) async fn aborted(&self) {
        self.abort.cancelled().await;
    }

    /// The tracker every connection and tunnel task is spawned on.
    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }
}

/// What the process is told from outside (OS signals in production, a
/// channel in tests).
#[derive(Debug)]
pub enum Control {
    /// SIGTERM/SIGINT: the first drains, a second stops at once.
    Shutdown,
    /// SIGHUP or a changed configuration file: the configuration read
    /// afresh (or why it could not be).
    Reload(Box<Result<Config, ConfigError>>),
}

/// Forwards SIGTERM and SIGINT (ctrl-c where there are no Unix signals) as
/// [`Control::Shutdown`], every time one arrives, and SIGHUP as
/// [`Control::Reload`] with the configuration read afresh from `source`;
/// when `source` names a file, a change of that file reloads too (see
/// the `reload` module). `loaded` is the [`FileVersion`] taken just before
/// the running configuration was read, so a change made at any time after
/// that read is seen, however late the reload task first runs. Must be
/// called inside the runtime; the handlers are installed before it returns,
/// so no signal sent after this call is missed.
///
/// # Errors
/// Installing the signal handlers can fail (rarely: out of resources).
pub fn os_signals(
    source: ConfigSource,
    loaded: Option<FileVersion>,
) -> std::io::Result<mpsc::UnboundedReceiver<Control>> {
    let (tx, rx) = mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let hangups = signal(SignalKind::hangup())?;
        tokio::spawn(reload::reload_on_request(
            source,
            loaded,
            Some(hangups),
            reloads_to(tx.clone()),
        ));
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
    {
        tokio::spawn(reload::reload_on_request(
            source,
            loaded,
            None,
            reloads_to(tx.clone()),
        ));
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                if tx.send(Control::Shutdown).is_err() {
                    return;
                }
            }
        });
    }
    Ok(rx)
}

/// Hands reloaded configurations to the control channel.
fn reloads_to(tx: mpsc::UnboundedSender<Control>) -> impl Fn(Result<Config, ConfigError>) -> bool {
    move |config| tx.send(Control::Reload(Box::new(config))).is_ok()
}

/// What the shutdown timeline drives besides the tokens.
#[derive(Debug)]
pub(crate) struct Drive<'a> {
    /// The configuration in force when the signal came.
    pub(crate) config: &'a Config,
    /// Live tunnels, for the drain and for the log lines.
    pub(crate) tunnels: &'a Tunnels,
    /// `wsgate_connections_drained_total`.
    pub(crate) drained: &'a IntCounter,
    /// The accept loop, which returns once draining starts.
    pub(crate) accept: JoinHandle<()>,
}

impl Shutdown {
    /// Runs the shutdown timeline from the first shutdown request to the
    /// end (docs/behaviour.md#shutdown, §7): readiness 503 at once; admissions continue for
    /// `shutdown_delay`; then the listener closes, new upgrades get 503
    /// `draining`, and the remaining connections are closed oldest first,
    /// evenly over `drain_period`; at `shutdown_grace` after the signal (or
    /// at a second [`Control::Shutdown`]) whatever is left is closed.
    /// Returns once every tracked task has ended, or
    /// [`HARD_STOP_MARGIN`] after the hard stop.
    pub(crate) async fn run_timeline(
        &self,
        drive: Drive<'_>,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) {
        let Drive {
            config,
            tunnels,
            drained,
            accept,
        } = drive;
        let signalled_at = Instant::now();
        tracing::info!(
            delay_ms = config.shutdown_delay.as_millis() as u64,
            drain_ms = config.drain_period.as_millis() as u64,
            grace_ms = config.shutdown_grace.as_millis() as u64,
            remaining = tunnels.len(),
            "shutdown requested: not ready any more, still admitting for the shutdown delay"
        );
        self.signal_received();

        // Keep admitting through the delay, so clients routed here while the
        // endpoint removal propagates are not refused.
        let mut second_signal = tokio::select! {
            () = tokio::time::sleep(config.shutdown_delay) => false,
            () = next_shutdown(control) => true,
        };
        tracing::info!("shutdown: draining, new websocket upgrades are refused");
        self.start_draining();
        if let Err(e) = accept.await {
            tracing::error!("the accept loop failed: {e}");
        }
        let tracker = self.tracker();
        tracker.close();
        if !second_signal {
            // The closing handshakes of whatever is left start `close_timeout`
            // before the end of the grace, so that the grace stays the bound on
            // the whole shutdown (it must fit in terminationGracePeriodSeconds).
            let grace_end = signalled_at + config.shutdown_grace;
            let close_start = grace_end
                .checked_sub(config.close.timeout)
                .unwrap_or(signalled_at)
                .max(signalled_at);
            // The drain ends by then too, so its own closing handshakes fit in
            // the grace instead of being cut by it.
            let drain_period = config
                .drain_period
                .min(close_start.saturating_duration_since(Instant::now()));
            let all_ended = async {
                if !drain_period.is_zero() {
                    drain::drain_evenly(tunnels, drain_period, drained).await;
                }
                tracker.wait().await;
            };
            tokio::select! {
                () = all_ended => tracing::info!("shutdown: every connection ended"),
                () = sleep_until(close_start) => {
                    tracing::warn!(
                        remaining = tunnels.len(),
                        "shutdown: the grace is ending, closing the remaining {} connections with Close frames",
                        tunnels.len()
                    );
                }
                () = next_shutdown(control) => second_signal = true,
            }
        }
        if !second_signal {
            // Tunnels still open send their Close frames and wait for the
            // replies until the end of the grace; another signal cuts them.
            self.stop_now();
            let grace_end = (signalled_at + config.shutdown_grace).max(Instant::now());
            tokio::select! {
                _ = timeout_at(grace_end, tracker.wait()) => {}
                () = next_shutdown(control) => second_signal = true,
            }
        }
        if second_signal {
            tracing::warn!(
                remaining = tunnels.len(),
                "shutdown: a second signal came, cutting the remaining {} connections",
                tunnels.len()
            );
        }
        self.abort_now();
        if timeout(HARD_STOP_MARGIN, tracker.wait()).await.is_err() {
            tracing::error!(
                remaining = tracker.len(),
                "shutdown: {} tasks still running after the hard stop",
                tracker.len()
            );
        }
        self.ended.cancel();
    }
}

/// Waits for the next shutdown request; reloads during shutdown are
/// refused (the process is going away); a closed channel never resolves.
async fn next_shutdown(control: &mut mpsc::UnboundedReceiver<Control>) {
    loop {
        match control.recv().await {
            Some(Control::Shutdown) => return,
            Some(Control::Reload(_)) => {
                tracing::warn!("a reload was requested during shutdown: ignored");
            }
            None => std::future::pending().await,
        }
    }
}
