//! The Redis side of the fleet limits: the two Lua scripts and the release
//! pipeline, and the names of the keys they touch.
//!
//! Every limit is a sorted set of *holds* (one member per admitted
//! connection, `<instance id>:<n>`) scored by the hold's expiry in
//! milliseconds of the Redis server's clock (`TIME`, so the instances' clocks
//! never matter). Expired members are dropped by whoever touches the set
//! next; the set itself carries a `PEXPIRE` of one lease, so a set nobody
//! touches again (its instances all died) vanishes on its own. Every key of
//! a namespace shares the hash tag `{namespace}`, so the multi-key scripts
//! also run on Redis Cluster.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;

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
    /// `{namespace}:` — the hash tag and separator every key starts with.
    prefix: String,
    /// `{namespace}:all`, made once (every admission names it).
    all: Arc<str>,
}

impl Names {
    pub(crate) fn new(namespace: &str) -> Self {
        let prefix = format!("{{{namespace}}}:");
        Names {
            all: format!("{prefix}all").into(),
            prefix,
        }
    }

    /// The set of every hold counted against `fleet_max_clients`.
    pub(crate) fn all(&self) -> &Arc<str> {
        &self.all
    }

    /// The set of one key value of a `fleet = true` rule. Rule names are
    /// `[a-z0-9_]`, so the rule and the value cannot run into each other.
    pub(crate) fn key(&self, rule: &str, value: &str) -> String {
        format!("{}key:{rule}:{value}", self.prefix)
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
    fn every_key_of_a_namespace_shares_its_hash_tag() {
        let n = Names::new("prod-ws");
        assert_eq!(&**n.all(), "{prod-ws}:all");
        assert_eq!(n.key("tenant", "a:b{c}"), "{prod-ws}:key:tenant:a:b{c}");
    }

    #[test]
    fn lease_in_whole_milliseconds() {
        assert_eq!(millis(Duration::from_secs(30)), 30_000);
        assert_eq!(millis(Duration::from_micros(1_500)), 1);
    }
}
