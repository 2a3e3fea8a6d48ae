//! What the archive (`crate::archive`) changes in the store, and how the store remembers
//! restored parts.
//!
//! The indexer alone writes partitions (flushes, merges, retention), so the archive does not
//! touch them itself: it asks, and the indexer applies each [`ArchiveChange`] between its own
//! writes ([`LogIndex::take_archive_changes`]). A day is dropped locally only when the parts
//! the archive verified are all it holds: an entry that arrived for it meanwhile keeps it
//! (archived with the next round).
//!
//! Restored parts are downloaded into the day's directory under their own names and listed in
//! `restored.json` there, so that they stay marked across restarts: read-only (never merged),
//! their entries answered with `"archived":true`, and removed exactly by
//! `DELETE /api/archive/{day}/restore`.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::Arc;

use super::part::Part;
use super::{IndexError, LogIndex};

/// The file listing a day's restored parts.
pub const RESTORED_FILE: &str = "restored.json";

/// A change the archive asks of the store.
#[derive(Debug)]
pub enum ArchiveChange {
    /// The archive holds these parts of the day (file names): remove them locally, and the
    /// partition with them when nothing else is left in it.
    Archived { day: i64, parts: Vec<String> },
    /// These parts were downloaded into the day's directory: open them, restored.
    Restored { day: i64, parts: Vec<String> },
    /// Remove the day's restored parts again.
    Unrestored { day: i64 },
}

/// A change and where its outcome goes: how many parts it removed or added.
pub struct ChangeRequest {
    pub change: ArchiveChange,
    pub reply: tokio::sync::oneshot::Sender<Result<usize, IndexError>>,
}

impl LogIndex {
    /// Asks the indexer to apply `change`; the answer comes once it has.
    pub fn request_archive_change(
        &self,
        change: ArchiveChange,
    ) -> tokio::sync::oneshot::Receiver<Result<usize, IndexError>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.archive_changes
            .lock()
            .push(ChangeRequest { change, reply });
        answer
    }

    /// The changes asked for since the last call (the indexer's).
    pub fn take_archive_changes(&self) -> Vec<ChangeRequest> {
        std::mem::take(&mut *self.archive_changes.lock())
    }

    /// Turns retention's archive guard on: with archiving on, a day is dropped by retention
    /// only once the archive holds it.
    pub fn set_archiving(&self, on: bool) {
        *self.archived_days.write() = on.then(BTreeSet::new);
    }

    /// Records that the archive holds `day`.
    pub fn mark_archived(&self, day: i64) {
        if let Some(days) = self.archived_days.write().as_mut()
            && days.insert(day)
        {
            // Answers over it now carry a caveat.
            self.changed();
        }
    }

    /// Whether retention may drop `day`: archiving is off, or the archive holds it.
    pub fn may_expire(&self, day: i64) -> bool {
        self.archived_days
            .read()
            .as_ref()
            .is_none_or(|days| days.contains(&day))
    }

    /// Whether `day` has parts restored from the archive.
    pub fn is_restored(&self, day: i64) -> bool {
        self.partition(day)
            .is_some_and(|p| p.parts().iter().any(|part| part.archived))
    }

    /// Removes the named parts of `day` that are not restored ones (the archive holds them),
    /// and the partition when it is then empty. `writing` says whether the indexer holds rows
    /// of the day not yet in a part; then nothing is removed.
    pub fn remove_archived(
        &self,
        day: i64,
        names: &[String],
        writing: bool,
    ) -> Result<usize, IndexError> {
        let Some(partition) = self.partition(day) else {
            return Ok(0);
        };
        if writing || partition.memtable_rows() > 0 {
            return Ok(0);
        }
        let names: HashSet<&str> = names.iter().map(String::as_str).collect();
        let removed = partition.remove_parts(|p| !p.archived && names.contains(file_name(p)))?;
        self.changed();
        if partition.is_empty() {
            self.drop_partition(day)?;
        }
        Ok(removed)
    }

    /// Opens parts downloaded into `day`'s directory as restored ones.
    pub fn add_restored(&self, day: i64, names: &[String]) -> Result<usize, IndexError> {
        // Listed first: a partition opened from the directory now marks them itself.
        let dir = self.day_dir(day);
        let mut listed = read_restored(&dir);
        listed.extend(names.iter().cloned());
        write_restored(&dir, &listed)?;
        let partition = self.partition_for_write(day)?;
        let mut opened = Vec::new();
        for name in names {
            let path = partition.dir.join(name);
            if partition.parts().iter().any(|p| file_name(p) == name) {
                continue;
            }
            let mut part = Part::open(&path, partition.keyring.as_deref())?;
            part.archived = true;
            opened.push(Arc::new(part));
        }
        partition.add_parts(opened);
        self.changed();
        Ok(names.len())
    }

    /// Removes `day`'s restored parts, and the partition when it is then empty.
    pub fn remove_restored(&self, day: i64) -> Result<usize, IndexError> {
        let Some(partition) = self.partition(day) else {
            return Ok(0);
        };
        let removed = partition.remove_parts(|p| p.archived)?;
        self.changed();
        let listed = partition.dir.join(RESTORED_FILE);
        if listed.exists() {
            std::fs::remove_file(&listed)?;
        }
        if partition.is_empty() {
            self.drop_partition(day)?;
        }
        Ok(removed)
    }
}

/// A part's file name.
pub fn file_name(part: &Part) -> &str {
    part.path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
}

/// The names of the restored parts in a day's directory.
pub fn read_restored(dir: &Path) -> BTreeSet<String> {
    std::fs::read(dir.join(RESTORED_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn write_restored(dir: &Path, names: &BTreeSet<String>) -> Result<(), IndexError> {
    let tmp = dir.join(format!("{RESTORED_FILE}.tmp"));
    let bytes = serde_json::to_vec(names).map_err(std::io::Error::other)?;
    logging_common::crypto::write_file(&tmp, &bytes, None)?;
    std::fs::rename(&tmp, dir.join(RESTORED_FILE))?;
    crate::wal::sync_dir(dir)?;
    Ok(())
}
