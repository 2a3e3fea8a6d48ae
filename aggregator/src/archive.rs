//! Archiving day partitions to object storage (`ARCHIVE_URL`), and bringing them back.
//!
//! A day older than `ARCHIVE_AFTER_DAYS` is written to the archive as a bundle:
//!
//! ```text
//! <prefix>/<YYYY-MM-DD>/<from>-<to>.part   each part file exactly as the store keeps it
//!                                          (zstd columns; sealed when encryption is on)
//! <prefix>/<YYYY-MM-DD>/manifest.json      format version, day, entries, bytes, each part's
//!                                          name, size, entries and SHA-256, and a checksum
//!                                          over them; written last
//! ```
//!
//! Parts are self-contained (each carries its own dictionary and footer), so the bundle is
//! the day. Every part is read back and its SHA-256 compared before the manifest is written,
//! the manifest is read back too, and only then does the store drop the parts locally (the
//! indexer does it, between its own writes: see [`crate::index::archived`]). The manifest is
//! the commit point: objects of a day without one are a bundle that never finished (a crash or
//! an unreachable store in the middle), which no listing shows and the next round overwrites.
//! An unreachable store only delays the archive; retention keeps a day until the archive holds
//! it. Large parts go up in multipart uploads; the store client retries (object_store).
//!
//! A restored day is downloaded into the store's directory for that day, checked against the
//! manifest, and opened read-only (see [`crate::index::archived`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use logging_common::Timestamp;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::index::archived::{ArchiveChange, file_name};
use crate::index::{LogIndex, day_name};

const NANOS_PER_DAY: i64 = 86_400_000_000_000;
/// The manifest's format.
const FORMAT_VERSION: u32 = 1;
/// No manifest is larger than this (a day's parts are tens, not millions).
const MAX_MANIFEST: u64 = 16 << 20;
/// Parts larger than this go up in a multipart upload, in pieces of this size.
const UPLOAD_PIECE: usize = 8 << 20;

/// Where the archive is.
#[derive(Clone, Debug, PartialEq)]
pub enum Location {
    /// An S3 bucket and a key prefix (credentials, region and endpoint from `AWS_*`).
    S3 { bucket: String, prefix: String },
    /// A directory.
    File { path: std::path::PathBuf },
}

impl Location {
    pub fn parse(url: &str) -> Result<Location, String> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("{url:?} names no bucket (s3://bucket/prefix)"));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!("{url:?}: a file:// URL needs an absolute path"));
            }
            return Ok(Location::File { path: path.into() });
        }
        Err(format!(
            "{url:?}: expected s3://bucket/prefix or file:///path"
        ))
    }
}

/// One part in a manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ManifestPart {
    pub name: String,
    pub bytes: u64,
    pub entries: u64,
    pub sha256: String,
}

/// What the archive holds of a day.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub day: String,
    pub entries: u64,
    pub bytes: u64,
    pub parts: Vec<ManifestPart>,
    /// SHA-256 over each part's `name:sha256` line.
    pub checksum: String,
    pub archived_at: String,
    /// Whether the parts are sealed (encryption at rest): restoring them needs the key.
    pub encrypted: bool,
}

impl Manifest {
    fn new(day: i64, parts: Vec<ManifestPart>, encrypted: bool) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            day: day_name(day),
            entries: parts.iter().map(|p| p.entries).sum(),
            bytes: parts.iter().map(|p| p.bytes).sum(),
            checksum: checksum(&parts),
            parts,
            archived_at: Timestamp::now().to_rfc3339(),
            encrypted,
        }
    }
}

fn checksum(parts: &[ManifestPart]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(format!("{}:{}\n", part.name, part.sha256).as_bytes());
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes one object: in a multipart upload of `piece`-sized parts when it is larger.
async fn upload(
    store: &Arc<dyn ObjectStore>,
    path: &ObjectPath,
    bytes: Bytes,
    piece: usize,
) -> Result<(), ArchiveError> {
    if bytes.len() <= piece {
        store.put(path, PutPayload::from(bytes)).await?;
        return Ok(());
    }
    let mut writer =
        object_store::buffered::BufWriter::with_capacity(store.clone(), path.clone(), piece);
    let mut rest = bytes;
    while !rest.is_empty() {
        let next = rest.split_to(rest.len().min(piece));
        if let Err(error) = writer.put(next).await {
            let _ = writer.abort().await;
            return Err(error.into());
        }
    }
    if let Err(error) = tokio::io::AsyncWriteExt::shutdown(&mut writer).await {
        let _ = writer.abort().await;
        return Err(error.into());
    }
    Ok(())
}

/// Why an archive step failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the archive store: {0}")]
    Store(#[from] object_store::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Check(String),
    #[error("{0} is not in the archive")]
    NotArchived(String),
    #[error("the store: {0}")]
    Index(String),
}

/// A day the archive holds, as `GET /api/archive` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct ArchivedDay {
    pub day: String,
    pub entries: u64,
    pub bytes: u64,
    pub parts: usize,
    pub archived_at: String,
    pub encrypted: bool,
    /// Brought back for queries.
    pub restored: bool,
}

/// The archive.
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    index: Arc<LogIndex>,
    after_days: u32,
    retention_days: u32,
    interval: Duration,
    encrypted: bool,
    /// What the archive holds, by day.
    days: RwLock<BTreeMap<i64, Manifest>>,
    /// Whether `days` has been read from the archive since the start.
    loaded: std::sync::atomic::AtomicBool,
    /// One round, restore or drop at a time.
    busy: tokio::sync::Mutex<()>,
}

impl Archive {
    /// Connects to the archive of `config` (nothing is read yet: see [`Archive::load`]).
    pub fn new(config: &crate::config::Config, index: Arc<LogIndex>) -> anyhow::Result<Archive> {
        let url = config
            .archive_url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("ARCHIVE_URL is unset"))?;
        let (store, prefix): (Arc<dyn ObjectStore>, String) =
            match Location::parse(url).map_err(anyhow::Error::msg)? {
                Location::S3 { bucket, prefix } => {
                    let endpoint = std::env::var("AWS_ENDPOINT_URL")
                        .or_else(|_| std::env::var("AWS_ENDPOINT"))
                        .unwrap_or_default();
                    let store = object_store::aws::AmazonS3Builder::from_env()
                        .with_bucket_name(bucket)
                        // An S3-compatible server on plain HTTP (a local MinIO or a test server).
                        .with_allow_http(endpoint.starts_with("http://"))
                        .build()?;
                    (Arc::new(store), prefix)
                }
                Location::File { path } => {
                    std::fs::create_dir_all(&path)?;
                    let store = object_store::local::LocalFileSystem::new_with_prefix(&path)?;
                    (Arc::new(store), String::new())
                }
            };
        index.set_archiving(true);
        Ok(Archive {
            store,
            prefix,
            index,
            after_days: config.archive_after_days,
            retention_days: config.archive_retention_days,
            interval: Duration::from_secs(config.archive_interval),
            encrypted: config.log_encryption_enabled,
            days: RwLock::new(BTreeMap::new()),
            loaded: std::sync::atomic::AtomicBool::new(false),
            busy: tokio::sync::Mutex::new(()),
        })
    }

    fn day_path(&self, day: i64, name: &str) -> ObjectPath {
        let day = day_name(day);
        if self.prefix.is_empty() {
            ObjectPath::from(format!("{day}/{name}"))
        } else {
            ObjectPath::from(format!("{}/{day}/{name}", self.prefix))
        }
    }

    /// Reads which days the archive holds (their manifests).
    pub async fn load(&self) -> Result<usize, ArchiveError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let listing = self.store.list_with_delimiter(prefix.as_ref()).await?;
        let mut days = BTreeMap::new();
        for dir in listing.common_prefixes {
            let Some(day) = dir.filename().and_then(crate::index::parse_day_name) else {
                continue;
            };
            match self.read_manifest(day).await {
                Ok(Some(manifest)) => {
                    days.insert(day, manifest);
                }
                // A bundle that never finished: no manifest.
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(day = %day_name(day), %error, "an unreadable archive manifest")
                }
            }
        }
        for day in days.keys() {
            self.index.mark_archived(*day);
        }
        let n = days.len();
        *self.days.write() = days;
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(n)
    }

    /// Reads the archive's days unless that was done since the start (an answer right after
    /// a start does not wait for the first round).
    async fn ensure_loaded(&self) -> Result<(), ArchiveError> {
        if !self.loaded.load(std::sync::atomic::Ordering::Acquire) {
            self.load().await?;
        }
        Ok(())
    }

    async fn read_manifest(&self, day: i64) -> Result<Option<Manifest>, ArchiveError> {
        let bytes = match self.store.get(&self.day_path(day, "manifest.json")).await {
            // A manifest lists a day's parts: anything near this size is not one.
            Ok(found) if found.meta.size > MAX_MANIFEST => {
                return Err(ArchiveError::Check(format!(
                    "the manifest is {} bytes, more than a manifest can be",
                    found.meta.size
                )));
            }
            Ok(found) => found.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| ArchiveError::Check(format!("the manifest does not read: {e}")))?;
        if manifest.format_version != FORMAT_VERSION
            || manifest.checksum != checksum(&manifest.parts)
        {
            return Err(ArchiveError::Check(
                "the manifest's version or checksum is wrong".into(),
            ));
        }
        Ok(Some(manifest))
    }

    /// Archives what is due and expires what the archive no longer keeps, every
    /// `ARCHIVE_INTERVAL`, until `stop` fires.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            self.round().await;
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One round: every local day older than `ARCHIVE_AFTER_DAYS`, then expiry.
    pub async fn round(&self) {
        let _busy = self.busy.lock().await;
        if let Err(error) = self.ensure_loaded().await {
            tracing::warn!(%error, "cannot list the archive; trying again next round");
            return;
        }
        let today = Timestamp::now().as_nanos().div_euclid(NANOS_PER_DAY);
        let oldest_kept = (self.retention_days > 0).then(|| today - i64::from(self.retention_days));
        let mut due: Vec<i64> = self
            .index
            .days()
            .into_iter()
            .filter(|d| *d <= today - i64::from(self.after_days))
            .collect();
        // A day already past ARCHIVE_RETENTION_DAYS would leave the archive as it arrives:
        // it is not archived, and local retention may drop it.
        due.retain(|day| match oldest_kept {
            Some(oldest) if *day < oldest => {
                self.index.mark_archived(*day);
                false
            }
            _ => true,
        });
        for day in due {
            match self.archive_day(day).await {
                Ok(0) => {}
                Ok(parts) => {
                    tracing::info!(day = %day_name(day), parts, "day archived");
                    metrics::counter!("logging_aggregator_archived_days_total").increment(1);
                }
                Err(error) => {
                    metrics::counter!("logging_aggregator_archive_failures_total").increment(1);
                    tracing::error!(day = %day_name(day), %error,
                        "cannot archive the day; it stays here and is tried again next round");
                }
            }
        }
        if let Some(oldest_kept) = oldest_kept {
            let expired: Vec<i64> = self
                .days
                .read()
                .range(..oldest_kept)
                .map(|(d, _)| *d)
                .collect();
            for day in expired {
                if let Err(error) = self.expire(day).await {
                    tracing::error!(day = %day_name(day), %error, "cannot expire an archived day");
                }
            }
        }
    }

    /// Writes the day's parts that the archive does not hold yet, verifies them, records
    /// them in the manifest and has the store drop them. Returns the parts uploaded.
    async fn archive_day(&self, day: i64) -> Result<usize, ArchiveError> {
        let Some(partition) = self.index.partition(day) else {
            return Ok(0);
        };
        // Entries still in memory are written as a part within a minute: next round.
        if partition.memtable_rows() > 0 {
            return Ok(0);
        }
        let local: Vec<_> = partition
            .parts()
            .into_iter()
            .filter(|p| !p.archived)
            .collect();
        if local.is_empty() {
            return Ok(0);
        }
        let held = self.days.read().get(&day).cloned();
        let mut parts: Vec<ManifestPart> = held.map(|m| m.parts).unwrap_or_default();
        let mut uploaded = 0;
        for part in &local {
            let name = file_name(part).to_string();
            if parts.iter().any(|p| p.name == name) {
                continue;
            }
            let bytes = Bytes::from(tokio::fs::read(&part.path).await?);
            let sha256 = hex(&Sha256::digest(&bytes));
            let path = self.day_path(day, &name);
            upload(&self.store, &path, bytes.clone(), UPLOAD_PIECE).await?;
            // Read back: what the archive holds is what the store has.
            let back = self.store.get(&path).await?.bytes().await?;
            if back.len() != bytes.len() || hex(&Sha256::digest(&back)) != sha256 {
                return Err(ArchiveError::Check(format!(
                    "{path} reads back different from what was written"
                )));
            }
            // A merged part covers the parts it was made of: they go from the manifest.
            let range = crate::index::part::parse_file_name(&name);
            parts.retain(
                |p| match (crate::index::part::parse_file_name(&p.name), range) {
                    (Some((from, to)), Some((f, t))) => !(f <= from && to <= t),
                    _ => true,
                },
            );
            parts.push(ManifestPart {
                name,
                bytes: bytes.len() as u64,
                entries: part.rows(),
                sha256,
            });
            uploaded += 1;
        }
        parts.sort_by(|a, b| a.name.cmp(&b.name));
        let manifest = Manifest::new(day, parts, self.encrypted);
        if uploaded > 0 {
            let path = self.day_path(day, "manifest.json");
            let json = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
            self.store
                .put(&path, PutPayload::from(json.clone()))
                .await?;
            let back = self.store.get(&path).await?.bytes().await?;
            if back.as_ref() != json.as_slice() {
                return Err(ArchiveError::Check(format!(
                    "{path} reads back different from what was written"
                )));
            }
        }
        let names: Vec<String> = manifest.parts.iter().map(|p| p.name.clone()).collect();
        self.days.write().insert(day, manifest);
        self.index.mark_archived(day);
        self.change(ArchiveChange::Archived { day, parts: names })
            .await?;
        Ok(uploaded)
    }

    /// Asks the store to apply `change` and waits for it (a minute at most).
    async fn change(&self, change: ArchiveChange) -> Result<usize, ArchiveError> {
        let answer = self.index.request_archive_change(change);
        match tokio::time::timeout(Duration::from_secs(60), answer).await {
            Ok(Ok(Ok(n))) => Ok(n),
            Ok(Ok(Err(error))) => Err(ArchiveError::Index(error.to_string())),
            Ok(Err(_)) | Err(_) => Err(ArchiveError::Index(
                "the indexer did not answer (stopping?)".into(),
            )),
        }
    }

    /// Deletes a day from the archive (`ARCHIVE_RETENTION_DAYS`): the manifest first, so no
    /// half bundle is ever listed.
    async fn expire(&self, day: i64) -> Result<(), ArchiveError> {
        let manifest = self.day_path(day, "manifest.json");
        match self.store.delete(&manifest).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(error) => return Err(error.into()),
        }
        self.days.write().remove(&day);
        let dir = self.day_path(day, "");
        let mut objects = self.store.list(Some(&dir));
        while let Some(object) = objects.next().await {
            match self.store.delete(&object?.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        tracing::info!(day = %day_name(day), "archived day expired (ARCHIVE_RETENTION_DAYS)");
        Ok(())
    }

    /// The days the archive holds.
    pub async fn list(&self) -> Result<Vec<ArchivedDay>, ArchiveError> {
        self.ensure_loaded().await?;
        Ok(self
            .days
            .read()
            .iter()
            .map(|(day, m)| ArchivedDay {
                day: m.day.clone(),
                entries: m.entries,
                bytes: m.bytes,
                parts: m.parts.len(),
                archived_at: m.archived_at.clone(),
                encrypted: m.encrypted,
                restored: self.index.is_restored(*day),
            })
            .collect())
    }

    /// Brings `day` back for queries; returns the parts restored.
    pub async fn restore(&self, day: i64) -> Result<usize, ArchiveError> {
        let _busy = self.busy.lock().await;
        self.ensure_loaded().await?;
        let manifest = self
            .days
            .read()
            .get(&day)
            .cloned()
            .ok_or_else(|| ArchiveError::NotArchived(day_name(day)))?;
        let dir = self.index.day_dir(day);
        tokio::fs::create_dir_all(&dir).await?;
        let mut names = Vec::new();
        for part in &manifest.parts {
            let target = dir.join(&part.name);
            if !tokio::fs::try_exists(&target).await? {
                let path = self.day_path(day, &part.name);
                let found = self.store.get(&path).await?;
                // Checked before it is read: memory is bounded by what the manifest says.
                if found.meta.size != part.bytes {
                    return Err(ArchiveError::Check(format!(
                        "{path} is {} bytes, its manifest says {}",
                        found.meta.size, part.bytes
                    )));
                }
                let bytes = found.bytes().await?;
                if bytes.len() as u64 != part.bytes || hex(&Sha256::digest(&bytes)) != part.sha256 {
                    return Err(ArchiveError::Check(format!(
                        "{path} does not match its manifest"
                    )));
                }
                let tmp = dir.join(format!("{}.tmp", part.name));
                let written = bytes.clone();
                let tmp_for_write = tmp.clone();
                tokio::task::spawn_blocking(move || {
                    logging_common::crypto::write_file(&tmp_for_write, &written, None)
                })
                .await
                .map_err(std::io::Error::other)??;
                tokio::fs::rename(&tmp, &target).await?;
            }
            names.push(part.name.clone());
        }
        crate::wal::sync_dir(&dir)?;
        self.change(ArchiveChange::Restored { day, parts: names })
            .await
    }

    /// Drops the restored copy of `day` again; returns the parts removed.
    pub async fn unrestore(&self, day: i64) -> Result<usize, ArchiveError> {
        let _busy = self.busy.lock().await;
        self.ensure_loaded().await?;
        if !self.days.read().contains_key(&day) {
            return Err(ArchiveError::NotArchived(day_name(day)));
        }
        self.change(ArchiveChange::Unrestored { day }).await
    }

    /// What an answer over `[start, end)` lacks: the archived days in it that are not
    /// restored.
    pub fn caveats(&self, start: Option<i64>, end: Option<i64>) -> Vec<String> {
        let first = start.map_or(i64::MIN, |s| s.div_euclid(NANOS_PER_DAY));
        let last = end.map_or(i64::MAX, |e| (e - 1).div_euclid(NANOS_PER_DAY));
        if first > last {
            return Vec::new();
        }
        self.days
            .read()
            .range(first..=last)
            .filter(|(day, _)| !self.index.is_restored(**day))
            .map(|(_, m)| {
                format!(
                    "{} is archived and not restored: its {} entries are not in this answer \
                     (POST /api/archive/{}/restore brings them back)",
                    m.day, m.entries, m.day
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_read_from_the_url() {
        assert_eq!(
            Location::parse("s3://logs/cluster-a/").unwrap(),
            Location::S3 {
                bucket: "logs".into(),
                prefix: "cluster-a".into()
            }
        );
        assert_eq!(
            Location::parse("file:///var/archive").unwrap(),
            Location::File {
                path: "/var/archive".into()
            }
        );
        assert!(Location::parse("s3://").is_err());
        assert!(Location::parse("gs://b/p").is_err());
    }

    #[tokio::test]
    async fn a_large_object_goes_up_in_pieces_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let bytes: Vec<u8> = (0..(5u32 << 20) + 123).map(|i| (i % 251) as u8).collect();
        let path = ObjectPath::from("2026-11-20/1-2.part");
        // 1 MiB pieces: a multipart upload of six parts.
        upload(&store, &path, Bytes::from(bytes.clone()), 1 << 20)
            .await
            .unwrap();
        let back = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(back.as_ref(), bytes.as_slice());
        // A small one in one request.
        upload(&store, &path, Bytes::from_static(b"small"), 1 << 20)
            .await
            .unwrap();
        let back = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(back.as_ref(), b"small");
    }

    #[test]
    fn a_manifest_checksum_covers_every_part() {
        let part = |name: &str, sha: &str| ManifestPart {
            name: name.into(),
            bytes: 1,
            entries: 1,
            sha256: sha.into(),
        };
        let manifest = Manifest::new(
            20_413,
            vec![part("1-2.part", "aa"), part("2-3.part", "bb")],
            false,
        );
        assert_eq!(manifest.day, "2025-11-21");
        assert_eq!(manifest.entries, 2);
        let mut altered = manifest.parts.clone();
        altered[1].sha256 = "bc".into();
        assert_ne!(checksum(&altered), manifest.checksum);
    }
}
