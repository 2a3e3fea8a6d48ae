//! A part: the blocks one flush of a day partition wrote, in one immutable file.
//!
//! ```text
//! "LOGPART1"                      magic
//! column frames of block 0 …      zstd frames (or raw, with compression off), as the footer says
//! column frames of block 1 …
//! template dictionary             the templates of every block, each once (a block's template
//!                                 column numbers rows into it)
//! footer                          zstd of JSON: format version, day, WAL range, the
//!                                 dictionary's frame, each block's summary and the offset,
//!                                 length and CRC32 of each frame
//! footer length (u32 LE), footer CRC32 (u32 LE), "LOGPART1"
//! ```
//!
//! The dictionary is per part because the blocks of a part share nearly all their templates
//! (a service's messages times the optional fields it sets give thousands of templates, the
//! same in every block): a query reads and prepares them once per part, not once per block,
//! and keeps them prepared for the next query (see [`Part::templates`]).
//!
//! A part is written to a temporary name, `fsync`ed, renamed to `<from>-<to>.part` (the WAL
//! range `[from, to)` it covers) and the directory `fsync`ed: it exists whole or not at all.
//! Every frame's CRC is checked when it is read, and the footer's when the part is opened, so
//! a damaged file is refused by name rather than misread. A merge writes the part covering
//! its inputs' union before it deletes them; a part found inside another's range on opening
//! is what a crash left of a merge, and goes.
//!
//! With encryption at rest the whole file above is sealed in 4 KiB chunks
//! ([`logging_common::crypto`]); offsets in the footer are the plaintext's, and a read
//! decrypts only the chunks it covers.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use logging_common::crypto::{AtRestFile, AtRestWriter, Keyring};
use parking_lot::Mutex;

use serde::{Deserialize, Serialize};

use super::block::{
    self, Block, BlockCounts, BlockError, NumberCounts, Summary, VarColumn, decode_deltas,
    decode_ids, decode_strings, decode_varints, encode_deltas, encode_ids, encode_strings,
    encode_varints,
};
use super::bloom::Bloom;
use super::scan::TemplateSet;

const MAGIC: &[u8; 8] = b"LOGPART1";
/// The footer's format; a part of a later format is refused, naming its file.
/// Format 1 kept a template dictionary in every block.
pub const FORMAT_VERSION: u32 = 2;
/// The frames of a block, in order; the variable columns follow.
const FIXED_FRAMES: usize = 7;
const TS: usize = 0;
const SEQ: usize = 1;
const IDS: usize = 2;
const LEVELS: usize = 3;
const SERVICE: usize = 4;
const TEMPLATE: usize = 5;
const BLOOM: usize = 6;

/// Where one frame is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub offset: u64,
    pub len: u32,
    /// Its length decompressed (equal to `len` when stored raw).
    pub raw_len: u32,
    pub crc: u32,
    /// zstd-compressed.
    pub zstd: bool,
}

/// A block as the footer describes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlockEntry {
    pub summary: Summary,
    /// The fixed frames, then one per variable column (in `summary.paths` order).
    pub frames: Vec<Frame>,
    /// Rows per template and per (service, level) ([`BlockCounts`]). Absent from parts
    /// written before it was added: their counts are made from the columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<Frame>,
    /// The value counts of its numeric paths ([`block::count_numbers`]), apart from the
    /// counts so that a count by template does not decode them. Absent from parts written
    /// before: their counts frame holds them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numbers: Option<Frame>,
}

#[derive(Serialize, Deserialize)]
struct Footer {
    version: u32,
    day: i64,
    lsn_from: u64,
    lsn_to: u64,
    /// The template dictionary.
    templates: Frame,
    blocks: Vec<BlockEntry>,
}

/// The zstd level parts are written with.
pub const ZSTD_LEVEL: i32 = 3;

/// How parts are written.
#[derive(Clone, Copy, Debug)]
pub struct WriteOptions {
    /// zstd level; 0 stores frames uncompressed (`LOG_COMPRESSION_ENABLED=false`).
    pub level: i32,
    /// Build Bloom filters (`LOG_INDEXING_ENABLED`).
    pub bloom: bool,
    /// Threads encoding blocks (`LOG_PROCESSING_WORKERS`).
    pub threads: usize,
}

/// The chunk size of sealed parts (encryption at rest): small, because a Bloom probe reads 32
/// bytes and decrypts the whole chunk around them; the tags cost 0.4% of the part.
const SEALED_CHUNK: usize = 4096;

/// An open part.
pub struct Part {
    pub path: PathBuf,
    /// Sealed or plaintext; offsets below are the plaintext's.
    file: AtRestFile,
    pub day: i64,
    pub lsn_from: u64,
    pub lsn_to: u64,
    pub blocks: Vec<BlockEntry>,
    pub bytes: u64,
    /// Unique among the parts this process opened.
    pub id: u64,
    /// Brought back from the archive (`POST /api/archive/{day}/restore`): read-only, never
    /// merged, its entries answered with `"archived":true`.
    pub archived: bool,
    templates_frame: Frame,
    /// The dictionary, prepared, while the cache keeps it; and while a reader holds it.
    templates: Mutex<Option<Arc<TemplateSet>>>,
    in_use: Mutex<std::sync::Weak<TemplateSet>>,
    /// Per block: whether its Bloom filter has been read whole and passed its checksum.
    bloom_checked: Vec<std::sync::atomic::AtomicBool>,
}

/// The prepared dictionaries kept (part, when last used, bytes), and their bytes.
struct TemplateCache {
    parts: Vec<(u64, std::sync::Weak<Part>, std::time::Instant, usize)>,
    bytes: usize,
}

/// What prepared template dictionaries may take in memory, over all parts. A part's takes
/// some MB (thousands of templates); this keeps those of the parts recent queries touched.
/// A dictionary is kept only while there is room, rather than evicting the least recently
/// used: a query walks the parts in the same order every time, and a least-recently-used
/// cache smaller than that walk would miss on every part.
pub const TEMPLATE_CACHE_BYTES: usize = 192 << 20;

/// A dictionary not used for this long leaves the cache.
const TEMPLATE_CACHE_IDLE: std::time::Duration = std::time::Duration::from_secs(300);

static TEMPLATE_CACHE: Mutex<TemplateCache> = Mutex::new(TemplateCache {
    parts: Vec::new(),
    bytes: 0,
});

static NEXT_PART_ID: AtomicU64 = AtomicU64::new(1);

/// A part's file name for the WAL range it covers.
pub fn file_name(from: u64, to: u64) -> String {
    format!("{from:020}-{to:020}.part")
}

/// The WAL range a part's file name says it covers.
pub fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".part")?;
    let (from, to) = stem.split_once('-')?;
    Some((from.parse().ok()?, to.parse().ok()?))
}

fn corrupt(path: &Path, what: impl Into<String>) -> BlockError {
    BlockError::Corrupt {
        file: path.display().to_string(),
        what: what.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlockError + '_ {
    move |source| BlockError::Io {
        file: path.display().to_string(),
        source,
    }
}

/// Writes `blocks` as the part of `day` covering WAL positions `[from, to)` in `dir`.
pub fn write(
    dir: &Path,
    day: i64,
    from: u64,
    to: u64,
    blocks: &[&Block],
    options: WriteOptions,
    keyring: Option<&Keyring>,
) -> Result<PathBuf, BlockError> {
    let path = dir.join(file_name(from, to));
    let tmp = dir.join(format!("{}.tmp", file_name(from, to)));
    // One dictionary for the part: each block's template numbers become the dictionary's.
    let mut dictionary: HashMap<&[u8], u32, foldhash::fast::RandomState> = HashMap::default();
    let mut texts: Vec<&[u8]> = Vec::new();
    let numbers: Vec<Vec<u32>> = blocks
        .iter()
        .map(|b| {
            b.templates
                .iter()
                .map(|t| {
                    *dictionary.entry(&t[..]).or_insert_with(|| {
                        texts.push(&t[..]);
                        texts.len() as u32 - 1
                    })
                })
                .collect()
        })
        .collect();
    let jobs: Vec<(&Block, &[u32])> = blocks
        .iter()
        .copied()
        .zip(numbers.iter().map(|n| &n[..]))
        .collect();
    // Encoding is per block and independent: done on all cores.
    let threads = options.threads.max(1);
    let encoded: Vec<Encoded> = if jobs.len() > 1 && threads > 1 {
        let per = jobs.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = jobs
                .chunks(per)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .map(|(b, numbers)| encode_block(b, numbers, options))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        })
    } else {
        jobs.iter()
            .map(|(b, numbers)| encode_block(b, numbers, options))
            .collect()
    };
    let file = File::create(&tmp).map_err(io(&tmp))?;
    let mut file = AtRestWriter::new(file, keyring, SEALED_CHUNK);
    let mut offset = MAGIC.len() as u64;
    let mut out = Vec::with_capacity(1 << 20);
    out.extend_from_slice(MAGIC);
    let mut entries = Vec::with_capacity(encoded.len());
    for (summary, frames, zstd, raw_lens) in encoded {
        let mut refs = Vec::with_capacity(frames.len());
        for ((frame, zstd), raw_len) in frames.iter().zip(zstd).zip(raw_lens) {
            refs.push(Frame {
                offset,
                len: frame.len() as u32,
                raw_len,
                crc: crc32fast::hash(frame),
                zstd,
            });
            offset += frame.len() as u64;
            out.extend_from_slice(frame);
            if out.len() >= 8 << 20 {
                file.write_all(&out).map_err(io(&tmp))?;
                out.clear();
            }
        }
        // The last two frames are the counts and the numbers.
        let numbers = refs.pop();
        let counts = refs.pop();
        entries.push(BlockEntry {
            summary,
            frames: refs,
            counts,
            numbers,
        });
    }
    let raw = encode_strings(texts.iter().copied());
    let (frame, zstd) = compress(raw.clone(), options.level);
    let templates = Frame {
        offset,
        len: frame.len() as u32,
        raw_len: raw.len() as u32,
        crc: crc32fast::hash(&frame),
        zstd,
    };
    out.extend_from_slice(&frame);
    let footer = Footer {
        version: FORMAT_VERSION,
        day,
        lsn_from: from,
        lsn_to: to,
        templates,
        blocks: entries,
    };
    let json = serde_json::to_vec(&footer).map_err(|e| corrupt(&tmp, e.to_string()))?;
    let footer = zstd::bulk::compress(&json, 3).map_err(io(&tmp))?;
    out.extend_from_slice(&footer);
    out.extend_from_slice(&(footer.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&footer).to_le_bytes());
    out.extend_from_slice(MAGIC);
    file.write_all(&out).map_err(io(&tmp))?;
    let file = file.finish().map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    crate::wal::sync_dir(dir).map_err(io(dir))?;
    Ok(path)
}

/// A block encoded: its summary, its frames, whether each is zstd, their raw lengths.
type Encoded = (Summary, Vec<Vec<u8>>, Vec<bool>, Vec<u32>);

/// `bytes` zstd-compressed at `level` when that makes them smaller, and whether it did.
fn compress(bytes: Vec<u8>, level: i32) -> (Vec<u8>, bool) {
    if level == 0 || bytes.len() < 64 {
        return (bytes, false);
    }
    match zstd::bulk::compress(&bytes, level) {
        Ok(c) if c.len() < bytes.len() => (c, true),
        _ => (bytes, false),
    }
}

/// A block's frames; `numbers` turns its template numbers into the part dictionary's.
fn encode_block(block: &Block, numbers: &[u32], options: WriteOptions) -> Encoded {
    let mut raw: Vec<Vec<u8>> = Vec::with_capacity(FIXED_FRAMES + block.columns.len());
    raw.push(encode_deltas(block.ts.iter().copied()));
    raw.push(encode_deltas(block.seq.iter().map(|s| *s as i64)));
    raw.push(encode_ids(&block.ids, &block.ts));
    raw.push(block.levels.clone());
    raw.push(encode_varints(block.service.iter().copied()));
    raw.push(encode_varints(
        block.template.iter().map(|t| numbers[*t as usize]),
    ));
    raw.push(if options.bloom {
        block::bloom_of(block).to_bytes()
    } else {
        Vec::new()
    });
    for column in &block.columns {
        raw.push(column.data.clone());
    }
    let counts = BlockCounts::of(
        block.template.iter().map(|t| numbers[*t as usize]),
        &block.service,
        &block.levels,
    );
    raw.push(counts.to_bytes());
    let mut values = Vec::new();
    block::put_numbers(&block::count_numbers(block), &mut values);
    raw.push(values);
    let raw_lens = raw.iter().map(|r| r.len() as u32).collect();
    let mut zstd = Vec::with_capacity(raw.len());
    let frames = raw
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| {
            // Bloom filters are random: compressing them costs time and gains nothing.
            let level = if i == BLOOM { 0 } else { options.level };
            let (bytes, compressed) = compress(bytes, level);
            zstd.push(compressed);
            bytes
        })
        .collect();
    (block.summary(), frames, zstd, raw_lens)
}

impl Part {
    /// Opens a part, checking its magic, footer CRC and format version.
    pub fn open(path: &Path, keyring: Option<&Keyring>) -> Result<Part, BlockError> {
        let file = File::open(path).map_err(io(path))?;
        let file = AtRestFile::open(file, keyring).map_err(io(path))?;
        let bytes = file.len();
        let tail_len = 8 + 4 + 4;
        if bytes < (MAGIC.len() + tail_len) as u64 {
            return Err(corrupt(path, "shorter than a part can be"));
        }
        let mut tail = [0u8; 16];
        file.read_exact_at(&mut tail, bytes - tail_len as u64)
            .map_err(io(path))?;
        if &tail[8..] != MAGIC {
            return Err(corrupt(path, "its end is not a part's"));
        }
        let footer_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
        let footer_crc = u32::from_le_bytes([tail[4], tail[5], tail[6], tail[7]]);
        let footer_at = (bytes - tail_len as u64)
            .checked_sub(footer_len)
            .filter(|at| *at >= MAGIC.len() as u64)
            .ok_or_else(|| corrupt(path, "its footer length is impossible"))?;
        let mut footer = vec![0u8; footer_len as usize];
        file.read_exact_at(&mut footer, footer_at)
            .map_err(io(path))?;
        if crc32fast::hash(&footer) != footer_crc {
            return Err(corrupt(path, "its footer fails its checksum"));
        }
        let json = zstd::bulk::decompress(&footer, 256 << 20)
            .map_err(|e| corrupt(path, format!("its footer does not decompress: {e}")))?;
        let footer: Footer = serde_json::from_slice(&json)
            .map_err(|e| corrupt(path, format!("its footer does not read: {e}")))?;
        if footer.version != FORMAT_VERSION {
            return Err(corrupt(
                path,
                format!(
                    "format {} (this aggregator reads format {FORMAT_VERSION}): move its day \
                     directory out of DATA_DIR/index to start (its entries stay in it), or run \
                     the version that wrote it",
                    footer.version
                ),
            ));
        }
        if footer.templates.offset + u64::from(footer.templates.len) > footer_at {
            return Err(corrupt(path, "its template dictionary is out of the file"));
        }
        for block in &footer.blocks {
            if block.frames.len() != FIXED_FRAMES + block.summary.paths.len()
                || block
                    .frames
                    .iter()
                    .chain(&block.counts)
                    .chain(&block.numbers)
                    .any(|f| f.offset + u64::from(f.len) > footer_at)
            {
                return Err(corrupt(path, "a block's frames are out of the file"));
            }
        }
        Ok(Part {
            path: path.to_path_buf(),
            file,
            day: footer.day,
            lsn_from: footer.lsn_from,
            lsn_to: footer.lsn_to,
            bytes,
            id: NEXT_PART_ID.fetch_add(1, Ordering::Relaxed),
            archived: false,
            templates_frame: footer.templates,
            templates: Mutex::new(None),
            in_use: Mutex::new(std::sync::Weak::new()),
            bloom_checked: (0..footer.blocks.len())
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            blocks: footer.blocks,
        })
    }

    /// The part's template dictionary, prepared for queries (each template's values and the
    /// path of each of its variables). Kept for the next query while the cache has room.
    pub fn templates(self: &Arc<Self>) -> Result<Arc<TemplateSet>, BlockError> {
        if let Some(set) = self.templates.lock().clone() {
            touch(self, None);
            return Ok(set);
        }
        // Not cached, but perhaps still held by the query that made it (the blocks of a part
        // are read one after the other).
        if let Some(set) = self.in_use.lock().upgrade() {
            return Ok(set);
        }
        let texts = decode_strings(&self.frame(&self.templates_frame)?);
        let set = Arc::new(TemplateSet::new(texts));
        if touch(self, Some(set.bytes())) {
            *self.templates.lock() = Some(set.clone());
        }
        *self.in_use.lock() = Arc::downgrade(&set);
        Ok(set)
    }

    pub fn rows(&self) -> u64 {
        self.blocks.iter().map(|b| u64::from(b.summary.rows)).sum()
    }

    /// One frame's bytes, checked and decompressed.
    fn frame(&self, frame: &Frame) -> Result<Vec<u8>, BlockError> {
        let mut bytes = vec![0u8; frame.len as usize];
        self.file
            .read_exact_at(&mut bytes, frame.offset)
            .map_err(io(&self.path))?;
        if crc32fast::hash(&bytes) != frame.crc {
            return Err(corrupt(
                &self.path,
                format!("the frame at byte {} fails its checksum", frame.offset),
            ));
        }
        if !frame.zstd {
            return Ok(bytes);
        }
        thread_local! {
            // One decompression context a thread, reused: making one costs more than a small
            // frame's decompression.
            static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                const { std::cell::RefCell::new(None) };
        }
        DECOMPRESSOR
            .with(|cell| {
                let mut cell = cell.borrow_mut();
                if cell.is_none() {
                    *cell = zstd::bulk::Decompressor::new().ok();
                }
                match cell.as_mut() {
                    Some(d) => d.decompress(&bytes, frame.raw_len as usize),
                    None => zstd::bulk::decompress(&bytes, frame.raw_len as usize),
                }
            })
            .map_err(|e| {
                corrupt(
                    &self.path,
                    format!(
                        "the frame at byte {} does not decompress: {e}",
                        frame.offset
                    ),
                )
            })
    }

    fn bad(&self, what: &str) -> BlockError {
        corrupt(&self.path, format!("its {what} column does not decode"))
    }

    pub fn ts(&self, block: usize) -> Result<Vec<i64>, BlockError> {
        let entry = &self.blocks[block];
        decode_deltas(&self.frame(&entry.frames[TS])?, entry.summary.rows as usize)
            .ok_or_else(|| self.bad("timestamp"))
    }

    pub fn seq(&self, block: usize) -> Result<Vec<u64>, BlockError> {
        let entry = &self.blocks[block];
        decode_deltas(
            &self.frame(&entry.frames[SEQ])?,
            entry.summary.rows as usize,
        )
        .map(|v| v.into_iter().map(|s| s as u64).collect())
        .ok_or_else(|| self.bad("sequence"))
    }

    pub fn ids(&self, block: usize, ts: &[i64]) -> Result<Vec<uuid::Uuid>, BlockError> {
        decode_ids(&self.frame(&self.blocks[block].frames[IDS])?, ts).ok_or_else(|| self.bad("id"))
    }

    pub fn levels(&self, block: usize) -> Result<Vec<u8>, BlockError> {
        let levels = self.frame(&self.blocks[block].frames[LEVELS])?;
        (levels.len() == self.blocks[block].summary.rows as usize)
            .then_some(levels)
            .ok_or_else(|| self.bad("level"))
    }

    pub fn service(&self, block: usize) -> Result<Vec<u32>, BlockError> {
        let entry = &self.blocks[block];
        decode_varints(
            &self.frame(&entry.frames[SERVICE])?,
            entry.summary.rows as usize,
        )
        .filter(|v| {
            v.iter()
                .all(|s| (*s as usize) < entry.summary.services.len())
        })
        .ok_or_else(|| self.bad("service"))
    }

    pub fn template(&self, block: usize) -> Result<Vec<u32>, BlockError> {
        let entry = &self.blocks[block];
        decode_varints(
            &self.frame(&entry.frames[TEMPLATE])?,
            entry.summary.rows as usize,
        )
        .ok_or_else(|| self.bad("template"))
    }

    pub fn bloom(&self, block: usize) -> Result<Option<Bloom>, BlockError> {
        let bytes = self.frame(&self.blocks[block].frames[BLOOM])?;
        if bytes.is_empty() {
            return Ok(None);
        }
        Bloom::from_bytes(&bytes)
            .map(Some)
            .ok_or_else(|| self.bad("Bloom filter"))
    }

    /// The block's counts, where the part has them.
    pub fn counts(&self, block: usize) -> Result<Option<BlockCounts>, BlockError> {
        let Some(frame) = &self.blocks[block].counts else {
            return Ok(None);
        };
        BlockCounts::from_bytes(&self.frame(frame)?)
            .filter(|c| {
                let rows: u64 = c.templates.iter().map(|(_, n)| u64::from(*n)).sum();
                let by_service: u64 = c.service_levels.iter().map(|(_, _, n)| u64::from(*n)).sum();
                rows == u64::from(self.blocks[block].summary.rows) && by_service == rows
            })
            .map(Some)
            .ok_or_else(|| self.bad("counts"))
    }

    /// The value counts of the block's numeric paths, where the part has them (in a frame of
    /// their own, or in the counts of a part written before).
    pub fn numbers(&self, block: usize) -> Result<Option<NumberCounts>, BlockError> {
        let Some(frame) = &self.blocks[block].numbers else {
            return Ok(self.counts(block)?.map(|c| c.numbers));
        };
        let bytes = self.frame(frame)?;
        let mut at = 0;
        block::get_numbers(&bytes, &mut at)
            .filter(|_| at == bytes.len())
            .map(Some)
            .ok_or_else(|| self.bad("numbers"))
    }

    /// Whether the block's Bloom filter may hold every one of `hashes` (true without a
    /// filter). The first time this process asks, the filter is read whole and its checksum
    /// checked; after that a probe reads only the 32 bytes it tests, so a search for a rare
    /// word reads a few bytes of each block instead of its whole filter.
    pub fn bloom_allows(&self, block: usize, hashes: &[u64]) -> Result<bool, BlockError> {
        let frame = self.blocks[block].frames[BLOOM];
        let checked = &self.bloom_checked[block];
        if frame.len == 0 || frame.zstd || !checked.load(Ordering::Acquire) {
            let allows = match self.bloom(block)? {
                Some(bloom) => hashes.iter().all(|h| bloom.contains(*h)),
                None => true,
            };
            checked.store(true, Ordering::Release);
            return Ok(allows);
        }
        let blocks = frame.len as usize / 32;
        for &hash in hashes {
            let mut bytes = [0u8; 32];
            let at = frame.offset + (Bloom::block_index(hash, blocks) * 32) as u64;
            self.file
                .read_exact_at(&mut bytes, at)
                .map_err(io(&self.path))?;
            if !Bloom::block_contains(&bytes, hash) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub fn column(&self, block: usize, column: usize) -> Result<VarColumn, BlockError> {
        let frame = self.blocks[block]
            .frames
            .get(FIXED_FRAMES + column)
            .ok_or_else(|| self.bad("variable"))?;
        Ok(VarColumn::from_bytes(self.frame(frame)?))
    }
}

/// Marks `part`'s dictionary as just used, or offers it to the cache (`added`, its bytes):
/// whether the part may keep it. Dictionaries of parts gone or idle leave.
fn touch(part: &Arc<Part>, added: Option<usize>) -> bool {
    let now = std::time::Instant::now();
    let mut evicted = Vec::new();
    let kept;
    {
        let mut cache = TEMPLATE_CACHE.lock();
        let mut freed = 0;
        cache.parts.retain(|(_, weak, used, bytes)| {
            let keep = weak.strong_count() > 0 && now.duration_since(*used) < TEMPLATE_CACHE_IDLE;
            if !keep {
                freed += bytes;
                evicted.push(weak.clone());
            }
            keep
        });
        cache.bytes -= freed;
        let found = cache.parts.iter().position(|(id, ..)| *id == part.id);
        kept = match (found, added) {
            (Some(i), _) => {
                cache.parts[i].2 = now;
                true
            }
            (None, Some(bytes)) if cache.bytes + bytes <= TEMPLATE_CACHE_BYTES => {
                cache
                    .parts
                    .push((part.id, Arc::downgrade(part), now, bytes));
                cache.bytes += bytes;
                true
            }
            _ => false,
        };
    }
    // Outside the cache's lock: a part's own lock is never taken while holding it.
    for weak in evicted {
        if let Some(part) = weak.upgrade() {
            *part.templates.lock() = None;
        }
    }
    kept
}
