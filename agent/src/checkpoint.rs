//! Checkpoints: for every file, the offset up to which the aggregator has acknowledged
//! everything; for every socket input, the sequence number likewise.
//!
//! They only ever advance on an acknowledgement (never on reading), so a crash can only cause
//! re-sending, which deterministic ids make harmless. The file is a versioned JSON document,
//! written tmp → fsync → rename → fsync(dir): after a crash it is the old or the new one,
//! never a torn mix.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use logging_common::crypto::{self, Keyring};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::tail::FileId;

/// One file's checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileCheckpoint {
    pub id: FileId,
    /// Where the file was last seen (to find it again if it was rotated meanwhile).
    pub path: PathBuf,
    pub offset: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "version")]
enum CheckpointFile {
    #[serde(rename = "1")]
    V1 {
        files: Vec<FileCheckpoint>,
        #[serde(default)]
        sockets: BTreeMap<String, u64>,
    },
}

/// A position to record once the batch carrying it is acknowledged.
#[derive(Clone, Debug, PartialEq)]
pub enum Mark {
    File(FileCheckpoint),
    Socket { name: String, sequence: u64 },
}

#[derive(Default)]
struct State {
    files: HashMap<FileId, FileCheckpoint>,
    sockets: BTreeMap<String, u64>,
    dirty: bool,
}

/// The checkpoint store.
pub struct Checkpoints {
    path: PathBuf,
    state: Mutex<State>,
    /// Seals the file (`AGENT_ENCRYPTION_KEY_FILE`).
    keyring: Option<Arc<Keyring>>,
}

impl Checkpoints {
    /// Loads `dir/checkpoints.json` (an unreadable file is reported and treated as empty:
    /// re-sending is safe, skipping is not). A sealed file whose key is missing is an error
    /// naming it: starting over would send every file again.
    pub fn load(dir: &Path, keyring: Option<Arc<Keyring>>) -> std::io::Result<Checkpoints> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("checkpoints.json");
        let mut state = State::default();
        match crypto::read_file(&path, keyring.as_deref()) {
            Ok(bytes) => match serde_json::from_slice::<CheckpointFile>(&bytes) {
                Ok(CheckpointFile::V1 { files, sockets }) => {
                    state.files = files.into_iter().map(|f| (f.id, f)).collect();
                    state.sockets = sockets;
                }
                Err(error) => {
                    tracing::error!(file = %path.display(), %error, "unreadable checkpoints; reading everything again (duplicates are dropped by id)");
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Checkpoints {
            path,
            state: Mutex::new(state),
            keyring,
        })
    }

    pub fn file_offset(&self, id: FileId) -> Option<u64> {
        self.state.lock().files.get(&id).map(|f| f.offset)
    }

    pub fn socket_sequence(&self, name: &str) -> Option<u64> {
        self.state.lock().sockets.get(name).copied()
    }

    pub fn files(&self) -> Vec<FileCheckpoint> {
        self.state.lock().files.values().cloned().collect()
    }

    /// Records acknowledged positions (never moving one backwards).
    pub fn acknowledge(&self, marks: &[Mark]) {
        let mut state = self.state.lock();
        for mark in marks {
            match mark {
                Mark::File(file) => {
                    let entry = state.files.entry(file.id).or_insert_with(|| file.clone());
                    if file.offset >= entry.offset {
                        entry.offset = file.offset;
                        entry.path = file.path.clone();
                    }
                }
                Mark::Socket { name, sequence } => {
                    let entry = state.sockets.entry(name.clone()).or_insert(0);
                    *entry = (*entry).max(*sequence);
                }
            }
        }
        state.dirty = true;
    }

    /// Forgets a file that is finished and gone.
    pub fn forget(&self, id: FileId) {
        let mut state = self.state.lock();
        if state.files.remove(&id).is_some() {
            state.dirty = true;
        }
    }

    /// Writes the store if it changed.
    pub fn persist(&self) -> std::io::Result<()> {
        let document = {
            let mut state = self.state.lock();
            if !state.dirty {
                return Ok(());
            }
            state.dirty = false;
            let mut files: Vec<FileCheckpoint> = state.files.values().cloned().collect();
            files.sort_by(|a, b| a.path.cmp(&b.path));
            CheckpointFile::V1 {
                files,
                sockets: state.sockets.clone(),
            }
        };
        let tmp = self.path.with_extension("json.tmp");
        let written = (|| {
            let mut bytes = serde_json::to_vec(&document).map_err(std::io::Error::other)?;
            bytes.push(b'\n');
            crypto::write_file(&tmp, &bytes, self.keyring.as_deref())?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if written.is_err() {
            self.state.lock().dirty = true;
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> FileId {
        FileId {
            dev: 1,
            ino: n,
            head: 7,
        }
    }

    #[test]
    fn acknowledged_offsets_survive_a_reload_and_never_move_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Checkpoints::load(dir.path(), None).unwrap();
        let mark = |n, offset| {
            Mark::File(FileCheckpoint {
                id: id(n),
                path: PathBuf::from(format!("/f/{n}")),
                offset,
            })
        };
        store.acknowledge(&[
            mark(1, 100),
            mark(2, 50),
            Mark::Socket {
                name: "syslog-udp".into(),
                sequence: 9,
            },
        ]);
        store.acknowledge(&[mark(1, 80)]);
        store.persist().unwrap();
        let reloaded = Checkpoints::load(dir.path(), None).unwrap();
        assert_eq!(reloaded.file_offset(id(1)), Some(100));
        assert_eq!(reloaded.file_offset(id(2)), Some(50));
        assert_eq!(reloaded.socket_sequence("syslog-udp"), Some(9));
        reloaded.forget(id(2));
        reloaded.persist().unwrap();
        assert_eq!(
            Checkpoints::load(dir.path(), None)
                .unwrap()
                .file_offset(id(2)),
            None
        );
        let text = std::fs::read_to_string(dir.path().join("checkpoints.json")).unwrap();
        assert!(text.starts_with("{\"version\":\"1\""), "{text}");
    }

    #[test]
    fn a_corrupt_file_means_starting_over_not_failing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("checkpoints.json"), b"{torn").unwrap();
        let store = Checkpoints::load(dir.path(), None).unwrap();
        assert!(store.files().is_empty());
    }
}
