//! The Redis side of the fleet limits: the two Lua scripts and the release
//! pipeline, and the names of the keys they touch.
//!
//! Every limit is a sorted set of *holds* (one member per admitted
//! connection, `<instance id>:<n>`) scored by the hold's expiry in
//! milliseconds of the Redis server's clock (`TIME`, so the instances' clocks
//! never matter). Expired members are dropped by whoever touches the set
//! next; the set itself carries a `PEXPIRE` of one lease, so a set nobody
//! touches again (its instances all died) vanishes on its own.
//!
//! On one server (and a Sentinel primary) every key of a namespace shares
//! the hash tag `{namespace}`. On a Redis Cluster the fleet-wide set keeps
//! that tag, and each key value's set has a tag of its own,
//! `{namespace:key:RULE:VALUE}`, so a fleet's key values spread over the
//! slots (docs/operations.md#redis-cluster-and-sentinel); a script then runs
//! once per slot (see `Fleet::admit`).

use std::sync::Arc;
use std::time::Duration;

use redis::Script;

use super::store::Kind;

/// Check every set, then add to all of them or to none: one round trip,
/// atomic on the server, so concurrent admissions from any number of
/// instances never pass a limit.
///
/// `KEYS`: the sets. `ARGV[1]`: lease in ms; `ARGV[2]`: the member;
/// `ARGV[3]`: `1` to add even over a limit (dry run); `ARGV[3 + i]`: the
/// limit of `KEYS[i]`. Returns `{full, count}`: `full` = the 1-based index
/// of the first set at its limit (0 = none), `count` = `KEYS[1]`'s size
/// after the call.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local full = 0
local first = 0
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local n = redis.call('ZCARD', key)
  if i == 1 then first = n end
  if full == 0 and n >= tonumber(ARGV[3 + i]) then full = i end
end
if full == 0 or ARGV[3] == '1' then
  for _, key in ipairs(KEYS) do
    redis.call('ZADD', key, now + ttl, ARGV[2])
    redis.call('PEXPIRE', key, ttl)
  end
  first = redis.call('ZCARD', KEYS[1])
end
return {full, first}
";

/// Push every live hold's expiry one lease ahead, re-creating holds Redis
/// lost (a restart without persistence), and drop expired ones.
///
/// `KEYS`: the sets. `ARGV[1]`: lease in ms; `ARGV[2]`: 1-based index of
/// the fleet-wide set in `KEYS` (0 = none); then for each key in order, the
/// number of members followed by the members. Returns the fleet-wide set's
/// size (-1 without one). `ZADD` goes in chunks: Lua's `unpack` has a stack
/// limit of a few thousand values.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local expiry = now + ttl
local pos = 3
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[pos])
  pos = pos + 1
  local done = 0
  while done < n do
    local m = math.min(n - done, 256)
    local args = {}
    for k = 1, m do
      args[2 * k - 1] = expiry
      args[2 * k] = ARGV[pos]
      pos = pos + 1
    end
    redis.call('ZADD', key, unpack(args))
    done = done + m
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if n > 0 then redis.call('PEXPIRE', key, ttl) end
end
local total = tonumber(ARGV[2])
if total > 0 then return redis.call('ZCARD', KEYS[total]) end
return -1
";

/// The loaded scripts (their SHA1s are computed once).
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) admit: Script,
    pub(crate) renew: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            admit: Script::new(ADMIT),
            renew: Script::new(RENEW),
        }
    }
}

/// The Redis key names of one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    namespace: String,
    /// `{namespace}:` — the hash tag and separator of the fleet-wide set
    /// (and of every key, outside a Cluster).
    prefix: String,
    /// `{namespace}:all`, made once (every admission names it).
    all: Arc<str>,
    /// Whether each key value's set gets a hash tag of its own.
    spread: bool,
}

impl Names {
    /// The names on `kind`: spread over slots on a Cluster only (one
    /// server gains nothing, and a rolling update from a version without
    /// Cluster support must keep counting in the same keys).
    pub(crate) fn new(namespace: &str, kind: Kind) -> Self {
        let prefix = format!("{{{namespace}}}:");
        Names {
            namespace: namespace.to_owned(),
            all: format!("{prefix}all").into(),
            prefix,
            spread: kind == Kind::Cluster,
        }
    }

    /// The set of every hold counted against `fleet_max_clients`.
    pub(crate) fn all(&self) -> &Arc<str> {
        &self.all
    }

    /// The set of one key value of a `fleet = true` rule. Rule names are
    /// `[a-z0-9_]`, so the rule and the value cannot run into each other.
    ///
    /// On a Cluster it is `{namespace:key:RULE:VALUE}`: Redis hashes what
    /// lies between the first `{` and the first `}` after it, and the
    /// namespace has no braces, so the tag is never empty and always the
    /// same for a value. A value with a `}` is cut there for hashing: it
    /// shares the slot of its part before the `}` (a different set all
    /// the same, so its count stays its own).
    pub(crate) fn key(&self, rule: &str, value: &str) -> String {
        if self.spread {
            format!("{{{}:key:{rule}:{value}}}", self.namespace)
        } else {
            format!("{}key:{rule}:{value}", self.prefix)
        }
    }
}

/// A lease as the scripts take it: whole milliseconds.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_namespace_shares_its_hash_tag_on_one_server() {
        for kind in [Kind::Single, Kind::Sentinel] {
            let n = Names::new("prod-ws", kind);
            assert_eq!(&**n.all(), "{prod-ws}:all");
            assert_eq!(n.key("tenant", "a:b{c}"), "{prod-ws}:key:tenant:a:b{c}");
        }
    }

    #[test]
    fn on_a_cluster_each_key_value_has_a_hash_tag_of_its_own() {
        use redis::cluster_routing::Slot;
        let n = Names::new("prod-ws", Kind::Cluster);
        assert_eq!(
            &**n.all(),
            "{prod-ws}:all",
            "the fleet-wide set keeps its name"
        );
        assert_eq!(n.key("tenant", "a"), "{prod-ws:key:tenant:a}");
        // Braces in a value: the tag ends at the first `}`, the same every time.
        let slot = |k: &str| Slot::for_key(k);
        assert_eq!(n.key("tenant", "a}b"), "{prod-ws:key:tenant:a}b}");
        assert_eq!(slot(&n.key("tenant", "a}b")), slot(&n.key("tenant", "a")));
        assert_eq!(
            slot(&n.key("tenant", "x{y")),
            slot("{prod-ws:key:tenant:x{y}")
        );
        assert_ne!(
            n.key("tenant", "a}b"),
            n.key("tenant", "a"),
            "still two sets"
        );
        let slots: std::collections::HashSet<_> = (0..50)
            .map(|i| slot(&n.key("tenant", &format!("t{i}"))))
            .collect();
        assert!(
            slots.len() > 40,
            "values spread over the slots: {}",
            slots.len()
        );
    }

    #[test]
    fn lease_in_whole_milliseconds() {
        assert_eq!(millis(Duration::from_secs(30)), 30_000);
        assert_eq!(millis(Duration::from_micros(1_500)), 1);
    }
}
