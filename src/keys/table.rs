//! The key table of one rule: how many connections each key value holds
//! now, and [`KeyHold`], the RAII share of one connection in it.
//!
//! A `Mutex<HashMap>` per rule: a reservation is one lookup and one
//! increment under the lock, never across an `.await`, so contention is a
//! few hundred nanoseconds even when every upgrade carries the same key.
//! The map is keyed by the value itself with the standard (SipHash) hasher,
//! which random values sent by a client cannot steer into one bucket. An
//! entry exists only while its count is above 0, and at most `max_keys`
//! entries exist at once, so memory is bounded by what the operator set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prometheus::IntGauge;

/// Why a reservation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// The value already holds its limit.
    Key,
    /// The value is new and the table already tracks `max_keys` values.
    Table,
}

/// Concurrent connections per key value for one rule.
#[derive(Debug)]
pub(crate) struct KeyTable {
    /// The rule's name, for the access log's `keys` field.
    rule: Arc<str>,
    counts: Mutex<HashMap<Box<str>, u32>>,
    /// `wsgate_keys_tracked{rule}`: moved with every entry added or removed.
    tracked: IntGauge,
}

impl KeyTable {
    /// An empty table of rule `rule` whose size is mirrored in `tracked`.
    pub(crate) fn new(rule: &str, tracked: IntGauge) -> Arc<Self> {
        tracked.set(0);
        Arc::new(KeyTable {
            rule: rule.into(),
            counts: Mutex::new(HashMap::new()),
            tracked,
        })
    }

    /// Takes one connection for `key` if it holds fewer than `limit`
    /// (0 = unlimited) and, for a new value, the table has room for it.
    /// `over_limit` (dry run) takes it past the limit anyway; a full table
    /// is never passed, so memory stays bounded even in a dry run.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        key: &str,
        limit: u32,
        max_keys: usize,
        over_limit: bool,
    ) -> Result<KeyHold, Full> {
        let mut counts = self.lock();
        let tracked = counts.len();
        match counts.get_mut(key) {
            Some(n) if limit != 0 && *n >= limit && !over_limit => return Err(Full::Key),
            Some(n) => *n += 1,
            None if tracked >= max_keys => return Err(Full::Table),
            None => {
                counts.insert(key.into(), 1);
                self.tracked.inc();
            }
        }
        Ok(KeyHold {
            table: Arc::clone(self),
            key: key.into(),
        })
    }

    /// Whether taking one more for `key` would pass `limit` (dry-run report).
    pub(crate) fn is_full(&self, key: &str, limit: u32) -> bool {
        limit != 0 && self.lock().get(key).is_some_and(|n| *n >= limit)
    }

    fn release(&self, key: &str) {
        let mut counts = self.lock();
        if let Some(n) = counts.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(key);
                self.tracked.dec();
            }
        }
    }

    /// Distinct values held now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// The `n` values with the most connections, most first (ties by value,
    /// so the answer is stable). Copies out under the lock, sorts outside it.
    pub(crate) fn top(&self, n: usize) -> Vec<(String, u32)> {
        let mut all: Vec<(String, u32)> = self
            .lock()
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// The highest count ÷ limit among the values (`limit_of` gives each
    /// value's limit; 0 = unlimited, left out). One pass under the lock: run
    /// at scrape time, not on the connection path.
    pub(crate) fn busiest_ratio(&self, limit_of: impl Fn(&str) -> u32) -> f64 {
        self.lock()
            .iter()
            .filter_map(|(k, n)| {
                let limit = limit_of(k);
                (limit > 0).then(|| f64::from(*n) / f64::from(limit))
            })
            .fold(0.0, f64::max)
    }

    /// Locks, ignoring poisoning: each critical section leaves the map
    /// consistent at every step.
    fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, u32>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection's share of one key: dropping it gives the share back
/// and removes the entry when it was the last. Owned by the connection's
/// `AdmissionGuard`, so it is released on every path the slot is.
#[derive(Debug)]
#[must_use = "dropping the hold releases it at once"]
pub(crate) struct KeyHold {
    table: Arc<KeyTable>,
    key: Box<str>,
}

impl KeyHold {
    /// The key value held.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// The name of the rule it is held under.
    pub(crate) fn rule(&self) -> &str {
        &self.table.rule
    }
}

impl Drop for KeyHold {
    fn drop(&mut self) {
        self.table.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table() -> Arc<KeyTable> {
        KeyTable::new("t", IntGauge::new("t", "t").expect("metric"))
    }

    #[test]
    fn limits_per_value_and_removes_entries_at_zero() {
        let t = table();
        let a1 = t.reserve("a", 2, 10, false).expect("a1");
        let a2 = t.reserve("a", 2, 10, false).expect("a2");
        assert_eq!(t.reserve("a", 2, 10, false).err(), Some(Full::Key));
        let b = t.reserve("b", 2, 10, false).expect("another value");
        assert_eq!(t.len(), 2);
        assert_eq!(t.tracked.get(), 2);
        drop(a1);
        assert_eq!(t.top(5), vec![("a".into(), 1), ("b".into(), 1)]);
        drop((a2, b));
        assert_eq!(t.len(), 0, "entries disappear at zero");
        assert_eq!(t.tracked.get(), 0);
    }

    #[test]
    fn a_full_table_refuses_new_values_only() {
        let t = table();
        let _a = t.reserve("a", 5, 1, false).expect("a");
        assert_eq!(t.reserve("b", 5, 1, false).err(), Some(Full::Table));
        assert_eq!(
            t.reserve("b", 5, 1, true).err(),
            Some(Full::Table),
            "not even in a dry run"
        );
        let _a2 = t
            .reserve("a", 5, 1, false)
            .expect("a known value still counts");
    }

    #[test]
    fn unlimited_and_dry_run_pass_the_limit() {
        let t = table();
        let held: Vec<_> = (0..50)
            .map(|_| t.reserve("vip", 0, 10, false).expect("0 = unlimited"))
            .collect();
        assert!(!t.is_full("vip", 0));
        assert!(t.is_full("vip", 50));
        let over = t.reserve("vip", 50, 10, true).expect("dry run");
        assert_eq!(t.top(1), vec![("vip".into(), 51)]);
        drop((held, over));
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn busiest_ratio_skips_unlimited_values() {
        let t = table();
        let _h: Vec<_> = ["a", "a", "b", "vip", "vip", "vip"]
            .iter()
            .map(|k| t.reserve(k, 0, 10, false).expect("hold"))
            .collect();
        let limit = |k: &str| if k == "vip" { 0 } else { 4 };
        assert!((t.busiest_ratio(limit) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn concurrent_reservations_never_pass_the_limit() {
        let t = table();
        let peak = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let t = Arc::clone(&t);
                let peak = Arc::clone(&peak);
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        if let Ok(h) = t.reserve("k", 3, 10, false) {
                            let now = t.top(1).first().map_or(0, |e| e.1);
                            peak.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
                            drop(h);
                        }
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().expect("thread");
        }
        assert!(peak.load(std::sync::atomic::Ordering::Relaxed) <= 3);
        assert_eq!(t.len(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(u8),
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6).prop_map(Op::Reserve),
            (0usize..64).prop_map(Op::Release),
        ]
    }

    proptest! {
        /// Against a model: counts never pass the limit, never go below
        /// zero (a release of a held share always finds its entry), the
        /// table never tracks more than `max_keys` values, entries vanish
        /// at zero, and the gauge equals the number of entries.
        #[test]
        fn the_table_matches_a_model(ops in proptest::collection::vec(op(), 1..200)) {
            const LIMIT: u32 = 3;
            const MAX_KEYS: usize = 4;
            let t = table();
            let mut held: Vec<KeyHold> = Vec::new();
            let mut model: HashMap<String, u32> = HashMap::new();
            for op in ops {
                match op {
                    Op::Reserve(k) => {
                        let key = format!("k{k}");
                        let count = model.get(&key).copied().unwrap_or(0);
                        let got = t.reserve(&key, LIMIT, MAX_KEYS, false);
                        let want = if count >= LIMIT {
                            Err(Full::Key)
                        } else if count == 0 && model.len() >= MAX_KEYS {
                            Err(Full::Table)
                        } else {
                            Ok(())
                        };
                        prop_assert_eq!(got.as_ref().map(|_| ()).map_err(|e| *e), want);
                        if let Ok(h) = got {
                            *model.entry(key).or_insert(0) += 1;
                            held.push(h);
                        }
                    }
                    Op::Release(i) if !held.is_empty() => {
                        let h = held.swap_remove(i % held.len());
                        let key = h.key().to_owned();
                        drop(h);
                        let n = model.get_mut(&key).expect("model has the held key");
                        *n -= 1;
                        if *n == 0 {
                            model.remove(&key);
                        }
                    }
                    Op::Release(_) => {}
                }
                let mut got = t.top(usize::MAX);
                got.sort();
                let mut want: Vec<(String, u32)> = model.clone().into_iter().collect();
                want.sort();
                prop_assert_eq!(got, want);
                prop_assert!(t.len() <= MAX_KEYS);
                prop_assert_eq!(t.tracked.get(), i64::try_from(t.len()).unwrap_or(-1));
            }
            drop(held);
            prop_assert_eq!(t.len(), 0);
        }
    }
}
