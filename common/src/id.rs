//! Entry ids: UUIDv7 whose time part is the entry's own timestamp.
//!
//! Two ways to make one (docs/design.md §3):
//! - [`new_log_id`]: random bits, for an entry whose sender gave no id;
//! - [`deterministic_log_id`]: bits derived from where the entry came from (node, file
//!   fingerprint, byte offset, or socket sequence), so an entry re-sent after a crash carries
//!   the same id and every store can drop the duplicate.

use uuid::{Builder, Uuid};
use xxhash_rust::xxh3::Xxh3;

use crate::timestamp::Timestamp;

fn unix_millis(ts: Timestamp) -> u64 {
    u64::try_from(ts.as_millis()).unwrap_or(0)
}

/// A fresh UUIDv7 for an entry written at `ts` (random in its low 74 bits).
pub fn new_log_id(ts: Timestamp) -> Uuid {
    let mut random = [0u8; 10];
    random.copy_from_slice(&Uuid::new_v4().as_bytes()[..10]);
    Builder::from_unix_timestamp_millis(unix_millis(ts), &random).into_uuid()
}

/// The id of the entry that starts at byte `offset` of the source named by `source`.
///
/// `source` should identify the origin uniquely and stably, e.g. `node \0 fingerprint` for a
/// file or `node \0 syslog-udp` for a socket (whose `offset` is then a sequence number). The
/// same inputs always give the same id; different inputs collide with probability ~2^-74.
pub fn deterministic_log_id(ts: Timestamp, source: &[u8], offset: u64) -> Uuid {
    let mut hasher = Xxh3::new();
    hasher.update(source);
    hasher.update(&[0]);
    hasher.update(&offset.to_le_bytes());
    let hash = hasher.digest128().to_le_bytes();
    let mut random = [0u8; 10];
    random.copy_from_slice(&hash[..10]);
    Builder::from_unix_timestamp_millis(unix_millis(ts), &random).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_version_7_and_ordered_by_entry_time() {
        let early = Timestamp::parse("2026-11-27T06:00:00Z").unwrap();
        let late = Timestamp::parse("2026-11-27T06:00:01Z").unwrap();
        let a = new_log_id(early);
        let b = new_log_id(late);
        assert_eq!(a.get_version_num(), 7);
        assert!(a < b);
        assert_ne!(new_log_id(early), new_log_id(early));
        let (secs, _) = a.get_timestamp().unwrap().to_unix();
        assert_eq!(secs as i64, early.as_nanos() / 1_000_000_000);
    }

    #[test]
    fn deterministic_ids_repeat_for_the_same_source_and_offset_only() {
        let ts = Timestamp::parse("2026-11-27T06:00:00.250Z").unwrap();
        let id = deterministic_log_id(ts, b"node-1\0dev:ino:abc", 4096);
        assert_eq!(id, deterministic_log_id(ts, b"node-1\0dev:ino:abc", 4096));
        assert_ne!(id, deterministic_log_id(ts, b"node-1\0dev:ino:abc", 4097));
        assert_ne!(id, deterministic_log_id(ts, b"node-2\0dev:ino:abc", 4096));
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
    }
}
