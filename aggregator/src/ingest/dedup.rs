//! Dedup by id, so a re-sent batch stores nothing twice.
//!
//! Three layers, cheapest first:
//! 1. a Bloom filter of every id ever admitted (about 1.2 bytes an id): a miss proves the id
//!    is new, which is the answer for nearly every entry;
//! 2. the ids that are durable in the WAL but not yet searchable, with their WAL position;
//! 3. for a Bloom hit that is not pending, a lookup in the index (rare: true duplicates and
//!    the filter's ~1% false positives).
//!
//! It runs inside the WAL writer thread ([`Admission`]), so the decision and the write are
//! ordered: two requests carrying the same new id cannot both store it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use logging_common::LogEntry;
use uuid::Uuid;
use xxhash_rust::xxh3::xxh3_128;

use crate::index::LogIndex;
use crate::wal::Admission;

/// A Bloom filter that grows: when the newest layer is full, a layer four times its size is
/// added.
pub struct GrowingBloom {
    layers: Vec<BloomLayer>,
}

struct BloomLayer {
    bits: Vec<u64>,
    mask: u64,
    items: usize,
    capacity: usize,
}

/// Hash functions per id; with 10 bits per id this gives ~1% false positives.
const HASHES: u32 = 7;
const BITS_PER_ITEM: usize = 10;

impl BloomLayer {
    fn new(capacity: usize) -> BloomLayer {
        let bits = (capacity * BITS_PER_ITEM).next_power_of_two().max(1024);
        BloomLayer {
            bits: vec![0; bits / 64],
            mask: bits as u64 - 1,
            items: 0,
            capacity,
        }
    }

    /// Kirsch–Mitzenmacher: k positions from two halves of one 128-bit hash.
    fn positions(&self, id: &Uuid) -> impl Iterator<Item = u64> + use<> {
        let h = xxh3_128(id.as_bytes());
        let (a, b) = (h as u64, (h >> 64) as u64 | 1);
        let mask = self.mask;
        (0..u64::from(HASHES)).map(move |i| a.wrapping_add(i.wrapping_mul(b)) & mask)
    }

    fn contains(&self, id: &Uuid) -> bool {
        self.positions(id)
            .all(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }

    fn insert(&mut self, id: &Uuid) {
        for p in self.positions(id) {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        self.items += 1;
    }
}

impl GrowingBloom {
    pub fn with_capacity(capacity: usize) -> GrowingBloom {
        GrowingBloom {
            layers: vec![BloomLayer::new(capacity.max(1 << 20))],
        }
    }

    pub fn contains(&self, id: &Uuid) -> bool {
        self.layers.iter().any(|l| l.contains(id))
    }

    pub fn insert(&mut self, id: &Uuid) {
        let last = self.layers.len() - 1;
        if self.layers[last].items >= self.layers[last].capacity {
            // Growing fourfold keeps the number of layers, whose false-positive rates add
            // up, small.
            let capacity = self.layers[last].capacity * 4;
            self.layers.push(BloomLayer::new(capacity));
        }
        if let Some(layer) = self.layers.last_mut() {
            layer.insert(id);
        }
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bits.len() * 8).sum()
    }
}

/// The dedup state the WAL writer consults.
pub struct Dedup {
    bloom: GrowingBloom,
    pending: HashMap<Uuid, u64>,
    /// Pending ids in WAL order, to forget them once searchable.
    order: VecDeque<(u64, Uuid)>,
    index: Arc<LogIndex>,
}

impl Dedup {
    /// Builds the filter from every id in the store.
    pub fn new(index: Arc<LogIndex>) -> Result<Dedup, crate::index::IndexError> {
        let mut ids = Vec::new();
        index.for_each_id(|id| ids.push(id))?;
        let mut bloom = GrowingBloom::with_capacity(ids.len() * 2);
        for id in &ids {
            bloom.insert(id);
        }
        tracing::info!(
            ids = ids.len(),
            filter_bytes = bloom.bytes(),
            "dedup filter built"
        );
        Ok(Dedup {
            bloom,
            pending: HashMap::new(),
            order: VecDeque::new(),
            index,
        })
    }

    /// Adds the WAL's entries that the index has not applied yet, as pending.
    pub fn add_unapplied(&mut self, unapplied: &[(Uuid, u64)]) {
        for (id, lsn) in unapplied {
            self.bloom.insert(id);
            self.remember(*id, *lsn);
        }
    }

    fn remember(&mut self, id: Uuid, lsn: u64) {
        self.pending.insert(id, lsn);
        self.order.push_back((lsn, id));
    }

    /// Forgets pending ids that are now searchable (the index answers for them).
    fn expire(&mut self) {
        let searchable = self.index.searchable_lsn();
        while let Some(&(lsn, id)) = self.order.front() {
            if lsn >= searchable {
                break;
            }
            self.order.pop_front();
            if self.pending.get(&id) == Some(&lsn) {
                self.pending.remove(&id);
            }
        }
    }

    /// Whether `id` is already stored; `Some(lsn)` of its record (0 if searchable).
    fn existing(&self, id: &Uuid) -> Option<u64> {
        if !self.bloom.contains(id) {
            return None;
        }
        if let Some(lsn) = self.pending.get(id) {
            return Some(*lsn);
        }
        match self.index.locate(*id) {
            Ok(Some(_)) => Some(0),
            Ok(None) => None,
            Err(error) => {
                // Storing a possible duplicate beats refusing a possibly new entry; the index
                // keeps the first copy's id lookups working either way.
                tracing::warn!(%error, %id, "dedup lookup failed; admitting the entry");
                None
            }
        }
    }

    /// Where `id` is pending, if it is durable but not yet searchable.
    pub fn pending_lsn(&self, id: &Uuid) -> Option<u64> {
        self.pending.get(id).copied()
    }
}

impl Admission for Dedup {
    fn admit(&mut self, entries: &[LogEntry], record_lsn: u64) -> Vec<Option<u64>> {
        self.expire();
        let mut decisions = Vec::with_capacity(entries.len());
        for entry in entries {
            match self.existing(&entry.id) {
                Some(lsn) => decisions.push(Some(lsn)),
                None => {
                    self.bloom.insert(&entry.id);
                    self.remember(entry.id, record_lsn);
                    decisions.push(None);
                }
            }
        }
        decisions
    }

    fn forget(&mut self, ids: &[Uuid]) {
        for id in ids {
            self.pending.remove(id);
        }
    }
}

/// Shares the dedup state between the WAL writer and the API (which asks whether an id is
/// pending, for realtime reads by id).
pub struct SharedDedup(pub Arc<parking_lot::Mutex<Dedup>>);

impl Admission for SharedDedup {
    fn admit(&mut self, entries: &[LogEntry], record_lsn: u64) -> Vec<Option<u64>> {
        self.0.lock().admit(entries, record_lsn)
    }

    fn forget(&mut self, ids: &[Uuid]) {
        self.0.lock().forget(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bloom_filter_has_no_false_negatives_and_few_false_positives() {
        let mut bloom = GrowingBloom::with_capacity(1000);
        let ids: Vec<Uuid> = (0..200_000u128).map(Uuid::from_u128).collect();
        for id in &ids {
            bloom.insert(id);
        }
        assert!(
            ids.iter().all(|id| bloom.contains(id)),
            "grew without forgetting"
        );
        let false_positives = (1_000_000u128..1_100_000)
            .filter(|n| bloom.contains(&Uuid::from_u128(*n)))
            .count();
        assert!(
            false_positives < 3_000,
            "{false_positives} false positives in 100000"
        );
    }
}
