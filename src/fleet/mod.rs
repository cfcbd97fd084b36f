//! Fleet-wide limits through Redis (docs/operations.md#fleet-wide-limits): `fleet_max_clients` and the
//! `fleet = true` key rules, held across every instance of a namespace.
//!
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | [`Fleet`] (one admission = one script call) and [`FleetHold`] (one connection's hold) |
//! | `worker.rs` | the instance's background task: connection, reconnects, batched renewals and releases |
//! | `outage.rs` | what the log says while Redis is unreachable: the cause, once a minute, the recovery |
//! | `scripts.rs` | the Lua scripts and the key names |
//! | `heartbeat.rs` | each instance's beat (active count, state) and the fleet as the beats show it |
//! | `store.rs` | which Redis deployment (one server, Sentinel, Cluster), how to connect, how keys route |
//!
//! # Holds as leases
//! Each admitted connection under a fleet limit is one member of a sorted
//! set per limit, scored by its expiry (README "Limits across replicas"
//! says why this layout and what it costs). The admission script drops
//! expired members, checks every limit and adds the hold to all of them or
//! to none, atomically. On a Redis Cluster the sets of one admission may
//! lie in several slots: the script runs once per slot, in order, and a
//! refusal takes the hold back out of the slots already passed
//! (docs/operations.md#redis-cluster-and-sentinel). [`FleetHold`] lives inside the connection's
//! `AdmissionGuard`, so every close path gives the hold back: its `Drop`
//! removes it from the instance's live set and queues the release. The
//! worker renews all live holds every `fleet_lease_ttl / 3` in one call;
//! holds of an instance that stops renewing (killed, partitioned) expire
//! on their own. Releases and renewals go through the one worker in order,
//! so a renewal can never re-create a hold released after its snapshot.
//!
//! # When Redis is down or slow
//! An admission waits at most `fleet_timeout`. The mode decides what a
//! failed or late answer means: `open` admits on the local limits and keeps
//! the hold live, so the next successful renewal counts it (the fleet's
//! count is the truth again within one renewal); `closed` refuses with
//! `fleet_unavailable` and queues the hold's release in case the script ran
//! late. Once Redis is known down (a lost connection, a failed renewal, or
//! three admissions in a row past their deadline), admissions skip Redis
//! at once until the worker has reconnected and renewed. Existing
//! connections never depend on Redis.

mod heartbeat;
mod metrics;
mod outage;
mod scripts;
mod store;
mod worker;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[cfg(test)]
pub(crate) use self::heartbeat::Beat;
pub(crate) use self::heartbeat::{BeatState, FleetView};
pub(crate) use self::metrics::FleetMetrics;
use self::metrics::{FleetOp, FleetResult};
use crate::config::{FailMode, FleetSettings, RedisUrl};

use self::scripts::{millis, Names, Scripts};
use self::store::{means_lost, Connector, Kind, Store};

/// Admissions past their deadline in a row that mark Redis down.
const TIMEOUTS_BEFORE_DOWN: u32 = 3;

/// The fleet limits of this instance. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Fleet {
    shared: Arc<Shared>,
}

/// One fleet limit a request falls under: a Redis set and its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scope {
    /// The sorted set's key.
    set: Arc<str>,
    /// At least 1 (an unlimited key value is not a scope).
    limit: u32,
}

/// What the fleet said about one upgrade.
#[derive(Debug)]
pub(crate) struct FleetAdmission {
    /// The hold, when the connection is admitted and counted; `None` when
    /// no fleet limit applies or the admission is refused.
    pub(crate) hold: Option<FleetHold>,
    /// Why the fleet refuses (or, in dry run, would have refused).
    pub(crate) refused: Option<FleetRefusal>,
}

/// Why the fleet refused an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FleetRefusal {
    /// The scope at this index of the request's scopes is at its limit.
    Full(usize),
    /// Redis is down or slow and `fleet_fail_mode = closed`.
    Unavailable,
}

/// Whether an admission script may have reached Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Redis was known down: nothing was sent.
    No,
    /// Sent, but no answer came (or an error did): it may have run.
    Maybe,
}

/// One connection's hold. Dropping it gives the hold back.
#[derive(Debug)]
pub(crate) struct FleetHold {
    shared: Arc<Shared>,
    id: u64,
}

/// A live hold: its member name and the sets it is in.
#[derive(Debug)]
struct Live {
    member: Box<str>,
    sets: Box<[Arc<str>]>,
}

/// A hold to take out of Redis, and since when (after a lease it has
/// expired anyway, so a release that keeps failing is dropped then).
#[derive(Debug)]
struct Release {
    live: Arc<Live>,
    since: Instant,
}

/// The connection in use and its generation (a failure reported against an
/// older connection must not drop a newer one).
#[derive(Debug, Default)]
struct Link {
    conn: Option<Store>,
    generation: u64,
}

#[derive(Debug)]
struct Shared {
    /// Start-only settings, kept to warn when a reload changes them.
    url: RedisUrl,
    namespace: String,
    /// One server, Sentinel or Cluster: how calls are grouped.
    kind: Kind,
    names: Names,
    instance: String,
    lease: Duration,
    /// Reloadable: `fleet_max_clients`, `fleet_timeout` (µs), `fleet_fail_mode`.
    max_clients: AtomicU32,
    timeout_micros: AtomicU64,
    closed_mode: AtomicBool,
    scripts: Scripts,
    heartbeats: heartbeat::Heartbeats,
    link: RwLock<Link>,
    /// Admissions past their deadline in a row.
    timeouts: AtomicU32,
    live: Mutex<HashMap<u64, Arc<Live>>>,
    next_id: AtomicU64,
    releases: mpsc::UnboundedSender<Release>,
    /// Wakes the worker when an admission found the connection lost.
    lost: Notify,
    /// Set once the worker's first connection attempt is over (start-up
    /// waits for it, briefly, so the first clients are judged by Redis).
    first_attempt: watch::Sender<bool>,
    metrics: FleetMetrics,
}

impl Fleet {
    /// Starts the fleet limits of `settings`: the worker connects in the
    /// background (start-up never waits for Redis), and stops when `stop`
    /// is cancelled, after one last attempt to give back what it holds.
    ///
    /// # Errors
    /// The URL cannot be used by the client (validation already parsed it).
    pub(crate) fn start(
        settings: &FleetSettings,
        metrics: FleetMetrics,
        stop: CancellationToken,
    ) -> Result<(Fleet, tokio::task::JoinHandle<()>), redis::RedisError> {
        let deployment = settings
            .redis_url
            .deployment()
            .map_err(|why| redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, why)))?;
        let connector =
            Connector::new(deployment, worker::CONNECT_TIMEOUT, settings.lease_ttl / 3)?;
        let kind = connector.kind();
        let (releases, queue) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            url: settings.redis_url.clone(),
            namespace: settings.namespace.clone(),
            kind,
            names: Names::new(&settings.namespace, kind),
            instance: settings.instance_id.clone(),
            lease: settings.lease_ttl,
            max_clients: AtomicU32::new(0),
            timeout_micros: AtomicU64::new(0),
            closed_mode: AtomicBool::new(false),
            scripts: Scripts::new(),
            heartbeats: heartbeat::Heartbeats::new(&settings.namespace),
            link: RwLock::new(Link::default()),
            timeouts: AtomicU32::new(0),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            releases,
            lost: Notify::new(),
            first_attempt: watch::Sender::new(false),
            metrics,
        });
        let fleet = Fleet { shared };
        fleet.apply(settings);
        fleet.shared.metrics.up.set(0);
        let task = tokio::spawn(worker::run(
            Arc::clone(&fleet.shared),
            connector,
            queue,
            stop,
        ));
        Ok((fleet, task))
    }

    /// Waits until the worker's first attempt to connect is over, or `max`.
    pub(crate) async fn first_attempt(&self, max: Duration) {
        let mut done = self.shared.first_attempt.subscribe();
        let _ = tokio::time::timeout(max, done.wait_for(|d| *d)).await;
    }

    /// Applies the reloadable settings. The URL, namespace, lease and
    /// instance id are read at start only (changing them live would orphan
    /// every hold this instance has in Redis).
    pub(crate) fn apply(&self, settings: &FleetSettings) {
        let s = &*self.shared;
        if settings.redis_url != s.url
            || settings.namespace != s.namespace
            || settings.lease_ttl != s.lease
            || settings.instance_id != s.instance
        {
            tracing::warn!(
                "fleet_redis_url, fleet_namespace, fleet_lease_ttl and fleet_instance_id take \
                 effect at the next start; the running values stay"
            );
        }
        s.max_clients.store(settings.max_clients, Ordering::Release);
        s.timeout_micros.store(
            u64::try_from(settings.timeout.as_micros()).unwrap_or(u64::MAX),
            Ordering::Release,
        );
        s.closed_mode
            .store(settings.fail_mode == FailMode::Closed, Ordering::Release);
        s.metrics.max.set(i64::from(settings.max_clients));
    }

    /// The fleet-wide scope (`fleet_max_clients`), when it is on.
    pub(crate) fn total_scope(&self) -> Option<Scope> {
        let limit = self.shared.max_clients.load(Ordering::Acquire);
        (limit > 0).then(|| Scope {
            set: Arc::clone(self.shared.names.all()),
            limit,
        })
    }

    /// The scope of one key value of a `fleet = true` rule (`limit` ≥ 1).
    pub(crate) fn key_scope(&self, rule: &str, value: &str, limit: u32) -> Scope {
        Scope {
            set: self.shared.names.key(rule, value).into(),
            limit,
        }
    }

    /// Checks `scopes` (the fleet-wide one first, when present) and takes a
    /// hold in all of them. Waits at most `fleet_timeout`. In dry run
    /// (`enforce = false`) the hold is taken even over a limit, so the count
    /// stays the truth, and the refusal is only reported.
    pub(crate) async fn admit(&self, scopes: Vec<Scope>, enforce: bool) -> FleetAdmission {
        if scopes.is_empty() {
            return FleetAdmission {
                hold: None,
                refused: None,
            };
        }
        let s = &*self.shared;
        let id = s.next_id.fetch_add(1, Ordering::Relaxed);
        let has_total = scopes
            .first()
            .is_some_and(|sc| Arc::ptr_eq(&sc.set, s.names.all()));
        let live = Arc::new(Live {
            member: format!("{}:{id}", s.instance).into(),
            sets: scopes.iter().map(|sc| Arc::clone(&sc.set)).collect(),
        });
        let Some((generation, conn)) = s.connection() else {
            return self.without_redis(id, live, enforce, Sent::No);
        };

        // One whole admission, every slot group included, within one
        // `fleet_timeout`.
        let timeout = Duration::from_micros(s.timeout_micros.load(Ordering::Acquire));
        let deadline = Instant::now() + timeout;
        let keys: Vec<&str> = scopes.iter().map(|sc| &*sc.set).collect();
        let groups = s.kind.groups(&keys);
        let answer = s
            .call(
                FleetOp::Admit,
                timeout,
                s.admit_groups(conn.clone(), &groups, &scopes, &live.member, enforce),
            )
            .await;
        match answer {
            Outcome::Answered(Admitted {
                full,
                count,
                passed,
            }) => {
                s.timeouts.store(0, Ordering::Relaxed);
                if let (true, Some(count)) = (has_total, count) {
                    s.metrics.active.set(count);
                }
                let refused = full.map(FleetRefusal::Full);
                if refused.is_some() && enforce {
                    // Groups passed before the one that refused hold it:
                    // take it back out (within what is left of the
                    // deadline, else through the worker).
                    if passed > 0 {
                        let sets: Vec<&str> = groups[..passed]
                            .iter()
                            .flatten()
                            .map(|&i| &*scopes[i].set)
                            .collect();
                        if !s.compensate(conn, &sets, &live.member, deadline).await {
                            let _ = s.releases.send(Release {
                                live,
                                since: Instant::now(),
                            });
                        }
                    }
                    return FleetAdmission {
                        hold: None,
                        refused,
                    };
                }
                FleetAdmission {
                    hold: Some(self.keep(id, live)),
                    refused,
                }
            }
            Outcome::Failed(e) => {
                if means_lost(&e) {
                    s.lost(generation);
                }
                self.without_redis(id, live, enforce, Sent::Maybe)
            }
            Outcome::TimedOut => {
                if s.timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= TIMEOUTS_BEFORE_DOWN {
                    s.lost(generation);
                }
                // The script may still run later: in closed mode its hold
                // is queued for release (after the script, on the same
                // connection); in open mode it is live and renewed anyway.
                self.without_redis(id, live, enforce, Sent::Maybe)
            }
        }
    }

    /// Redis could not be asked, or did not answer: the mode decides.
    fn without_redis(&self, id: u64, live: Arc<Live>, enforce: bool, sent: Sent) -> FleetAdmission {
        let s = &*self.shared;
        if s.closed_mode.load(Ordering::Acquire) {
            if sent == Sent::Maybe {
                // Harmless if the script never ran.
                let _ = s.releases.send(Release {
                    live: Arc::clone(&live),
                    since: Instant::now(),
                });
            }
            if enforce {
                return FleetAdmission {
                    hold: None,
                    refused: Some(FleetRefusal::Unavailable),
                };
            }
            // Dry run: admitted, and counted once Redis answers again.
            return FleetAdmission {
                hold: Some(self.keep(id, live)),
                refused: Some(FleetRefusal::Unavailable),
            };
        }
        FleetAdmission {
            hold: Some(self.keep(id, live)),
            refused: None,
        }
    }

    /// Makes `live` one of the holds the worker renews.
    fn keep(&self, id: u64, live: Arc<Live>) -> FleetHold {
        self.shared.live_holds().insert(id, live);
        FleetHold {
            shared: Arc::clone(&self.shared),
            id,
        }
    }
}

/// What the admission scripts of one request answered.
#[derive(Debug)]
struct Admitted {
    /// The index (in the request's scopes) of the first scope at its limit.
    full: Option<usize>,
    /// The fleet-wide set's size after the call, when the fleet-wide set
    /// was the first key of a script that ran.
    count: Option<i64>,
    /// How many slot groups took the hold (all of them unless refused).
    passed: usize,
}

/// How one Redis call went.
#[derive(Debug)]
enum Outcome<T> {
    Answered(T),
    Failed(redis::RedisError),
    TimedOut,
}

impl Shared {
    /// Runs one Redis call with a deadline and counts it under `op`
    /// (`wsgate_fleet_requests_total`, the round-trip histogram, `_up`).
    async fn call<T>(
        &self,
        op: FleetOp,
        deadline: Duration,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Outcome<T> {
        let started = Instant::now();
        let (outcome, result) = match tokio::time::timeout(deadline, call).await {
            Ok(Ok(v)) => (Outcome::Answered(v), FleetResult::Ok),
            Ok(Err(e)) => {
                tracing::debug!("fleet {op:?} failed: {e}");
                (Outcome::Failed(e), FleetResult::Error)
            }
            Err(_) => (Outcome::TimedOut, FleetResult::Timeout),
        };
        self.metrics.observe(op, result, started.elapsed());
        outcome
    }

    /// Runs the admission script once per group of `scopes` (one group
    /// outside a Cluster: one round trip), in order, the fleet-wide set's
    /// group first. Each script checks and adds atomically within its
    /// group; with `enforce` the first group that refuses ends the run.
    async fn admit_groups(
        &self,
        mut conn: Store,
        groups: &[Vec<usize>],
        scopes: &[Scope],
        member: &str,
        enforce: bool,
    ) -> redis::RedisResult<Admitted> {
        let mut answer = Admitted {
            full: None,
            count: None,
            passed: 0,
        };
        for group in groups {
            // EVALSHA encoded straight into one command buffer, sized
            // once: `prepare_invoke` would copy every key and argument into
            // a vector of its own first (an admission is the hot path).
            let mut call = redis::Cmd::with_capacity(6 + 2 * group.len(), 160);
            call.arg("EVALSHA")
                .arg(self.scripts.admit.get_hash())
                .arg(group.len());
            for &i in group {
                call.arg(&*scopes[i].set);
            }
            call.arg(millis(self.lease))
                .arg(member)
                .arg(if enforce { "0" } else { "1" });
            for &i in group {
                call.arg(scopes[i].limit);
            }
            let (full, count) = match call.query_async::<(i64, i64)>(&mut conn).await {
                // Redis restarted or flushed its scripts: load it, again.
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    self.scripts.admit.load_async(&mut conn).await?;
                    call.query_async::<(i64, i64)>(&mut conn).await?
                }
                answer => answer?,
            };
            if group.first() == Some(&0) {
                answer.count = Some(count);
            }
            let full = usize::try_from(full)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| group.get(i).copied());
            if answer.full.is_none() {
                answer.full = full;
            }
            if full.is_some() && enforce {
                return Ok(answer);
            }
            answer.passed += 1;
        }
        Ok(answer)
    }

    /// Takes `member` out of `sets` (the slot groups that admitted it
    /// before a later one refused) by `deadline`: `ZREM`s in one pipeline,
    /// or all at once on a Cluster. `false` when that did not succeed in time.
    async fn compensate(
        &self,
        conn: Store,
        sets: &[&str],
        member: &str,
        deadline: Instant,
    ) -> bool {
        let cmds = sets
            .iter()
            .map(|set| (redis::cmd("ZREM").arg(*set).arg(member).clone(), false))
            .collect();
        let calls = self.kind.pipelines(cmds).into_iter().map(|pipe| {
            let mut conn = conn.clone();
            async move { pipe.query_async::<()>(&mut conn).await }
        });
        let all = futures_util::future::try_join_all(calls);
        let left = deadline.saturating_duration_since(Instant::now());
        matches!(
            self.call(FleetOp::Release, left, all).await,
            Outcome::Answered(_)
        )
    }

    /// The connection in use, unless Redis is known down.
    fn connection(&self) -> Option<(u64, Store)> {
        let link = self.link.read().unwrap_or_else(PoisonError::into_inner);
        link.conn.clone().map(|c| (link.generation, c))
    }

    /// Marks the connection of `generation` lost: admissions skip Redis
    /// until the worker has a new one and has renewed.
    fn lost(&self, generation: u64) {
        let mut link = self.link.write().unwrap_or_else(PoisonError::into_inner);
        if link.generation == generation && link.conn.take().is_some() {
            self.metrics.up.set(0);
            self.lost.notify_one();
        }
    }

    fn live_holds(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Live>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for FleetHold {
    fn drop(&mut self) {
        let s = &*self.shared;
        let live = s.live_holds().remove(&self.id);
        if let Some(live) = live {
            // The worker is gone only once the process is ending; the hold
            // then expires after its lease.
            let _ = s.releases.send(Release {
                live,
                since: Instant::now(),
            });
        }
    }
}
