//! Dedup by id, so a re-sent batch stores nothing twice.
//!
//! Three layers, cheapest first:
//! 1. a Bloom filter of every id ever admitted (2.5 bytes an id): a miss proves the id
//!    is new, which is the answer for nearly every entry;
//! 2. the ids that are durable in the WAL but not yet searchable, with their WAL position;
//! 3. for a Bloom hit that is not pending, a lookup in the index (rare: true duplicates and
//!    the filter's ~0.03% false positives).
//!
//! It runs inside the WAL writer thread ([`Admission`]), so the decision and the write are
//! ordered: two requests carrying the same new id cannot both store it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use uuid::Uuid;

use crate::index::{LogIndex, id_hash};
use crate::wal::Admission;

/// A Bloom filter that grows: when the newest layer is full, a layer four times its size is
/// added.
pub struct GrowingBloom {
    layers: Vec<BloomLayer>,
}

/// A blocked Bloom filter: each id sets [`HASHES`] bits in one 64-byte block, so a lookup or
/// an insert touches one cache line (a plain filter's k random bits cost k cache misses per
/// insert, which showed in the WAL writer's profile).
struct BloomLayer {
    blocks: Vec<[u64; 8]>,
    items: usize,
    capacity: usize,
}

/// Bits set per id, all in one 512-bit block.
const HASHES: u32 = 8;
/// With 20 bits an id and 8 bits in one block, about 3 ids in 10,000 that were never
/// inserted look present (measured by the test below); each of those costs a lookup in the
/// store, so the rate is kept low rather than the filter small (2.5 bytes an id).
const BITS_PER_ITEM: usize = 20;

impl BloomLayer {
    fn new(capacity: usize) -> BloomLayer {
        let blocks = (capacity * BITS_PER_ITEM).div_ceil(512).max(16);
        BloomLayer {
            blocks: vec![[0; 8]; blocks],
            items: 0,
            capacity,
        }
    }

    /// The block of `hash` (from its high bits, by multiply-shift) and the bits to set in it:
    /// one bit in each of its eight words, from 6-bit slices of a remix of the hash
    /// (splitmix64).
    fn place(&self, hash: u64) -> (usize, [u64; 8]) {
        let block = ((u128::from(hash) * self.blocks.len() as u128) >> 64) as usize;
        let mut z = hash.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let mut bits = [0u64; 8];
        for (i, word) in bits.iter_mut().enumerate().take(HASHES as usize) {
            *word = 1 << ((z >> (6 * i)) & 63);
        }
        (block, bits)
    }

    fn contains(&self, hash: u64) -> bool {
        let (block, bits) = self.place(hash);
        let words = &self.blocks[block];
        words.iter().zip(&bits).all(|(w, b)| w & b == *b)
    }

    fn insert(&mut self, hash: u64) {
        let (block, bits) = self.place(hash);
        for (w, b) in self.blocks[block].iter_mut().zip(&bits) {
            *w |= b;
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

    /// Whether `hash` (a well-mixed 64-bit hash, such as `id_hash`) may have been inserted.
    pub fn contains(&self, hash: u64) -> bool {
        self.layers.iter().any(|l| l.contains(hash))
    }

    pub fn insert(&mut self, hash: u64) {
        let last = self.layers.len() - 1;
        if self.layers[last].items >= self.layers[last].capacity {
            // Growing fourfold keeps the number of layers, whose false-positive rates add
            // up, small.
            let capacity = self.layers[last].capacity * 4;
            self.layers.push(BloomLayer::new(capacity));
        }
        if let Some(layer) = self.layers.last_mut() {
            layer.insert(hash);
        }
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.blocks.len() * 64).sum()
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
        let mut hashes = Vec::new();
        index.for_each_id_hash(|hash| hashes.push(hash))?;
        let mut bloom = GrowingBloom::with_capacity(hashes.len() * 2);
        for hash in &hashes {
            bloom.insert(*hash);
        }
        tracing::info!(
            ids = hashes.len(),
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
            self.bloom.insert(id_hash(id));
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
        if !self.bloom.contains(id_hash(id)) {
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
    fn admit(&mut self, ids: &[Uuid], record_lsn: u64) -> Vec<Option<u64>> {
        self.expire();
        let mut decisions = Vec::with_capacity(ids.len());
        for id in ids {
            match self.existing(id) {
                Some(lsn) => decisions.push(Some(lsn)),
                None => {
                    self.bloom.insert(id_hash(id));
                    self.remember(*id, record_lsn);
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
    fn admit(&mut self, ids: &[Uuid], record_lsn: u64) -> Vec<Option<u64>> {
        self.0.lock().admit(ids, record_lsn)
    }

    fn forget(&mut self, ids: &[Uuid]) {
        self.0.lock().forget(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bloom_filter_grows_without_false_negatives_and_few_false_positives() {
        let mut bloom = GrowingBloom::with_capacity(1000);
        // More than the first layer holds, so it has to grow.
        let ids: Vec<u64> = (0..1_500_000u128)
            .map(|n| id_hash(&Uuid::from_u128(n)))
            .collect();
        for id in &ids {
            bloom.insert(*id);
        }
        assert_eq!(bloom.layers.len(), 2);
        assert!(
            ids.iter().all(|id| bloom.contains(*id)),
            "grew without forgetting"
        );
        let false_positives = (10_000_000u128..11_000_000)
            .filter(|n| bloom.contains(id_hash(&Uuid::from_u128(*n))))
            .count();
        // Each false positive costs a lookup in the store: keep them below 1 in 1,000 (a
        // plain 10-bit filter had 1 in 100).
        assert!(
            false_positives < 1_000,
            "{false_positives} false positives in 1,000,000"
        );
    }
}
