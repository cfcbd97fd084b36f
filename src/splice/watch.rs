//! wsgate's watch on the client while a session is open
//! (docs/behaviour.md#signals-clients-can-act-on): a Ping after
//! `ping_interval` without a byte from the client, the end when nothing
//! comes within `pong_timeout` of it, and the end when bytes for the client
//! wait `send_timeout` for its socket to take them.
//!
//! Why lazy timers: the splice's per-message path must not get slower. With
//! both keys off a connection has no watch at all (one `None`). With pings
//! on, a byte from the client only notes the time (no timer is touched per
//! frame); the one timer fires at the deadline it was given, finds out
//! whether the client spoke since, and sleeps again for the remainder; it
//! sits behind the waker gate, so the wake-ups for data do not poll it. The
//! send timeout's timer is made the first time bytes wait, and likewise
//! re-armed only when it fires.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{sleep, Instant, Sleep};

use super::gate::Gated;

/// The client keys of a splice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PingSettings {
    /// Ping after this long without a byte from the client.
    pub(crate) interval: Duration,
    /// End the session when nothing comes this long after the Ping.
    pub(crate) pong_timeout: Duration,
}

/// Why wsgate gave up on a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unresponsive {
    /// Nothing came within `pong_timeout` of wsgate's Ping.
    Ping,
    /// Bytes for it waited `send_timeout` for its socket to take them.
    Send,
}

impl Unresponsive {
    /// The reason text of the Close frames wsgate sends.
    pub(crate) fn close_text(self) -> &'static str {
        match self {
            Unresponsive::Ping => "ping timeout",
            Unresponsive::Send => "send timeout",
        }
    }
}

/// The Close status both peers get when wsgate gives up on a client: 1001
/// "Going Away" (the client is gone, or as good as).
pub(crate) const UNRESPONSIVE_CODE: u16 = 1001;

/// What the watch asks of the splice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// Send the client a Ping now, then say [`ClientWatch::ping_sent`].
    Ping,
    /// End the session.
    End(Unresponsive),
}

/// The watch of one session; `None` with both keys off.
pub(crate) struct ClientWatch {
    pings: Option<Pinger>,
    send: Option<SendWatch>,
}

impl ClientWatch {
    /// The watch for these settings, starting now; `received` is what was
    /// read from the client so far. `None` when there is nothing to watch.
    pub(crate) fn new(
        pings: Option<PingSettings>,
        send_timeout: Option<Duration>,
        received: u64,
    ) -> Option<Box<Self>> {
        if pings.is_none() && send_timeout.is_none() {
            return None;
        }
        Some(Box::new(ClientWatch {
            pings: pings.map(|p| Pinger::new(p, received)),
            send: send_timeout.map(SendWatch::new),
        }))
    }

    /// What is due, given the bytes read from the client so far
    /// (`received`, `None` once it sent its FIN), whether bytes wait for
    /// the client's socket (`waiting`), and the bytes written to it so far
    /// (`written`). Wakes the task when something will be.
    ///
    /// A client that finished sending cannot answer a Ping: from its FIN
    /// on, `half_close_timeout` bounds the session, and no Ping is sent.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        received: Option<u64>,
        waiting: bool,
        written: u64,
    ) -> Poll<Due> {
        if let (Some(pings), Some(received)) = (&mut self.pings, received) {
            pings.heard(received);
            if let Poll::Ready(due) = pings.poll(cx) {
                return Poll::Ready(due);
            }
        }
        if let Some(send) = &mut self.send {
            if send.poll(cx, waiting, written).is_ready() {
                return Poll::Ready(Due::End(Unresponsive::Send));
            }
        }
        Poll::Pending
    }

    /// After [`Due::Ping`]: whether the Ping went out (it cannot once the
    /// upstream has finished and its FIN was passed on to the client).
    pub(crate) fn ping_sent(&mut self, sent: bool) {
        if let Some(pings) = &mut self.pings {
            pings.sent(sent);
        }
    }
}

/// When to Ping, and when the client is overdue.
struct Pinger {
    settings: PingSettings,
    /// The one timer: at the next deadline it was given, maybe early.
    /// Gated: polled only when it fired or was reset.
    timer: Gated<Sleep>,
    /// Bytes read from the client at the last look.
    received: u64,
    /// When that count last changed (or the splice began).
    last_heard: Instant,
    /// When wsgate's Ping went out, while no byte came since.
    awaiting: Option<Instant>,
}

impl Pinger {
    fn new(settings: PingSettings, received: u64) -> Self {
        let now = Instant::now();
        Pinger {
            settings,
            timer: Gated::new(Box::pin(sleep(settings.interval))),
            received,
            last_heard: now,
            awaiting: None,
        }
    }

    /// Notes the bytes read from the client so far. The clock is read only
    /// when the count moved; the timer is touched only when this answers a
    /// Ping (the next one is then an interval away, not at the Pong
    /// deadline).
    fn heard(&mut self, received: u64) {
        if received == self.received {
            return;
        }
        self.received = received;
        self.last_heard = Instant::now();
        if self.awaiting.take().is_some() {
            let next = self.last_heard + self.settings.interval;
            self.timer.future_mut().reset(next);
        }
    }

    /// The deadline now in force: the Pong's while a Ping is unanswered,
    /// else the next Ping's.
    fn deadline(&self) -> Instant {
        match self.awaiting {
            Some(sent) => sent + self.settings.pong_timeout,
            None => self.last_heard + self.settings.interval,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Due> {
        while self.timer.poll(cx).is_ready() {
            let deadline = self.deadline();
            if Instant::now() >= deadline {
                return Poll::Ready(match self.awaiting {
                    Some(_) => Due::End(Unresponsive::Ping),
                    None => Due::Ping,
                });
            }
            self.timer.future_mut().reset(deadline);
        }
        Poll::Pending
    }

    /// A Ping went out now (`sent`), or none could: then ask again an
    /// interval later.
    fn sent(&mut self, sent: bool) {
        let now = Instant::now();
        let next = if sent {
            self.awaiting = Some(now);
            now + self.settings.pong_timeout
        } else {
            now + self.settings.interval
        };
        self.timer.future_mut().reset(next);
    }
}

/// How long bytes for the client have waited for its socket.
#[derive(Debug)]
struct SendWatch {
    limit: Duration,
    /// Made the first time bytes wait; polled only while they do.
    timer: Option<Pin<Box<Sleep>>>,
    /// While bytes wait: since when the client's socket took none.
    stuck_since: Option<Instant>,
    /// Bytes written to the client at that moment.
    written: u64,
}

impl SendWatch {
    fn new(limit: Duration) -> Self {
        SendWatch {
            limit,
            timer: None,
            stuck_since: None,
            written: 0,
        }
    }

    /// Ready once bytes have waited `limit` with none taken.
    fn poll(&mut self, cx: &mut Context<'_>, waiting: bool, written: u64) -> Poll<()> {
        if !waiting {
            self.stuck_since = None;
            return Poll::Pending;
        }
        let since = match self.stuck_since {
            Some(since) if written == self.written => since,
            // Bytes began to wait, or the socket took some since the last
            // look: the wait starts again.
            _ => {
                let now = Instant::now();
                self.stuck_since = Some(now);
                self.written = written;
                now
            }
        };
        let deadline = since + self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINGS: PingSettings = PingSettings {
        interval: Duration::from_secs(10),
        pong_timeout: Duration::from_secs(3),
    };

    fn poll_watch(w: &mut ClientWatch, received: u64, waiting: bool, written: u64) -> Poll<Due> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        w.poll(&mut cx, Some(received), waiting, written)
    }

    /// Polls at each step of paused time until something is due; when.
    async fn until_due(
        w: &mut ClientWatch,
        received: u64,
        waiting: bool,
        written: u64,
    ) -> (Due, Duration) {
        let start = Instant::now();
        loop {
            if let Poll::Ready(due) = poll_watch(w, received, waiting, written) {
                return (due, start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "nothing came due"
            );
        }
    }

    #[test]
    fn both_off_is_no_watch() {
        assert!(ClientWatch::new(None, None, 0).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_client_is_pinged_after_the_interval_and_ended_after_the_pong_timeout() {
        let mut w = ClientWatch::new(Some(PINGS), None, 5).expect("a watch");
        let (due, after) = until_due(&mut w, 5, false, 0).await;
        assert_eq!((due, after), (Due::Ping, PINGS.interval));
        w.ping_sent(true);
        let (due, after) = until_due(&mut w, 5, false, 0).await;
        assert_eq!(
            (due, after),
            (Due::End(Unresponsive::Ping), PINGS.pong_timeout)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn any_byte_from_the_client_puts_the_ping_off_and_answers_it() {
        let mut w = ClientWatch::new(Some(PINGS), None, 0).expect("a watch");
        // A byte at 4 s: the Ping is due 10 s after it, not at 10 s.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(poll_watch(&mut w, 1, false, 0).is_pending());
        let (due, after) = until_due(&mut w, 1, false, 0).await;
        assert_eq!((due, after), (Due::Ping, PINGS.interval));
        w.ping_sent(true);
        // Answered after 1 s: no end; the next Ping an interval after the answer.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(poll_watch(&mut w, 2, false, 0).is_pending());
        let (due, after) = until_due(&mut w, 2, false, 0).await;
        assert_eq!((due, after), (Due::Ping, PINGS.interval));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_finished_sending_is_not_pinged() {
        let mut w = ClientWatch::new(Some(PINGS), None, 0).expect("a watch");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        tokio::time::sleep(PINGS.interval * 3).await;
        assert!(w.poll(&mut cx, None, false, 0).is_pending());
    }

    #[tokio::test(start_paused = true)]
    async fn a_ping_that_could_not_go_is_tried_again_an_interval_later() {
        let mut w = ClientWatch::new(Some(PINGS), None, 0).expect("a watch");
        let _ = until_due(&mut w, 0, false, 0).await;
        w.ping_sent(false);
        let (due, after) = until_due(&mut w, 0, false, 0).await;
        assert_eq!(
            (due, after),
            (Due::Ping, PINGS.interval),
            "no end without a Ping"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_that_wait_end_the_session_at_the_send_timeout() {
        let limit = Duration::from_secs(5);
        let mut w = ClientWatch::new(None, Some(limit), 0).expect("a watch");
        // Nothing waits: nothing is ever due.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(poll_watch(&mut w, 0, false, 0).is_pending());
        // Bytes wait; at 3 s the socket takes some: the wait starts again.
        assert!(poll_watch(&mut w, 0, true, 100).is_pending());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(poll_watch(&mut w, 0, true, 200).is_pending());
        let (due, after) = until_due(&mut w, 0, true, 200).await;
        assert_eq!((due, after), (Due::End(Unresponsive::Send), limit));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_ends_in_time_starts_from_zero_next_time() {
        let limit = Duration::from_secs(5);
        let mut w = ClientWatch::new(None, Some(limit), 0).expect("a watch");
        assert!(poll_watch(&mut w, 0, true, 0).is_pending());
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(
            poll_watch(&mut w, 0, false, 50).is_pending(),
            "taken in time"
        );
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (due, after) = until_due(&mut w, 0, true, 50).await;
        assert_eq!((due, after), (Due::End(Unresponsive::Send), limit));
    }
}
