//! Reading one file: from an offset, line by line, through the runtime format and the joining
//! of pieces and stack traces, to whole messages with the offset each one starts at.
//!
//! A file is identified by its fingerprint, device + inode + a hash of its first line, so a
//! renamed file is recognised (and finished through its open descriptor), a copytruncated one
//! is noticed (its size falls below the offset: start again at 0), and a new file that reuses
//! an old inode is not mistaken for the old one.
//!
//! What can be checkpointed is the *safe offset*: no message that starts before it is still
//! being assembled. Resuming there re-reads at most some messages already sent, which carry
//! the same deterministic ids and are dropped by the aggregator.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::decode::{Format, Stream, decode, detect};
use crate::entry::{Message, SourceMeta};
use crate::multiline::{TraceState, continues};

/// Device and inode: which file an open descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
}

impl FileKey {
    pub fn of(metadata: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }
}

/// A file's fingerprint: which content it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    /// xxh3 of the first line (up to 1 KiB).
    pub head: u64,
}

const HEAD_BYTES: usize = 1024;
const READ_CHUNK: usize = 256 * 1024;

/// The hash of a file's first line, if it has one yet.
pub fn head_hash(file: &File) -> std::io::Result<Option<u64>> {
    let mut buf = vec![0u8; HEAD_BYTES];
    let n = file.read_at(&mut buf, 0)?;
    let head = &buf[..n];
    Ok(match memchr::memchr(b'\n', head) {
        Some(end) => Some(xxh3_64(&head[..end])),
        None if n == HEAD_BYTES => Some(xxh3_64(head)),
        None => None,
    })
}

#[derive(Default)]
struct StreamState {
    /// Pieces (CRI `P`, Docker without newline) of a message not yet whole.
    partial: Option<Message>,
    /// A whole message held back in case the next line continues it.
    held: Option<(Message, TraceState, Instant)>,
}

/// Builds the metadata of a source once its fingerprint is known.
pub type MetaFor<'a> = &'a dyn Fn(&Path, FileId) -> SourceMeta;

/// One file being followed.
pub struct Tailed {
    pub path: PathBuf,
    file: File,
    pub key: FileKey,
    pub id: Option<FileId>,
    meta: Option<SourceMeta>,
    /// The next byte to read.
    pub offset: u64,
    /// The incomplete line at the end of what was read, and where it starts.
    line: Vec<u8>,
    line_start: u64,
    /// Past `max_line` bytes of one line: drop the rest of it.
    skipping: bool,
    format: Option<Format>,
    streams: [StreamState; 2],
    max_line: usize,
    /// When it was renamed away or deleted: finished, then closed.
    pub gone_since: Option<Instant>,
    pub last_data: Instant,
    pub truncations: u64,
    /// The last bytes before `offset`, as read: if the file no longer has them there, it was
    /// truncated and refilled (copytruncate) even if it is already longer than `offset`.
    tail_signature: Vec<u8>,
}

const SIGNATURE_BYTES: usize = 64;

/// What the tailer does with a whole message.
pub type Sink<'a> = &'a mut dyn FnMut(&SourceMeta, Message);

impl Tailed {
    /// The open descriptor (what the path led to when it was opened).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Opens `path`, resuming at `resume(id)` when its fingerprint is known.
    pub fn open(
        path: &Path,
        max_line: usize,
        resume: &dyn Fn(FileId) -> Option<u64>,
    ) -> std::io::Result<Tailed> {
        let file = File::open(path)?;
        let metadata = file.metadata()?;
        let key = FileKey::of(&metadata);
        let id = head_hash(&file)?.map(|head| FileId {
            dev: key.dev,
            ino: key.ino,
            head,
        });
        let offset = id
            .and_then(resume)
            .filter(|offset| *offset <= metadata.len())
            .unwrap_or(0);
        Ok(Tailed {
            path: path.to_path_buf(),
            file,
            key,
            id,
            meta: None,
            offset,
            line: Vec::new(),
            line_start: offset,
            skipping: false,
            format: None,
            streams: Default::default(),
            max_line,
            gone_since: None,
            last_data: Instant::now(),
            truncations: 0,
            tail_signature: Vec::new(),
        })
    }

    /// The offset a checkpoint may record: every message starting before it is complete.
    pub fn safe_offset(&self) -> u64 {
        let mut safe = self.line_start;
        for stream in &self.streams {
            if let Some(partial) = &stream.partial {
                safe = safe.min(partial.start);
            }
            if let Some((held, _, _)) = &stream.held {
                safe = safe.min(held.start);
            }
        }
        safe
    }

    /// Whether everything read has been turned into messages.
    pub fn drained(&self) -> bool {
        self.line.is_empty()
            && self
                .streams
                .iter()
                .all(|s| s.partial.is_none() && s.held.is_none())
    }

    /// The bytes before `offset` that prove the file still holds what was read.
    fn signature_at(&self, offset: u64) -> std::io::Result<Vec<u8>> {
        let len = SIGNATURE_BYTES.min(offset as usize);
        let mut buf = vec![0u8; len];
        let n = self.file.read_at(&mut buf, offset - len as u64)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Notices copytruncate: the file is shorter than what was read, or no longer starts with
    /// the same first line, or no longer has the bytes that were read just before the offset
    /// (truncated and already refilled past it). Starts again at 0.
    pub fn check_truncation(&mut self) -> std::io::Result<bool> {
        let size = self.file.metadata()?.len();
        if size == self.offset {
            // Nothing new to read, so nothing to misread either.
            return Ok(false);
        }
        let replaced = size < self.offset
            || self
                .id
                .is_some_and(|id| head_hash(&self.file).ok().flatten() != Some(id.head))
            || (!self.tail_signature.is_empty()
                && self.signature_at(self.offset)? != self.tail_signature);
        if !replaced {
            return Ok(false);
        }
        tracing::info!(file = %self.path.display(), size, offset = self.offset, "file truncated; reading it again from the start");
        metrics::counter!("logging_agent_truncations_total").increment(1);
        self.tail_signature.clear();
        self.offset = 0;
        self.line.clear();
        self.line_start = 0;
        self.skipping = false;
        self.streams = Default::default();
        self.id = None;
        self.meta = None;
        self.format = None;
        self.truncations += 1;
        Ok(true)
    }

    /// Reads up to `budget` bytes, handing every whole message to `sink`. Returns the bytes
    /// read (0 at the end of the file).
    pub fn read(
        &mut self,
        budget: usize,
        meta_for: MetaFor<'_>,
        sink: Sink<'_>,
    ) -> std::io::Result<usize> {
        if self.id.is_none() {
            // The fingerprint needs a whole first line; until then there is nothing to send.
            match head_hash(&self.file)? {
                Some(head) => {
                    self.id = Some(FileId {
                        dev: self.key.dev,
                        ino: self.key.ino,
                        head,
                    })
                }
                None => return Ok(0),
            }
        }
        // Before reading on: is this still the content we were reading? (A copytruncated file
        // refilled past our offset would otherwise be read from the middle.)
        if self.gone_since.is_none() && self.offset > 0 && self.check_truncation()? {
            return self.read(budget, meta_for, sink);
        }
        let Some(id) = self.id else { return Ok(0) };
        if self.meta.is_none() {
            self.meta = Some(meta_for(&self.path, id));
        }
        let mut total = 0;
        let mut chunk = vec![0u8; READ_CHUNK.min(budget.max(4096))];
        while total < budget {
            let n = self.file.read_at(&mut chunk, self.offset)?;
            if n == 0 {
                break;
            }
            total += n;
            self.offset += n as u64;
            self.last_data = Instant::now();
            self.consume(&chunk[..n], sink);
        }
        if total > 0 {
            self.tail_signature = self.signature_at(self.offset)?;
        }
        Ok(total)
    }

    /// Splits bytes into lines; whole lines go on to be decoded.
    fn consume(&mut self, mut bytes: &[u8], sink: Sink<'_>) {
        let chunk_start = self.offset - bytes.len() as u64;
        let mut position = chunk_start;
        while !bytes.is_empty() {
            match memchr::memchr(b'\n', bytes) {
                Some(newline) => {
                    let end = position + newline as u64 + 1;
                    if self.skipping {
                        self.skipping = false;
                    } else if self.line.is_empty() {
                        let start = self.line_start;
                        self.line_start = end;
                        self.handle_line(&bytes[..newline], start, sink, false);
                    } else {
                        let mut line = std::mem::take(&mut self.line);
                        line.extend_from_slice(&bytes[..newline]);
                        let start = self.line_start;
                        self.line_start = end;
                        self.handle_line(&line, start, sink, false);
                    }
                    self.line_start = end;
                    bytes = &bytes[newline + 1..];
                    position = end;
                }
                None => {
                    if !self.skipping {
                        let room = self.max_line.saturating_sub(self.line.len());
                        if bytes.len() > room {
                            // Longer than a line may be: send what fits, drop the rest of it.
                            self.line.extend_from_slice(&bytes[..room]);
                            let line = std::mem::take(&mut self.line);
                            let start = self.line_start;
                            // Decoded like any line (a CRI or Docker prefix is still whole),
                            // and marked cut.
                            self.handle_line(&line, start, sink, true);
                            self.skipping = true;
                        } else {
                            self.line.extend_from_slice(bytes);
                        }
                    }
                    break;
                }
            }
        }
    }

    /// Decodes one line and joins it as its format says; `cut`: the line was longer than
    /// `max_line` and this is its start.
    fn handle_line(&mut self, line: &[u8], start: u64, sink: Sink<'_>, cut: bool) {
        let format = *self.format.get_or_insert_with(|| detect(line));
        let decoded = decode(format, line);
        let index = usize::from(decoded.stream == Stream::Stderr);
        let stream_tag = (format != Format::Plain).then_some(decoded.stream);
        let max_line = self.max_line;
        let state = &mut self.streams[index];

        let whole = match state.partial.take() {
            Some(mut partial) => {
                let room = max_line.saturating_sub(partial.body.len());
                if decoded.body.len() > room {
                    partial.body.extend_from_slice(&decoded.body[..room]);
                    partial.truncated = true;
                } else {
                    partial.body.extend_from_slice(&decoded.body);
                }
                partial.truncated |= cut;
                partial
            }
            None => Message {
                start,
                time: decoded.time,
                stream: stream_tag,
                body: decoded.body[..decoded.body.len().min(max_line)].to_vec(),
                truncated: decoded.body.len() > max_line || cut,
            },
        };
        if decoded.partial {
            state.partial = Some(whole);
            return;
        }

        let meta = self.meta.clone();
        let Some(meta) = meta else { return };
        let state = &mut self.streams[index];
        // Multiline: does this line continue the held message?
        if let Some((held, trace, _)) = &mut state.held {
            let joinable = !whole.body.starts_with(b"{") && held.body.len() < max_line;
            if joinable && continues(trace, &whole.body) {
                held.body.push(b'\n');
                let room = max_line.saturating_sub(held.body.len());
                held.body
                    .extend_from_slice(&whole.body[..whole.body.len().min(room)]);
                held.truncated |= whole.body.len() > room;
                if let Some((_, _, since)) = &mut state.held {
                    *since = Instant::now();
                }
                return;
            }
            if let Some((held, _, _)) = state.held.take() {
                sink(&meta, held);
            }
        }
        if whole.body.first() == Some(&b'{') {
            // JSON is whole by construction.
            sink(&meta, whole);
        } else {
            let trace = TraceState::start(&whole.body);
            state.held = Some((whole, trace, Instant::now()));
        }
    }

    /// Sends held messages that nothing continued within `wait` (or all, with `Duration::ZERO`).
    /// Whether a multiline entry is held, waiting for its continuation or its timeout.
    pub fn holds(&self) -> bool {
        self.streams.iter().any(|state| state.held.is_some())
    }

    pub fn flush_held(&mut self, wait: Duration, sink: Sink<'_>) {
        let Some(meta) = self.meta.clone() else {
            return;
        };
        for state in &mut self.streams {
            if state
                .held
                .as_ref()
                .is_some_and(|(_, _, since)| since.elapsed() >= wait)
                && let Some((held, _, _)) = state.held.take()
            {
                sink(&meta, held);
            }
        }
    }

    /// At the end of a file that is gone: whatever is left becomes messages.
    pub fn finish(&mut self, sink: Sink<'_>) {
        let Some(meta) = self.meta.clone() else {
            return;
        };
        if !self.line.is_empty() && !self.skipping {
            let line = std::mem::take(&mut self.line);
            let start = self.line_start;
            self.line_start = self.offset;
            self.handle_line(&line, start, sink, false);
        }
        for state in &mut self.streams {
            if let Some(partial) = state.partial.take() {
                sink(&meta, partial);
            }
            if let Some((held, _, _)) = state.held.take() {
                sink(&meta, held);
            }
        }
        self.line_start = self.offset;
    }
}

#[cfg(test)]
mod tests;
