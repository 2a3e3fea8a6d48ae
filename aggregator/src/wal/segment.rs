//! The on-disk form of the WAL: segment files of framed, checksummed records.
//!
//! A record's LSN is its byte position in the endless log the segments make up together, and
//! a segment file is named by the LSN of its first byte (`00000000000000004096.wal`). So the
//! distance between two LSNs is exactly the bytes between them, which is what lag is measured
//! in, and a reader positions itself by opening one file and seeking.
//!
//! Record layout (little endian):
//!
//! ```text
//! payload_len u32 | entry_count u32 | lsn u64 | crc32 u32 | payload (NDJSON, one entry a line)
//! ```
//!
//! The CRC covers the first 16 header bytes and the payload, so a torn write (a crash in the
//! middle of a group commit, before anything in it was acknowledged) is recognised and cut off
//! when the WAL is opened.
//!
//! With encryption at rest the payload is sealed ([`logging_common::crypto`]: its own salt,
//! the key's id) and the header, which holds no content, stays as it is; lengths and LSNs
//! count the sealed bytes. A payload that passes its CRC but cannot be opened (a missing or
//! wrong key) is an error naming the segment, never a torn tail to cut off.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use logging_common::crypto::{self, Keyring};

pub const HEADER_LEN: usize = 20;
/// No record is larger than this; a header claiming more is corrupt.
pub const MAX_PAYLOAD: usize = 1 << 30;

/// Appends one encoded record to `out`.
pub fn encode_record(out: &mut Vec<u8>, lsn: u64, count: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start..start + 16]);
    crc.update(payload);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// The encoded size of a record with a payload of `payload_len` bytes.
pub fn record_len(payload_len: usize) -> u64 {
    (HEADER_LEN + payload_len) as u64
}

/// A record read back from disk.
#[derive(Debug)]
pub struct RawRecord {
    pub lsn: u64,
    pub count: u32,
    /// The entries, opened when they were sealed.
    pub payload: Vec<u8>,
    /// The payload's length on disk.
    pub stored_len: usize,
}

impl RawRecord {
    pub fn end(&self) -> u64 {
        self.lsn + record_len(self.stored_len)
    }
}

/// What reading the next record found.
#[derive(Debug)]
pub enum ReadOutcome {
    Record(RawRecord),
    /// Clean end of the file.
    End,
    /// Bytes that do not form a valid record: a torn tail, or corruption.
    Invalid {
        at: u64,
        reason: &'static str,
    },
}

pub fn segment_file_name(start: u64) -> String {
    format!("{start:020}.wal")
}

/// The segments in `dir`, sorted by their first LSN.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".wal") else {
            continue;
        };
        if let Ok(start) = stem.parse::<u64>() {
            segments.push((start, entry.path()));
        }
    }
    segments.sort_by_key(|(start, _)| *start);
    Ok(segments)
}

/// Reads one segment's records in order.
pub struct SegmentReader {
    file: BufReader<File>,
    path: PathBuf,
    start: u64,
    pos: u64,
    keyring: Option<Arc<Keyring>>,
}

impl SegmentReader {
    /// Opens the segment that begins at `start`, positioned at `lsn`.
    pub fn open(
        path: &Path,
        start: u64,
        lsn: u64,
        keyring: Option<Arc<Keyring>>,
    ) -> io::Result<SegmentReader> {
        let mut file = File::open(path)?;
        let offset = lsn.saturating_sub(start);
        file.seek(SeekFrom::Start(offset))?;
        Ok(SegmentReader {
            file: BufReader::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            start,
            pos: offset,
            keyring,
        })
    }

    /// The LSN of the next byte to read.
    pub fn lsn(&self) -> u64 {
        self.start + self.pos
    }

    pub fn next_record(&mut self) -> io::Result<ReadOutcome> {
        let at = self.lsn();
        let mut header = [0u8; HEADER_LEN];
        match read_full(&mut self.file, &mut header)? {
            0 => return Ok(ReadOutcome::End),
            n if n < HEADER_LEN => {
                return Ok(ReadOutcome::Invalid {
                    at,
                    reason: "truncated header",
                });
            }
            _ => {}
        }
        let len = le_u32(&header[0..4]) as usize;
        let count = le_u32(&header[4..8]);
        let lsn = le_u64(&header[8..16]);
        let crc = le_u32(&header[16..20]);
        if len > MAX_PAYLOAD {
            return Ok(ReadOutcome::Invalid {
                at,
                reason: "impossible length",
            });
        }
        if lsn != at {
            return Ok(ReadOutcome::Invalid {
                at,
                reason: "record is not at its own position",
            });
        }
        let mut payload = vec![0u8; len];
        if read_full(&mut self.file, &mut payload)? < len {
            return Ok(ReadOutcome::Invalid {
                at,
                reason: "truncated payload",
            });
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header[..16]);
        hasher.update(&payload);
        if hasher.finalize() != crc {
            return Ok(ReadOutcome::Invalid {
                at,
                reason: "checksum mismatch",
            });
        }
        let payload = if crypto::is_sealed(&payload) {
            crypto::open(self.keyring.as_deref(), &payload)
                .map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("WAL segment {} at LSN {lsn}: {e}", self.path.display()),
                    )
                })?
                .into_owned()
        } else {
            payload
        };
        self.pos += record_len(len);
        Ok(ReadOutcome::Record(RawRecord {
            lsn,
            count,
            payload,
            stored_len: len,
        }))
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Makes a rename or a new file in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The segment being written: append-only, and durable only up to its last [`sync`].
///
/// Every durability point of the WAL goes through [`SegmentFile::sync`], so tests can see
/// what a power loss would keep ([`durable`]): a test that acknowledges entries, throws away
/// everything written after each file's last sync and reopens, fails if acknowledging ever
/// stops waiting for the sync.
///
/// [`sync`]: SegmentFile::sync
pub struct SegmentFile {
    file: File,
    #[cfg_attr(not(test), allow(dead_code))]
    path: PathBuf,
}

impl SegmentFile {
    /// Opens an existing segment to append to it; what it holds now is durable (it is what
    /// the last run left on disk).
    pub fn open(path: &Path) -> io::Result<SegmentFile> {
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        #[cfg(test)]
        durable::record(path, file.metadata()?.len());
        Ok(SegmentFile {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Creates a new, empty segment.
    pub fn create(path: &Path) -> io::Result<SegmentFile> {
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(path)?;
        #[cfg(test)]
        durable::record(path, 0);
        Ok(SegmentFile {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)
    }

    /// `fdatasync`: everything appended so far (`len` bytes in all) is durable.
    pub fn sync(&mut self, len: u64) -> io::Result<()> {
        self.file.sync_data()?;
        #[cfg(test)]
        durable::record(&self.path, len);
        #[cfg(not(test))]
        let _ = len;
        Ok(())
    }

    /// Cuts the file back to `len` bytes (undoing a failed append).
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

/// What a power loss would keep of each segment: its length at its last sync.
#[cfg(test)]
pub mod durable {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static SYNCED: Mutex<Option<HashMap<PathBuf, u64>>> = Mutex::new(None);

    pub fn record(path: &Path, len: u64) {
        let mut synced = SYNCED.lock().unwrap();
        synced
            .get_or_insert_with(HashMap::new)
            .insert(path.to_path_buf(), len);
    }

    /// A power loss: every segment in `dir` loses what was written after its last sync.
    pub fn lose_unsynced(dir: &Path) {
        let synced = SYNCED.lock().unwrap();
        let synced = synced.as_ref().cloned().unwrap_or_default();
        for (_, path) in super::list_segments(dir).unwrap() {
            let kept = synced.get(&path).copied().unwrap_or(0);
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            if file.metadata().unwrap().len() > kept {
                file.set_len(kept).unwrap();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn records_round_trip_and_a_torn_tail_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_file_name(100));
        let mut bytes = Vec::new();
        encode_record(&mut bytes, 100, 2, b"{\"a\":1}\n{\"b\":2}");
        let second = 100 + bytes.len() as u64;
        encode_record(&mut bytes, second, 1, b"{\"c\":3}");
        // A third record cut short, as a crash in the middle of a write leaves it.
        let mut torn = Vec::new();
        encode_record(&mut torn, second + record_len(7), 1, b"{\"d\":4}");
        bytes.extend_from_slice(&torn[..torn.len() - 3]);
        File::create(&path).unwrap().write_all(&bytes).unwrap();

        let mut reader = SegmentReader::open(&path, 100, 100, None).unwrap();
        let ReadOutcome::Record(a) = reader.next_record().unwrap() else {
            panic!()
        };
        assert_eq!((a.lsn, a.count), (100, 2));
        assert_eq!(a.end(), second);
        let ReadOutcome::Record(b) = reader.next_record().unwrap() else {
            panic!()
        };
        assert_eq!(b.payload, b"{\"c\":3}");
        assert!(matches!(
            reader.next_record().unwrap(),
            ReadOutcome::Invalid {
                reason: "truncated payload",
                ..
            }
        ));

        // Seeking straight to the second record works: LSNs are byte positions.
        let mut reader = SegmentReader::open(&path, 100, second, None).unwrap();
        let ReadOutcome::Record(b) = reader.next_record().unwrap() else {
            panic!()
        };
        assert_eq!(b.lsn, second);
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_file_name(0));
        let mut bytes = Vec::new();
        encode_record(&mut bytes, 0, 1, b"{\"a\":1}");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        File::create(&path).unwrap().write_all(&bytes).unwrap();
        let mut reader = SegmentReader::open(&path, 0, 0, None).unwrap();
        assert!(matches!(
            reader.next_record().unwrap(),
            ReadOutcome::Invalid {
                reason: "checksum mismatch",
                ..
            }
        ));
    }
}
