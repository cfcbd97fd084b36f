//! The splice's series: bytes and messages each way, the message guards'
//! actions, the connections wsgate ended with Close frames, and wsgate's
//! Pings to clients.

use prometheus::IntCounter;

use super::guards::GuardMetrics;
use super::StopReason;
use crate::metrics::{Family, Registrar};

/// Handles the tunnels count into; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct SpliceMetrics {
    /// `wsgate_transferred_bytes_total{direction="client_to_upstream"}`.
    pub(crate) bytes_client_to_upstream: IntCounter,
    /// `wsgate_transferred_bytes_total{direction="upstream_to_client"}`.
    pub(crate) bytes_upstream_to_client: IntCounter,
    /// `wsgate_messages_total{direction="client_to_upstream"}`.
    pub(crate) messages_client_to_upstream: IntCounter,
    /// `wsgate_messages_total{direction="upstream_to_client"}`.
    pub(crate) messages_upstream_to_client: IntCounter,
    /// `wsgate_message_guard_total{guard,action}`.
    pub(crate) guards: GuardMetrics,
    /// `wsgate_close_frames_sent_total{reason}`: per connection, once.
    pub(crate) close_frames: Family<StopReason>,
    /// `wsgate_pings_sent_total`: wsgate's Pings to quiet clients.
    pub(crate) pings_sent: IntCounter,
}

impl SpliceMetrics {
    /// Registers the splice's series, every one at 0.
    ///
    /// # Errors
    /// A name is taken on the registry.
    pub(crate) fn register(r: &Registrar<'_>) -> prometheus::Result<Self> {
        let bytes = r.counter_vec(
            "wsgate_transferred_bytes_total",
            "Bytes spliced",
            &["direction"],
        )?;
        let messages = r.counter_vec(
            "wsgate_messages_total",
            "WebSocket messages spliced: each data message once, and each control frame",
            &["direction"],
        )?;
        Ok(SpliceMetrics {
            bytes_client_to_upstream: bytes.with_label_values(&["client_to_upstream"]),
            bytes_upstream_to_client: bytes.with_label_values(&["upstream_to_client"]),
            messages_client_to_upstream: messages.with_label_values(&["client_to_upstream"]),
            messages_upstream_to_client: messages.with_label_values(&["upstream_to_client"]),
            guards: GuardMetrics::register(r)?,
            close_frames: r.family(
                "wsgate_close_frames_sent_total",
                "Connections wsgate ended with Close frames (counted once per connection)",
                "reason",
            )?,
            pings_sent: r.counter(
                "wsgate_pings_sent_total",
                "Pings wsgate sent to clients that had sent nothing for ping_interval",
            )?,
        })
    }
}
