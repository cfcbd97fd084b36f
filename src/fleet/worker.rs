//! The fleet worker: one task per instance that owns the Redis connection's
//! life (connect, reconnect), renews every live hold in one call per
//! interval, and gives released holds back in batches.
//!
//! Renewals and releases both go through this one task, in order, so a
//! renewal can never put back a hold whose release was queued after the
//! renewal's snapshot. After a reconnect, the holds are renewed *before*
//! admissions may use the new connection: a Redis that restarted empty has
//! this instance's holds again before it judges anyone. The same goes for
//! a failover: the promoted replica (Sentinel or Cluster) may lack the
//! last holds; the renewal after the reconnect puts them back.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncConnectionConfig;
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::metrics::FleetOp;
use super::outage::{Cause, Outage, Report};
use super::scripts::millis;
use super::store::{Connector, Kind, Store};
use super::{Live, Outcome, Release, Shared};

/// How long one connection attempt (TCP, TLS, AUTH, script loads; the
/// sentinels' answer; the cluster's slot map) may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Slot groups renewed or released at once on a Cluster (each group is
/// its own round trip, to whichever node holds the slot).
const GROUPS_AT_ONCE: usize = 16;
/// Pause between connection attempts while Redis is down.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// Holds per renewal script call.
const RENEW_CHUNK: usize = 1000;
/// Releases taken off the queue per batch.
const RELEASE_BATCH: usize = 4096;
/// The last attempt to give everything back when the process stops.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

/// Runs until `stop`; then gives back every hold it still has, once.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut connector: Connector,
    mut queue: mpsc::UnboundedReceiver<Release>,
    stop: CancellationToken,
) {
    // Redis calls of the worker may take up to one renewal interval.
    let interval = shared.lease / 3;
    let mut pending: Vec<Release> = Vec::new();
    let mut next_renewal = Instant::now() + interval;
    let mut outage = Outage::default();
    let mut batch = Vec::with_capacity(RELEASE_BATCH);

    while !stop.is_cancelled() {
        let Some((generation, mut conn)) = shared.connection() else {
            let attempt = reconnect(&shared, &mut connector, interval).await;
            shared.first_attempt.send_replace(true);
            match attempt {
                Ok((generation, mut conn)) => {
                    report(&shared, outage.connected(Instant::now()), None);
                    next_renewal = Instant::now() + interval;
                    if !flush(&shared, &mut conn, &mut pending, interval).await {
                        shared.lost(generation);
                    }
                }
                Err(failure) => {
                    tracing::debug!(
                        cause = failure.cause.text(),
                        "fleet: Redis unreachable: {}",
                        failure.detail
                    );
                    report(&shared, outage.failed(Instant::now()), Some(&failure));
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = sleep(RECONNECT_DELAY) => {}
                    }
                    while let Ok(r) = queue.try_recv() {
                        pending.push(r);
                    }
                    forget_expired(&shared, &mut pending);
                }
            }
            continue;
        };

        tokio::select! {
            () = stop.cancelled() => {}
            n = queue.recv_many(&mut batch, RELEASE_BATCH) => {
                if n == 0 {
                    break; // every sender is gone: the fleet was dropped
                }
                pending.append(&mut batch);
                if !flush(&shared, &mut conn, &mut pending, interval).await {
                    lost(&shared, generation, &mut outage);
                }
            }
            () = sleep_until(next_renewal) => {
                next_renewal = Instant::now() + interval;
                // Failed releases are retried before the renewal (a hold
                // given back must not stay counted for a whole lease).
                let ok = flush(&shared, &mut conn, &mut pending, interval).await
                    && renew(&shared, &mut conn, interval).await;
                if !ok {
                    lost(&shared, generation, &mut outage);
                }
            }
            () = shared.lost.notified() => {}
        }
    }

    // Stopping: everything still live goes back too (the process ends).
    while let Ok(r) = queue.try_recv() {
        pending.push(r);
    }
    let now = Instant::now();
    pending.extend(
        shared
            .live_holds()
            .drain()
            .map(|(_, live)| Release { live, since: now }),
    );
    if pending.is_empty() {
        return;
    }
    if let Some((_, mut conn)) = shared.connection() {
        if flush(&shared, &mut conn, &mut pending, FINAL_FLUSH).await {
            return;
        }
    }
    tracing::warn!(
        holds = pending.len(),
        "fleet: could not give holds back on exit; they expire after fleet_lease_ttl"
    );
}

fn lost(shared: &Shared, generation: u64, outage: &mut Outage) {
    shared.lost(generation);
    if outage.lost(Instant::now()) {
        tracing::warn!(
            url = %shared.url,
            "fleet: lost Redis; admissions follow fleet_fail_mode until it is back"
        );
    }
}

/// Why a connection attempt failed.
#[derive(Debug)]
struct Failure {
    cause: Cause,
    /// The error as the client said it.
    detail: String,
}

/// Writes what [`Outage`] says about an attempt: the warnings of an outage
/// (with the failure's cause and the URL, password hidden) and the line
/// when Redis is back.
fn report(shared: &Shared, report: Option<Report>, failure: Option<&Failure>) {
    let url = &shared.url;
    let mode = if shared.closed_mode.load(Ordering::Acquire) {
        "closed"
    } else {
        "open"
    };
    let (cause, detail) = failure.map_or(("", ""), |f| (f.cause.text(), f.detail.as_str()));
    match report {
        None => {}
        Some(Report::Connected) => {
            tracing::info!(%url, "fleet: connected to Redis, holds renewed");
        }
        Some(Report::Back(down_for)) => tracing::info!(
            %url,
            down_for = ?down_for,
            "fleet: Redis is reachable again after {}, holds renewed",
            humantime::format_duration(round_to_millis(down_for))
        ),
        Some(Report::Unreachable) => tracing::warn!(
            %url,
            cause,
            error = detail,
            "fleet: cannot reach Redis at {url}: {cause} ({detail}); admissions follow \
             fleet_fail_mode ({mode}) until it is reachable; retrying, and saying so again \
             every minute while it lasts"
        ),
        Some(Report::Still(down_for)) => tracing::warn!(
            %url,
            cause,
            error = detail,
            "fleet: Redis at {url} still unreachable after {}: {cause} ({detail})",
            humantime::format_duration(Duration::from_secs(down_for.as_secs()))
        ),
    }
}

/// `d` without its sub-millisecond part, as a person reads it.
fn round_to_millis(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Connects, loads the scripts, renews every live hold on the new
/// connection, and only then lets admissions use it.
async fn reconnect(
    shared: &Shared,
    connector: &mut Connector,
    interval: Duration,
) -> Result<(u64, Store), Failure> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        // Each call has its own deadline (fleet_timeout, or the interval).
        .set_response_timeout(None);
    let connect = async {
        let mut conn = connector.connect(&config).await?;
        let loads = async {
            shared
                .scripts
                .admit
                .prepare_invoke()
                .load_async(&mut conn)
                .await?;
            shared
                .scripts
                .renew
                .prepare_invoke()
                .load_async(&mut conn)
                .await
        };
        let loaded = loads.await;
        // On a Cluster the load goes to every node, replicas included (a
        // promoted replica then has the scripts already); one node down
        // must not keep the others from being used: a call that meets
        // NOSCRIPT loads the script again itself.
        if connector.kind() != Kind::Cluster {
            loaded?;
        }
        Ok::<_, redis::RedisError>(conn)
    };
    let mut conn = match timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            return Err(Failure {
                cause: Cause::of(&e, shared.url.uses_tls()),
                detail: e.to_string(),
            })
        }
        Err(_) => {
            return Err(Failure {
                cause: Cause::TimedOut,
                detail: format!("no answer within {CONNECT_TIMEOUT:?}"),
            })
        }
    };
    if !renew(shared, &mut conn, interval).await {
        return Err(Failure {
            cause: Cause::Other,
            detail: "the renewal after connecting failed".to_owned(),
        });
    }
    let mut link = shared.link.write().unwrap_or_else(PoisonError::into_inner);
    link.generation += 1;
    link.conn = Some(conn.clone());
    shared.timeouts.store(0, Ordering::Relaxed);
    shared.metrics.up.set(1);
    Ok((link.generation, conn))
}

/// Pushes every live hold one lease ahead (re-creating any Redis lost) and
/// reads the fleet-wide count: one script call per [`RENEW_CHUNK`] holds,
/// so Redis, which runs one script at a time, serves admissions between
/// the chunks instead of stalling them for the whole renewal (10,000 holds
/// take ~20 ms of Redis time in one call; README "Limits across replicas").
/// `false` when Redis failed or did not answer within `deadline`.
async fn renew(shared: &Shared, conn: &mut Store, deadline: Duration) -> bool {
    let snapshot: Vec<Arc<Live>> = shared.live_holds().values().cloned().collect();
    let mut by_set: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for live in &snapshot {
        for set in &*live.sets {
            by_set.entry(set).or_default().push(&live.member);
        }
    }
    // The fleet-wide set goes first, even when this instance holds nothing
    // in it, so every renewal also reads the fleet's count.
    let all: &str = shared.names.all();
    let counting_all = shared.max_clients.load(Ordering::Acquire) > 0;
    let mut sets: Vec<(&str, Vec<&str>)> = Vec::with_capacity(by_set.len() + 1);
    if counting_all || by_set.contains_key(all) {
        let members = by_set.remove(all).unwrap_or_default();
        sets.push((all, members));
    }
    sets.extend(by_set);

    // One group outside a Cluster; there, one per slot (the fleet-wide
    // set's first), renewed a few at once.
    let keys: Vec<&str> = sets.iter().map(|(set, _)| *set).collect();
    let groups: Vec<Vec<(&str, Vec<&str>)>> = shared
        .kind
        .groups(&keys)
        .into_iter()
        .map(|group| {
            group
                .into_iter()
                .map(|i| (keys[i], std::mem::take(&mut sets[i].1)))
                .collect()
        })
        .collect();
    // Made before the stream (not by a closure inside it), or rustc cannot
    // prove the worker's future `Send`.
    let calls: Vec<_> = groups
        .iter()
        .map(|group| {
            let mut conn = conn.clone();
            async move {
                let mut count = -1;
                for chunk in chunks(group, RENEW_CHUNK) {
                    let mut call = shared.scripts.renew.prepare_invoke();
                    let total = chunk.iter().position(|(set, _)| *set == all);
                    call.arg(millis(shared.lease))
                        .arg(total.map_or(0, |i| i + 1));
                    for (set, members) in &chunk {
                        call.key(*set).arg(members.len()).arg(*members);
                    }
                    let n: i64 = call.invoke_async(&mut conn).await?;
                    if n >= 0 {
                        count = n;
                    }
                }
                Ok::<_, redis::RedisError>(count)
            }
        })
        .collect();
    let calls = futures_util::stream::iter(calls)
        .buffer_unordered(GROUPS_AT_ONCE)
        .fold(Ok(-1), |acc: redis::RedisResult<i64>, n| async move {
            match (acc, n) {
                (Err(e), _) | (_, Err(e)) => Err(e),
                (Ok(a), Ok(n)) => Ok(a.max(n)),
            }
        });
    match shared.call(FleetOp::Renew, deadline, calls).await {
        Outcome::Answered(count) => {
            if count >= 0 {
                shared.metrics.active.set(count);
            }
            true
        }
        Outcome::Failed(_) | Outcome::TimedOut => false,
    }
}

/// Cuts `sets` (set, members) into calls of at most `max` members each, in
/// order; a set with no members still gets its call (it is read).
fn chunks<'a>(
    sets: &'a [(&'a str, Vec<&'a str>)],
    max: usize,
) -> Vec<Vec<(&'a str, &'a [&'a str])>> {
    let mut out: Vec<Vec<(&str, &[&str])>> = Vec::new();
    let mut current: Vec<(&str, &[&str])> = Vec::new();
    let mut room = max;
    for (set, members) in sets {
        let mut rest: &[&str] = members;
        loop {
            let take = rest.len().min(room);
            let (now, later) = rest.split_at(take);
            current.push((set, now));
            room -= take;
            rest = later;
            if room == 0 {
                out.push(std::mem::take(&mut current));
                room = max;
            }
            if rest.is_empty() {
                break;
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Takes the pending releases out of Redis in one pipeline (one `ZREM` per
/// set). What fails stays pending, to be retried; `false` then.
async fn flush(
    shared: &Shared,
    conn: &mut Store,
    pending: &mut Vec<Release>,
    deadline: Duration,
) -> bool {
    forget_expired(shared, pending);
    if pending.is_empty() {
        return true;
    }
    let mut by_set: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in pending.iter() {
        for set in &*r.live.sets {
            by_set.entry(set).or_default().push(&r.live.member);
        }
    }
    // One pipeline outside a Cluster; there, one per command, a few at once.
    let all: &str = shared.names.all();
    let mut cmds: Vec<(redis::Cmd, bool)> = by_set
        .iter()
        .map(|(set, members)| {
            let zrem = redis::cmd("ZREM").arg(*set).arg(members.as_slice()).clone();
            (zrem, false)
        })
        .collect();
    // The fleet-wide count after the releases, so the gauge follows them
    // down instead of waiting for the next renewal.
    if by_set.contains_key(all) {
        cmds.push((redis::cmd("ZCARD").arg(all).clone(), true));
    }
    let calls: Vec<_> = shared
        .kind
        .pipelines(cmds)
        .into_iter()
        .map(|pipe| {
            let mut conn = conn.clone();
            async move { pipe.query_async::<Vec<i64>>(&mut conn).await }
        })
        .collect();
    let calls = futures_util::stream::iter(calls)
        .buffer_unordered(GROUPS_AT_ONCE)
        .fold(
            Ok(None),
            |acc: redis::RedisResult<Option<i64>>, n| async move {
                match (acc, n) {
                    (Err(e), _) | (_, Err(e)) => Err(e),
                    (Ok(a), Ok(n)) => Ok(a.or(n.first().copied())),
                }
            },
        );
    let answer = shared.call(FleetOp::Release, deadline, calls).await;
    drop(by_set);
    match answer {
        Outcome::Answered(count) => {
            if let Some(n) = count {
                shared.metrics.active.set(n);
            }
            pending.clear();
            true
        }
        Outcome::Failed(_) | Outcome::TimedOut => false,
    }
}

/// Drops releases older than a lease: Redis has expired those holds itself.
fn forget_expired(shared: &Shared, pending: &mut Vec<Release>) {
    pending.retain(|r| r.since.elapsed() < shared.lease);
}

#[cfg(test)]
mod tests {
    use super::chunks;

    #[test]
    fn renewal_chunks_hold_at_most_max_members_in_order() {
        let a: Vec<String> = (0..2500).map(|i| format!("a{i}")).collect();
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let sets = vec![
            ("all", a.clone()),
            ("empty", Vec::new()),
            ("k", vec!["x", "y"]),
        ];
        let calls = chunks(&sets, 1000);
        assert_eq!(calls.len(), 3);
        for call in &calls {
            assert!(call.iter().map(|(_, m)| m.len()).sum::<usize>() <= 1000);
        }
        // Every member once, in order, and the empty set still read.
        let flat: Vec<(&str, &str)> = calls
            .iter()
            .flatten()
            .flat_map(|(set, m)| m.iter().map(move |x| (*set, *x)))
            .collect();
        assert_eq!(flat.len(), 2502);
        assert_eq!(flat[0], ("all", "a0"));
        assert_eq!(flat[2499], ("all", "a2499"));
        assert!(calls
            .iter()
            .flatten()
            .any(|(set, m)| *set == "empty" && m.is_empty()));
        assert_eq!(chunks(&[], 1000).len(), 0);
    }
}
