//! Reading wsgate's metrics: one scrape, one series, and matchers that poll
//! until a value is reached or fail after [`DEADLINE`].

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::client::{get_request, http_get};
use crate::support::DEADLINE;

/// The gauge of spliced connections holding a slot.
pub const ACTIVE: &str = "wsgate_connections_active";
/// Upgrades the upstream answered with something other than 101.
pub const REFUSED_UPGRADE: &str = "wsgate_upstream_errors_total{kind=\"refused_upgrade\"}";

pub async fn scrape(admin: SocketAddr) -> String {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "scrape failed");
    body
}

/// The value of one series, e.g. `wsgate_connections_rejected_total{reason="capacity"}`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let text = scrape(admin).await;
    metric_value(&text, series).unwrap_or_else(|| panic!("{series} missing from\n{text}"))
}

/// The value of `series`, or `None` when the admin port no longer answers
/// with metrics: for sampling while the process may be exiting.
pub async fn try_metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let mut s = TcpStream::connect(admin).await.ok()?;
    s.write_all(get_request(admin, "/metrics").as_bytes())
        .await
        .ok()?;
    let mut out = Vec::new();
    // Short: a caller samples in a loop, and one stalled scrape must not
    // use up its window.
    tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200"))
        .then(|| metric_value(body, series))
        .flatten()
}

/// Polls until `series` equals `want`, or fails after [`DEADLINE`].
pub async fn wait_metric(admin: SocketAddr, series: &str, want: f64) {
    let start = Instant::now();
    loop {
        let got = metric(admin, series).await;
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{series}: wanted {want}, still {got}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until `series` equals `want`; returns how long it took.
pub async fn time_until_metric(admin: SocketAddr, series: &str, want: f64) -> Duration {
    let start = Instant::now();
    wait_metric(admin, series, want).await;
    start.elapsed()
}

/// The value of the series of metric `name` whose labels are exactly
/// `labels`, in whatever order the exposition lists them.
pub fn labelled_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        let mut got: Vec<String> = match rest {
            "" => Vec::new(),
            r => r
                .strip_prefix('{')?
                .strip_suffix('}')?
                .split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
        };
        got.sort();
        (got == want).then(|| value.trim().parse().ok()).flatten()
    })
}

/// [`labelled_value`] from a fresh scrape; fails if the series is missing.
pub async fn labelled_metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = scrape(admin).await;
    labelled_value(&text, name, labels)
        .unwrap_or_else(|| panic!("{name}{labels:?} missing from\n{text}"))
}

/// Polls until `series` is at least `want`, or fails after [`DEADLINE`].
pub async fn wait_metric_at_least(admin: SocketAddr, series: &str, want: f64) {
    let start = Instant::now();
    loop {
        let got = metric(admin, series).await;
        if got >= want {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{series}: wanted at least {want}, still {got}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
