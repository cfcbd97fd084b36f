//! Which Redis deployment the fleet talks to, how to connect to it, and how
//! its keys route (docs/operations.md#redis-cluster-and-sentinel).
//!
//! [`Connector`] makes connections: the worker asks it at start and after
//! every loss, so a Sentinel primary is looked up again at each reconnect
//! and a failover is followed without a restart. [`Store`] is one
//! connection; it is a `redis::aio::ConnectionLike`, so the scripts and
//! pipelines run on it whatever the deployment. [`Kind::groups`] says which
//! keys one call may touch together: all of them on one server, those of
//! one hash slot on a Cluster.
//!
//! The maintained client does the hard parts: the cluster connection
//! follows `MOVED`/`ASK` and refreshes its slot map itself, the sentinel
//! client asks each sentinel in turn and checks `ROLE` on the primary it
//! names. What is ours is the deadline over every call (the client's own
//! retries end with it) and the errors that mean "reconnect" ([`means_lost`]).

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ErrorKind, Pipeline, RedisError, RedisFuture,
    RedisResult, Role, ServerErrorKind, Value,
};

use crate::config::{Deployment, SentinelTarget};

/// Retries of one call inside the cluster client (a `MOVED`, an `ASK`, a
/// `TRYAGAIN` while a slot migrates, a node reconnected): few and short,
/// since the caller's deadline (`fleet_timeout` for an admission) is what
/// bounds the call, and a failover is better met by the fail mode than by
/// waiting (the client's defaults wait seconds between retries).
const CLUSTER_RETRIES: u32 = 3;
/// Shortest and longest wait between two of those retries, in ms.
const CLUSTER_RETRY_WAIT_MS: (u64, u64) = (10, 250);

/// The kind of deployment, for the key layout and the call grouping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// One server (`redis://`, `rediss://`, `unix://`).
    Single,
    /// A primary found through its sentinels: one server at a time.
    Sentinel,
    /// A Redis Cluster: keys spread over hash slots.
    Cluster,
}

impl Kind {
    /// Cuts `keys` into the groups that one call (a script, a pipeline)
    /// may touch together, as indices into `keys`, in the order each group
    /// first appears: one group on a single server, one per hash slot on a
    /// Cluster (a script or pipeline over two slots is refused there with
    /// `CROSSSLOT`).
    pub(crate) fn groups(self, keys: &[&str]) -> Vec<Vec<usize>> {
        let mut groups: Vec<(Option<Slot>, Vec<usize>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let slot = (self == Kind::Cluster).then(|| Slot::for_key(key));
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, group)) => group.push(i),
                None => groups.push((slot, vec![i])),
            }
        }
        groups.into_iter().map(|(_, group)| group).collect()
    }

    /// `cmds` (each with whether its reply is kept) as pipelines: one on a
    /// single server (one round trip); one per command on a Cluster. A
    /// pipeline there goes to one node as a whole, and while its slot
    /// migrates the node answers part of it with `ASK`; the client follows
    /// that for one command (`ASKING` holds for the next command only),
    /// not for the rest of a pipeline, which the target then refuses with
    /// `MOVED` back to the source.
    pub(crate) fn pipelines(self, cmds: Vec<(Cmd, bool)>) -> Vec<Pipeline> {
        let mut out: Vec<Pipeline> = Vec::new();
        for (cmd, keep) in cmds {
            if out.is_empty() || self == Kind::Cluster {
                out.push(redis::pipe());
            }
            if let Some(pipe) = out.last_mut() {
                pipe.add_command(cmd);
                if !keep {
                    pipe.ignore();
                }
            }
        }
        out
    }
}

/// Makes connections to the deployment `fleet_redis_url` names.
pub(super) enum Connector {
    /// One server.
    Single(Box<redis::Client>),
    /// The sentinels (the client caches its connections to them).
    Sentinel(Box<SentinelClient>),
    /// The seed nodes of a Cluster.
    Cluster(Box<ClusterClient>),
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The clients hold the passwords: only the kind is shown.
        write!(f, "Connector({:?})", self.kind())
    }
}

impl Connector {
    /// The client for `deployment`; nothing is connected yet. `connect`
    /// and `response` bound one node's connection and one call inside the
    /// cluster client (each call has its own, shorter deadline too).
    ///
    /// # Errors
    /// The client refuses the settings (the configuration checked them).
    pub(super) fn new(
        deployment: Deployment,
        connect: Duration,
        response: Duration,
    ) -> RedisResult<Connector> {
        Ok(match deployment {
            Deployment::Single(url) => Connector::Single(Box::new(redis::Client::open(url)?)),
            Deployment::Cluster(nodes) => Connector::Cluster(Box::new(
                ClusterClient::builder(nodes)
                    .connection_timeout(connect)
                    .response_timeout(response)
                    .retries(CLUSTER_RETRIES)
                    .min_retry_wait(CLUSTER_RETRY_WAIT_MS.0)
                    .max_retry_wait(CLUSTER_RETRY_WAIT_MS.1)
                    .build()?,
            )),
            Deployment::Sentinel(target) => Connector::Sentinel(Box::new(sentinel_client(target)?)),
        })
    }

    pub(super) fn kind(&self) -> Kind {
        match self {
            Connector::Single(_) => Kind::Single,
            Connector::Sentinel(_) => Kind::Sentinel,
            Connector::Cluster(_) => Kind::Cluster,
        }
    }

    /// A new connection. On Sentinel the primary is asked of the sentinels
    /// every time (never remembered: after a failover the old address is a
    /// replica that answers every write with `READONLY`), and the
    /// connection is used only once the server itself answers `ROLE` as a
    /// primary.
    ///
    /// # Errors
    /// The deployment cannot be reached, refuses the login, or the
    /// sentinels name no primary (or one that is not).
    pub(super) async fn connect(&mut self, config: &AsyncConnectionConfig) -> RedisResult<Store> {
        match self {
            Connector::Single(client) => Ok(Store::Node(
                client
                    .get_multiplexed_async_connection_with_config(config)
                    .await?,
            )),
            Connector::Sentinel(sentinels) => {
                let primary = sentinels.async_get_client().await?;
                let mut conn = primary
                    .get_multiplexed_async_connection_with_config(config)
                    .await?;
                // The sentinel client checked ROLE on a connection of its
                // own; a failover may have happened since.
                let role: Role = redis::cmd("ROLE").query_async(&mut conn).await?;
                if !matches!(role, Role::Primary { .. }) {
                    return Err(RedisError::from((
                        ErrorKind::Server(ServerErrorKind::ReadOnly),
                        "the primary the sentinels named is a replica now",
                    )));
                }
                Ok(Store::Node(conn))
            }
            Connector::Cluster(client) => Ok(Store::Cluster(client.get_async_connection().await?)),
        }
    }
}

/// The sentinel client of `target`: the URL's password logs in to the data
/// nodes, `sentinel_password` to the sentinels.
fn sentinel_client(target: SentinelTarget) -> RedisResult<SentinelClient> {
    let sentinels = target
        .sentinels
        .into_iter()
        .map(|(host, port)| ConnectionAddr::Tcp(host, port));
    let mut builder =
        SentinelClientBuilder::new(sentinels, target.master, SentinelServerType::Master)?
            .set_client_to_redis_db(target.db);
    if let Some(user) = target.username {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = target.password {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(password) = target.sentinel_password {
        builder = builder.set_client_to_sentinel_password(password);
    }
    builder.build()
}

/// One connection to the deployment. Cheap to clone: clones share it.
#[derive(Clone)]
pub(crate) enum Store {
    /// A single server, or the primary the sentinels named.
    Node(MultiplexedConnection),
    /// The cluster client: one connection per node, routed by slot.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Store::Node(_) => "Store::Node",
            Store::Cluster(_) => "Store::Cluster",
        })
    }
}

impl ConnectionLike for Store {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Store::Node(c) => c.req_packed_command(cmd),
            Store::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Store::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Store::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Store::Node(c) => c.get_db(),
            Store::Cluster(c) => c.get_db(),
        }
    }
}

/// Whether `e` means the connection cannot be used any more, so the worker
/// must connect again (through the sentinels, or a fresh slot map): the
/// socket is gone, or the server is no longer the writable primary
/// (`READONLY`: a demoted primary; `LOADING`: a restart reading its data;
/// `MASTERDOWN`: a replica that lost its primary; `CLUSTERDOWN`). Other
/// errors (`TRYAGAIN` while a slot migrates, a script error) fail the call
/// alone.
pub(crate) fn means_lost(e: &RedisError) -> bool {
    e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || e.is_io_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::BusyLoading
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
            )
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_group_on_one_server_one_per_slot_on_a_cluster() {
        let keys = [
            "{ns}:all",
            "{ns:key:t:a}",
            "{ns:key:t:b}",
            "{ns}:other",
            "{ns:key:t:a}x",
        ];
        for kind in [Kind::Single, Kind::Sentinel] {
            assert_eq!(kind.groups(&keys), vec![vec![0, 1, 2, 3, 4]]);
        }
        assert_eq!(
            Kind::Cluster.groups(&keys),
            vec![vec![0, 3], vec![1, 4], vec![2]],
            "by hash tag, in order of first appearance"
        );
        assert!(Kind::Cluster.groups(&[]).is_empty());
    }

    #[test]
    fn one_pipeline_on_one_server_one_per_command_on_a_cluster() {
        let cmds = || {
            vec![
                (redis::cmd("ZREM").arg("{ns}:all").arg("m").clone(), false),
                (
                    redis::cmd("ZREM").arg("{ns:key:t:a}").arg("m").clone(),
                    false,
                ),
                (redis::cmd("ZCARD").arg("{ns}:all").clone(), true),
            ]
        };
        for kind in [Kind::Single, Kind::Sentinel] {
            let p = kind.pipelines(cmds());
            assert_eq!(p.len(), 1);
            assert_eq!(p[0].len(), 3);
        }
        let p = Kind::Cluster.pipelines(cmds());
        assert_eq!(p.iter().map(Pipeline::len).collect::<Vec<_>>(), [1, 1, 1]);
        assert!(Kind::Cluster.pipelines(Vec::new()).is_empty());
    }

    #[test]
    fn a_demoted_or_loading_server_means_reconnect() {
        let server = |kind| RedisError::from((ErrorKind::Server(kind), "test"));
        for kind in [
            ServerErrorKind::ReadOnly,
            ServerErrorKind::BusyLoading,
            ServerErrorKind::MasterDown,
            ServerErrorKind::ClusterDown,
        ] {
            assert!(means_lost(&server(kind)), "{kind:?}");
        }
        for kind in [ServerErrorKind::TryAgain, ServerErrorKind::ResponseError] {
            assert!(!means_lost(&server(kind)), "{kind:?}");
        }
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(means_lost(&io));
    }
}
