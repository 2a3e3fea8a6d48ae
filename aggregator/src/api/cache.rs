//! The query cache (the specification's "query caching"): answers of `/api/analytics` over
//! ranges that lie wholly in past days, kept in memory up to `QUERY_CACHE_BYTES`.
//!
//! An answer is kept with the store's [`generation`] of its range: the rows each day in it
//! has taken, and an epoch every other change bumps (a delete, a restore or an archive, a
//! day dropped by retention or created). Both only grow, so an answer whose generation is
//! not the store's current one is stale and never served: an entry that arrives late for a
//! past day, a delete, a restore or retention all invalidate exactly what they touch, and
//! nothing has to find the entries to drop. Past the byte bound, the least recently used
//! answers go.
//!
//! [`generation`]: crate::index::LogIndex::generation

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::Value;

/// Cached answers, by request.
pub struct QueryCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Cached>,
    bytes: usize,
    clock: u64,
}

struct Cached {
    generation: (u64, u64),
    body: Arc<Value>,
    bytes: usize,
    used: u64,
}

impl QueryCache {
    /// A cache of at most `max_bytes` (0 = off).
    pub fn new(max_bytes: usize) -> QueryCache {
        QueryCache {
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The answer kept for `key`, if it was made at `generation`.
    pub fn get(&self, key: &str, generation: (u64, u64)) -> Option<Arc<Value>> {
        if self.max_bytes == 0 {
            return None;
        }
        let mut inner = self.inner.lock();
        inner.clock += 1;
        let clock = inner.clock;
        let hit = match inner.entries.get_mut(key) {
            Some(cached) if cached.generation == generation => {
                cached.used = clock;
                Some(cached.body.clone())
            }
            Some(_) => {
                if let Some(stale) = inner.entries.remove(key) {
                    inner.bytes -= stale.bytes;
                }
                None
            }
            None => None,
        };
        let outcome = if hit.is_some() { "hit" } else { "miss" };
        metrics::counter!("logging_aggregator_query_cache_requests_total", "outcome" => outcome)
            .increment(1);
        metrics::gauge!("logging_aggregator_query_cache_bytes").set(inner.bytes as f64);
        hit
    }

    /// Keeps `body` for `key` at `generation`, making room by dropping the least recently
    /// used; an answer larger than a quarter of the cache is not kept.
    pub fn put(&self, key: String, generation: (u64, u64), body: Arc<Value>) {
        let bytes = key.len() + body.to_string().len() + 128;
        if self.max_bytes == 0 || bytes > self.max_bytes / 4 {
            return;
        }
        let mut inner = self.inner.lock();
        inner.clock += 1;
        let used = inner.clock;
        if let Some(old) = inner.entries.insert(
            key,
            Cached {
                generation,
                body,
                bytes,
                used,
            },
        ) {
            inner.bytes -= old.bytes;
        }
        inner.bytes += bytes;
        while inner.bytes > self.max_bytes {
            let Some(oldest) = inner
                .entries
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(gone) = inner.entries.remove(&oldest) {
                inner.bytes -= gone.bytes;
            }
        }
        metrics::gauge!("logging_aggregator_query_cache_bytes").set(inner.bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_changed_generation_is_a_miss_and_the_bound_holds() {
        let cache = QueryCache::new(4096);
        cache.put("a".into(), (1, 10), Arc::new(json!({"total": 1})));
        assert_eq!(cache.get("a", (1, 10)).unwrap()["total"], 1);
        // A row added to a day in the range, or a delete: stale.
        assert!(cache.get("a", (1, 11)).is_none());
        assert!(
            cache.get("a", (1, 10)).is_none(),
            "a stale answer is dropped"
        );
        // Filling past the bound drops the least recently used.
        let big = |n: usize| Arc::new(json!({"x": "y".repeat(n)}));
        cache.put("b".into(), (0, 0), big(600));
        cache.put("c".into(), (0, 0), big(600));
        assert!(cache.get("b", (0, 0)).is_some());
        for n in 0..10 {
            cache.put(format!("d{n}"), (0, 0), big(600));
        }
        assert!(cache.inner.lock().bytes <= 4096);
        assert!(cache.get("c", (0, 0)).is_none());
        // Too large for it: not kept.
        cache.put("huge".into(), (0, 0), big(2000));
        assert!(cache.get("huge", (0, 0)).is_none());
        // Off.
        let off = QueryCache::new(0);
        off.put("a".into(), (0, 0), Arc::new(json!(1)));
        assert!(off.get("a", (0, 0)).is_none());
    }
}
