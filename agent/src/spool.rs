//! The socket spool: socket input cannot be paused, so every message received on a socket is
//! first appended to a spool file in `AGENT_DATA_DIR/spool`, and the spool is tailed like any
//! other file. While the aggregator is reachable the spool is read as fast as it is written;
//! while it is not, the spool grows on disk (not in memory) up to `AGENT_SPOOL_MAX_BYTES`,
//! past which the oldest spool file is dropped and counted.
//!
//! Spool files hold one entry-shaped JSON object a line, so the file pipeline's parser lifts
//! their fields, and deterministic ids come from the spool file and offset as for any file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use logging_common::crypto::{self, Keyring};
use parking_lot::Mutex;

use crate::checkpoint::Checkpoints;
use crate::tail::{FileId, FileKey, head_hash};

/// The plaintext of a spool line: a sealed one (sealed text, so the spool stays a file of
/// lines the tailer reads like any other) opened, any other as it is (written before
/// encryption was turned on).
pub fn open_line<'a>(
    keyring: Option<&Keyring>,
    line: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, String> {
    let text = line.strip_suffix(b"\n").unwrap_or(line);
    crypto::open_text(keyring, text).map_err(|e| format!("a spool line: {e}"))
}

/// A spool file is closed and a new one started past this size.
const FILE_BYTES: u64 = 16 * 1024 * 1024;

struct Current {
    file: File,
    path: PathBuf,
    bytes: u64,
}

/// Appends socket messages to the spool.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    current: Mutex<Option<Current>>,
    checkpoints: Arc<Checkpoints>,
    /// Seals each line (`AGENT_ENCRYPTION_KEY_FILE`); see [`open_line`].
    keyring: Option<Arc<Keyring>>,
}

impl Spool {
    pub fn new(
        dir: &Path,
        max_bytes: u64,
        checkpoints: Arc<Checkpoints>,
        keyring: Option<Arc<Keyring>>,
    ) -> std::io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            current: Mutex::new(None),
            checkpoints,
            keyring,
        })
    }

    /// The glob the tailer follows.
    pub fn pattern(dir: &Path) -> String {
        format!("{}/*.ndjson", dir.display())
    }

    fn files(&self) -> Vec<(PathBuf, u64)> {
        let mut files: Vec<(PathBuf, u64)> = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".ndjson"))
                    .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
                    .collect()
            })
            .unwrap_or_default();
        // Names sort by creation time (nanosecond timestamps).
        files.sort();
        files
    }

    /// Appends one line (a JSON object, without newline).
    pub fn append(&self, line: &[u8]) -> std::io::Result<()> {
        let mut current = self.current.lock();
        if current.as_ref().is_none_or(|c| c.bytes >= FILE_BYTES) {
            let path = self.dir.join(format!(
                "{:020}.ndjson",
                logging_common::Timestamp::now().as_nanos()
            ));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            *current = Some(Current {
                file,
                path,
                bytes: 0,
            });
        }
        let Some(current) = current.as_mut() else {
            return Ok(());
        };
        let mut record = Vec::with_capacity(line.len() + 1);
        match &self.keyring {
            Some(keyring) => {
                record.extend_from_slice(keyring.seal_text(line).as_bytes());
            }
            None => record.extend_from_slice(line),
        }
        record.push(b'\n');
        current.file.write_all(&record)?;
        current.bytes += record.len() as u64;
        metrics::counter!("logging_agent_spool_written_bytes_total").increment(record.len() as u64);
        Ok(())
    }

    /// Deletes spool files that were sent and acknowledged, then, if the spool is still over
    /// its cap, the oldest ones whatever their state (counted as dropped).
    pub fn trim(&self) {
        let current = self.current.lock().as_ref().map(|c| c.path.clone());
        let mut files = self.files();
        files.retain(|(path, size)| {
            if Some(path) == current.as_ref() || !self.acknowledged(path, *size) {
                return true;
            }
            let _ = std::fs::remove_file(path);
            false
        });
        let mut total: u64 = files.iter().map(|(_, size)| size).sum();
        metrics::gauge!("logging_agent_spool_bytes").set(total as f64);
        for (path, size) in files {
            if total <= self.max_bytes || Some(&path) == current.as_ref() {
                break;
            }
            tracing::warn!(file = %path.display(), bytes = size, "the socket spool is full; dropping its oldest file");
            metrics::counter!("logging_agent_dropped_bytes_total", "reason" => "spool_full")
                .increment(size);
            let _ = std::fs::remove_file(&path);
            total -= size;
        }
    }

    fn acknowledged(&self, path: &Path, size: u64) -> bool {
        let Ok(file) = File::open(path) else {
            return false;
        };
        let Ok(metadata) = file.metadata() else {
            return false;
        };
        let key = FileKey::of(&metadata);
        let Ok(Some(head)) = head_hash(&file) else {
            return false;
        };
        let id = FileId {
            dev: key.dev,
            ino: key.ino,
            head,
        };
        self.checkpoints
            .file_offset(id)
            .is_some_and(|acked| acked >= size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_files_go_and_a_full_spool_drops_its_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints = Arc::new(Checkpoints::load(&dir.path().join("state"), None).unwrap());
        let spool = Spool::new(&dir.path().join("spool"), 100, checkpoints.clone(), None).unwrap();
        spool.append(br#"{"msg":"one"}"#).unwrap();
        // Force a second file.
        spool.current.lock().as_mut().unwrap().bytes = FILE_BYTES;
        std::thread::sleep(std::time::Duration::from_millis(2));
        spool.append(br#"{"msg":"two"}"#).unwrap();
        assert_eq!(spool.files().len(), 2);
        // Nothing acknowledged and under the cap: both stay.
        spool.trim();
        assert_eq!(spool.files().len(), 2);
        // The first acknowledged: it goes; the current one always stays.
        let (first, size) = spool.files()[0].clone();
        let file = File::open(&first).unwrap();
        let key = FileKey::of(&file.metadata().unwrap());
        let id = FileId {
            dev: key.dev,
            ino: key.ino,
            head: head_hash(&file).unwrap().unwrap(),
        };
        checkpoints.acknowledge(&[crate::checkpoint::Mark::File(
            crate::checkpoint::FileCheckpoint {
                id,
                path: first.clone(),
                offset: size,
            },
        )]);
        spool.trim();
        assert_eq!(spool.files().len(), 1);
        // Over the cap: the oldest non-current file is dropped even unacknowledged.
        spool.current.lock().as_mut().unwrap().bytes = FILE_BYTES;
        std::thread::sleep(std::time::Duration::from_millis(2));
        spool.append(&[b'x'; 150]).unwrap();
        spool.trim();
        let left = spool.files();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].1, 151);
    }
}
