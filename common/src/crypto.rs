//! Encryption at rest: one sealed format for everything the binaries write that holds log or
//! audit content (WAL records, store parts, dead letters, alert snapshots, the agent's spool
//! and checkpoints).
//!
//! A key is 32 random bytes, written in base64 (`head -c 32 /dev/urandom | base64`). A
//! [`Keyring`] holds one or more: the **first encrypts, every one decrypts**, so a key is
//! rotated by putting the new one first and keeping the old one after it until no file uses it
//! (the way Kubernetes' `EncryptionConfiguration` orders its keys). A key's id is the first 8
//! bytes of SHA-256 over a fixed label and the key; files record it, so a file whose key is
//! missing is refused by name and id, never misread.
//!
//! Sealed bytes:
//!
//! ```text
//! "LSSEAL1\0" | key id (8) | salt (16) | chunk size (u32 LE) | chunk | chunk | …
//! ```
//!
//! Every chunk is up to `chunk size` bytes of plaintext sealed with AES-256-GCM (16-byte tag
//! after it) under the file key `HKDF-SHA256(key, salt)`, with the chunk's number as its nonce
//! and, as associated data, whether it is the last chunk. A fresh random salt per file (and per
//! WAL record) means a fresh key, so no nonce is ever used twice under one key; the last-chunk
//! flag means a file cut at a chunk boundary fails instead of reading short. Chunks let a
//! reader decrypt only the part of a large file it reads ([`AtRestFile::read_exact_at`]).
//!
//! Bytes that do not start with the magic are plaintext, written before encryption was turned
//! on; they are read as they are (and replaced as the files they are in are rewritten).

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

pub const MAGIC: &[u8; 8] = b"LSSEAL1\0";
pub const HEADER_LEN: usize = 8 + 8 + 16 + 4;
pub const TAG_LEN: usize = 16;
/// The chunk size of everything but the store's parts: large, so the tags cost nothing.
pub const CHUNK: usize = 64 << 10;
/// No chunk is larger than this; a header claiming more is corrupt.
const MAX_CHUNK: usize = 16 << 20;
const KEY_LEN: usize = 32;

/// Which key sealed a file: shown as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; 8]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Why sealed bytes could not be read. The caller names the file.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("it is encrypted (key {0}) and no encryption key is set")]
    NoKey(KeyId),
    #[error("it is encrypted with key {0}, which is not among the keys given")]
    UnknownKey(KeyId),
    #[error(
        "it does not decrypt at byte {0}: it was altered, or written with another key of the same id"
    )]
    Altered(u64),
    #[error("it is cut short ({0})")]
    Truncated(&'static str),
}

impl From<CryptoError> for io::Error {
    fn from(error: CryptoError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, error)
    }
}

struct Key {
    id: KeyId,
    secret: [u8; KEY_LEN],
}

/// The keys of a process: the first encrypts, all decrypt.
pub struct Keyring {
    keys: Vec<Key>,
    random: SystemRandom,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<KeyId> = self.keys.iter().map(|k| k.id).collect();
        f.debug_struct("Keyring").field("ids", &ids).finish()
    }
}

impl Keyring {
    /// Keys in base64, one a line or separated by commas; blank lines and `#` comments are
    /// skipped. The error names the key (by its place) and what is wrong with it.
    pub fn parse(text: &str) -> Result<Keyring, String> {
        use base64::Engine;
        let mut keys = Vec::new();
        let items = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|k| !k.is_empty());
        for (n, item) in items.enumerate() {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(item)
                .map_err(|e| format!("key {} is not base64: {e}", n + 1))?;
            let secret: [u8; KEY_LEN] = bytes.try_into().map_err(|b: Vec<u8>| {
                format!(
                    "key {} is {} bytes; a key is 32 random bytes (head -c 32 /dev/urandom | base64)",
                    n + 1,
                    b.len()
                )
            })?;
            keys.push(Key {
                id: key_id(&secret),
                secret,
            });
        }
        if keys.is_empty() {
            return Err("holds no key (32 random bytes in base64)".into());
        }
        Ok(Keyring {
            keys,
            random: SystemRandom::new(),
        })
    }

    /// Reads the keys from a file (see [`Keyring::parse`]).
    pub fn read(path: &Path) -> Result<Keyring, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Keyring::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The id of the key new writes use.
    pub fn active_id(&self) -> KeyId {
        self.keys[0].id
    }

    /// The ids of every key, the active one first.
    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.iter().map(|k| k.id)
    }

    /// `plaintext` sealed whole (a WAL record, a snapshot, a dead letter).
    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(sealed_len(plaintext.len() as u64, CHUNK) as usize);
        let mut writer = self.writer(&mut out, CHUNK);
        writer.write_all(plaintext).expect("writing to a Vec");
        writer.finish().expect("writing to a Vec");
        out
    }

    /// `plaintext` sealed as records of one chunk each, each chunk its own size (at most
    /// [`CHUNK`]): self-delimiting, so records appended to a file one after another are read
    /// back in turn ([`open_appended`]). Nothing is written for nothing.
    pub fn seal_record(&self, plaintext: &[u8]) -> Vec<u8> {
        let pieces = plaintext.len().div_ceil(CHUNK);
        let mut out = Vec::with_capacity(plaintext.len() + pieces * (HEADER_LEN + TAG_LEN));
        for piece in plaintext.chunks(CHUNK) {
            let mut writer = self.writer(&mut out, piece.len());
            writer.write_all(piece).expect("writing to a Vec");
            writer.finish().expect("writing to a Vec");
        }
        out
    }

    /// `plaintext` sealed ([`Keyring::seal_record`]) and written in base64, for places that
    /// hold text: a spool line, a database column. [`open_text`] reads it back.
    pub fn seal_text(&self, plaintext: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.seal_record(plaintext))
    }

    /// A writer that seals what it is given into `inner`, in chunks of `chunk` bytes;
    /// [`SealWriter::finish`] seals the last chunk.
    pub fn writer<W: Write>(&self, inner: W, chunk: usize) -> SealWriter<W> {
        let mut salt = [0u8; 16];
        self.random
            .fill(&mut salt)
            .expect("the system's random source");
        let active = &self.keys[0];
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&active.id.0);
        header.extend_from_slice(&salt);
        header.extend_from_slice(&(chunk as u32).to_le_bytes());
        SealWriter {
            inner,
            key: file_key(&active.secret, &salt),
            chunk,
            buf: Vec::with_capacity(chunk + TAG_LEN),
            next: 0,
            header: Some(header),
        }
    }

    fn key_of(&self, header: &Header) -> Result<LessSafeKey, CryptoError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == header.key_id)
            .ok_or(CryptoError::UnknownKey(header.key_id))?;
        Ok(file_key(&key.secret, &header.salt))
    }
}

/// Whether `bytes` begin as sealed bytes do.
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// The plaintext of `bytes`: opened when sealed, as they are when not.
pub fn open<'a>(keyring: Option<&Keyring>, bytes: &'a [u8]) -> Result<Cow<'a, [u8]>, CryptoError> {
    if !is_sealed(bytes) {
        return Ok(Cow::Borrowed(bytes));
    }
    let header = Header::parse(bytes)?;
    let keyring = keyring.ok_or(CryptoError::NoKey(header.key_id))?;
    let key = keyring.key_of(&header)?;
    let body = &bytes[HEADER_LEN..];
    let chunks = chunk_count(body.len() as u64, header.chunk)?;
    let mut out = Vec::with_capacity(body.len());
    for n in 0..chunks {
        let from = n as usize * (header.chunk + TAG_LEN);
        let to = (from + header.chunk + TAG_LEN).min(body.len());
        let start = out.len();
        out.extend_from_slice(&body[from..to]);
        let opened = open_chunk(&key, n, n + 1 == chunks, &mut out[start..])?;
        out.truncate(start + opened);
    }
    Ok(Cow::Owned(out))
}

/// The plaintext of a file of appended records ([`Keyring::seal_record`]); lines written
/// before encryption was turned on are kept as they are.
pub fn open_appended(keyring: Option<&Keyring>, mut bytes: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(bytes.len());
    while !bytes.is_empty() {
        if !is_sealed(bytes) {
            let line = memchr::memchr(b'\n', bytes).map_or(bytes.len(), |n| n + 1);
            out.extend_from_slice(&bytes[..line]);
            bytes = &bytes[line..];
            continue;
        }
        let header = Header::parse(bytes)?;
        let len = (HEADER_LEN + header.chunk + TAG_LEN).min(bytes.len());
        out.extend_from_slice(&open(keyring, &bytes[..len])?);
        bytes = &bytes[len..];
    }
    Ok(out)
}

/// How sealed text ([`Keyring::seal_text`]) begins: the base64 of the magic.
const SEALED_TEXT: &[u8] = b"TFNTRUFMMQ";

/// The plaintext of text [`Keyring::seal_text`] wrote; other text (written before
/// encryption was turned on) comes back as it is. The error says what is wrong; the caller
/// names where the text was.
pub fn open_text<'a>(keyring: Option<&Keyring>, text: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
    use base64::Engine;
    if !text.starts_with(SEALED_TEXT) {
        return Ok(Cow::Borrowed(text));
    }
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("sealed text that is not base64: {e}"))?;
    open_appended(keyring, &sealed)
        .map(Cow::Owned)
        .map_err(|e| format!("sealed text: {e}"))
}

/// The size of `plaintext_len` bytes once sealed in chunks of `chunk`.
pub fn sealed_len(plaintext_len: u64, chunk: usize) -> u64 {
    let chunks = plaintext_len.div_ceil(chunk as u64).max(1);
    HEADER_LEN as u64 + plaintext_len + chunks * TAG_LEN as u64
}

/// Writes `bytes` to a new file at `path` (sealed when there is a keyring), `fsync`ed.
pub fn write_file(path: &Path, bytes: &[u8], keyring: Option<&Keyring>) -> io::Result<()> {
    let mut file = File::create(path)?;
    match keyring {
        Some(keyring) => file.write_all(&keyring.seal(bytes))?,
        None => file.write_all(bytes)?,
    }
    file.sync_all()
}

/// A file's plaintext; an error names the file.
pub fn read_file(path: &Path, keyring: Option<&Keyring>) -> io::Result<Vec<u8>> {
    let bytes = std::fs::read(path)?;
    match open(keyring, &bytes) {
        Ok(Cow::Borrowed(_)) => Ok(bytes),
        Ok(Cow::Owned(plain)) => Ok(plain),
        Err(e) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )),
    }
}

/// Seals what is written into `inner`.
pub struct SealWriter<W: Write> {
    inner: W,
    key: LessSafeKey,
    chunk: usize,
    buf: Vec<u8>,
    next: u64,
    header: Option<Vec<u8>>,
}

impl<W: Write> SealWriter<W> {
    /// Seals the last chunk and hands back the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.write_header()?;
        self.seal_chunk(true)?;
        Ok(self.inner)
    }

    fn write_header(&mut self) -> io::Result<()> {
        if let Some(header) = self.header.take() {
            self.inner.write_all(&header)?;
        }
        Ok(())
    }

    fn seal_chunk(&mut self, last: bool) -> io::Result<()> {
        let nonce = nonce(self.next);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from([u8::from(last)]), &mut self.buf)
            .map_err(|_| io::Error::other("sealing failed"))?;
        self.buf.extend_from_slice(tag.as_ref());
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        self.next += 1;
        Ok(())
    }
}

impl<W: Write> Write for SealWriter<W> {
    fn write(&mut self, mut bytes: &[u8]) -> io::Result<usize> {
        let written = bytes.len();
        self.write_header()?;
        while !bytes.is_empty() {
            // A full chunk is sealed only once more bytes come: the last one is flagged.
            if self.buf.len() == self.chunk {
                self.seal_chunk(false)?;
            }
            let take = (self.chunk - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes sealed when there is a keyring, as it is when not.
pub enum AtRestWriter<W: Write> {
    Plain(W),
    Sealed(Box<SealWriter<W>>),
}

impl<W: Write> AtRestWriter<W> {
    pub fn new(inner: W, keyring: Option<&Keyring>, chunk: usize) -> AtRestWriter<W> {
        match keyring {
            Some(keyring) => AtRestWriter::Sealed(Box::new(keyring.writer(inner, chunk))),
            None => AtRestWriter::Plain(inner),
        }
    }

    /// Seals the last chunk (when sealing) and hands back the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            AtRestWriter::Plain(inner) => Ok(inner),
            AtRestWriter::Sealed(writer) => writer.finish(),
        }
    }
}

impl<W: Write> Write for AtRestWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            AtRestWriter::Plain(inner) => inner.write(bytes),
            AtRestWriter::Sealed(writer) => writer.write(bytes),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            AtRestWriter::Plain(inner) => inner.flush(),
            AtRestWriter::Sealed(writer) => writer.flush(),
        }
    }
}

/// A file read at any offset: sealed (decrypting only the chunks a read covers) or plaintext.
pub struct AtRestFile {
    file: File,
    len: u64,
    sealed: Option<Sealed>,
}

struct Sealed {
    key: LessSafeKey,
    chunk: usize,
    chunks: u64,
}

impl AtRestFile {
    /// Opens `file`; the error says why a sealed one cannot be read (the caller names it).
    pub fn open(file: File, keyring: Option<&Keyring>) -> io::Result<AtRestFile> {
        let stored = file.metadata()?.len();
        let mut head = [0u8; HEADER_LEN];
        let is_sealed = stored >= HEADER_LEN as u64 && {
            file.read_exact_at(&mut head, 0)?;
            is_sealed(&head)
        };
        if !is_sealed {
            return Ok(AtRestFile {
                file,
                len: stored,
                sealed: None,
            });
        }
        let header = Header::parse(&head)?;
        let keyring = keyring.ok_or(CryptoError::NoKey(header.key_id))?;
        let key = keyring.key_of(&header)?;
        let body = stored - HEADER_LEN as u64;
        let chunks = chunk_count(body, header.chunk)?;
        Ok(AtRestFile {
            file,
            len: body - chunks * TAG_LEN as u64,
            sealed: Some(Sealed {
                key,
                chunk: header.chunk,
                chunks,
            }),
        })
    }

    /// The plaintext length.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_sealed(&self) -> bool {
        self.sealed.is_some()
    }

    /// Fills `buf` from plaintext offset `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(sealed) = &self.sealed else {
            return self.file.read_exact_at(buf, offset);
        };
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        if end > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        }
        let chunk = sealed.chunk as u64;
        let stride = chunk + TAG_LEN as u64;
        let first = offset / chunk;
        let last = (end - 1) / chunk;
        let from = HEADER_LEN as u64 + first * stride;
        let to = (HEADER_LEN as u64 + (last + 1) * stride).min(self.len_stored(sealed));
        let mut stored = vec![0u8; (to - from) as usize];
        self.file.read_exact_at(&mut stored, from)?;
        let total = stored.len();
        let mut filled = 0;
        for (i, n) in (first..=last).enumerate() {
            let at = i * stride as usize;
            let piece = &mut stored[at..(at + stride as usize).min(total)];
            let plain = open_chunk(&sealed.key, n, n + 1 == sealed.chunks, piece)?;
            let chunk_start = n * chunk;
            let skip = offset.saturating_sub(chunk_start) as usize;
            let take = (plain - skip).min(buf.len() - filled);
            buf[filled..filled + take].copy_from_slice(&piece[skip..skip + take]);
            filled += take;
        }
        Ok(())
    }

    fn len_stored(&self, sealed: &Sealed) -> u64 {
        HEADER_LEN as u64 + self.len + sealed.chunks * TAG_LEN as u64
    }
}

struct Header {
    key_id: KeyId,
    salt: [u8; 16],
    chunk: usize,
}

impl Header {
    fn parse(bytes: &[u8]) -> Result<Header, CryptoError> {
        if bytes.len() < HEADER_LEN {
            return Err(CryptoError::Truncated("shorter than its header"));
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&bytes[8..16]);
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&bytes[16..32]);
        let chunk = u32::from_le_bytes([bytes[32], bytes[33], bytes[34], bytes[35]]) as usize;
        if chunk == 0 || chunk > MAX_CHUNK {
            return Err(CryptoError::Truncated("its chunk size is impossible"));
        }
        Ok(Header {
            key_id: KeyId(key_id),
            salt,
            chunk,
        })
    }
}

/// How many chunks a sealed body of `body` bytes holds.
fn chunk_count(body: u64, chunk: usize) -> Result<u64, CryptoError> {
    let stride = (chunk + TAG_LEN) as u64;
    let chunks = body.div_ceil(stride).max(1);
    let last = body - (chunks - 1) * stride;
    if last < TAG_LEN as u64 {
        return Err(CryptoError::Truncated(
            "its last chunk is shorter than a tag",
        ));
    }
    Ok(chunks)
}

/// Opens one chunk in place (ciphertext then tag); returns its plaintext length.
fn open_chunk(
    key: &LessSafeKey,
    n: u64,
    last: bool,
    piece: &mut [u8],
) -> Result<usize, CryptoError> {
    key.open_in_place(nonce(n), Aad::from([u8::from(last)]), piece)
        .map(|plain| plain.len())
        .map_err(|_| CryptoError::Altered(n))
}

fn nonce(n: u64) -> Nonce {
    let mut bytes = [0u8; NONCE_LEN];
    bytes[NONCE_LEN - 8..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(bytes)
}

fn file_key(secret: &[u8; KEY_LEN], salt: &[u8; 16]) -> LessSafeKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(secret);
    let okm = prk
        .expand(&[b"logging-service file key"], &AES_256_GCM)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    LessSafeKey::new(UnboundKey::from(okm))
}

fn key_id(secret: &[u8; KEY_LEN]) -> KeyId {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(b"logging-service key id\0");
    context.update(secret);
    let digest = context.finish();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest.as_ref()[..8]);
    KeyId(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY_B: &str = "HxwdHh8AAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRo=";

    #[test]
    fn keys_are_named_by_place_when_wrong() {
        assert!(Keyring::parse("").unwrap_err().contains("no key"));
        assert!(
            Keyring::parse("not base64!")
                .unwrap_err()
                .contains("key 1 is not base64")
        );
        let short = Keyring::parse(&format!("{KEY_A}\nAAAA")).unwrap_err();
        assert!(short.contains("key 2 is 3 bytes"), "{short}");
        let ring = Keyring::parse(&format!("# new first\n{KEY_B}, {KEY_A}\n")).unwrap();
        assert_eq!(ring.ids().count(), 2);
        assert_eq!(ring.active_id(), Keyring::parse(KEY_B).unwrap().active_id());
    }

    #[test]
    fn rotation_reads_old_files_and_a_missing_key_is_named() {
        let old = Keyring::parse(KEY_A).unwrap();
        let sealed = old.seal(b"secret line");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        let rotated = Keyring::parse(&format!("{KEY_B}\n{KEY_A}")).unwrap();
        assert_eq!(&*open(Some(&rotated), &sealed).unwrap(), b"secret line");
        let resealed = rotated.seal(b"secret line");
        assert_eq!(&resealed[8..16], &rotated.active_id().0);
        let error = open(Some(&old), &resealed).unwrap_err().to_string();
        assert!(error.contains(&rotated.active_id().to_string()), "{error}");
        assert!(matches!(open(None, &sealed), Err(CryptoError::NoKey(_))));
        assert_eq!(&*open(None, b"plain").unwrap(), b"plain");
    }

    #[test]
    fn appended_records_read_back_in_turn() {
        let ring = Keyring::parse(KEY_A).unwrap();
        let mut file = b"{\"plain\":1}\n".to_vec();
        file.extend(ring.seal_record(b"{\"a\":1}\n"));
        file.extend(ring.seal_record(&vec![b'x'; CHUNK * 2]));
        file.extend(ring.seal_record(b"{\"b\":2}\n"));
        let mut expected = b"{\"plain\":1}\n{\"a\":1}\n".to_vec();
        expected.extend(vec![b'x'; CHUNK * 2]);
        expected.extend(b"{\"b\":2}\n");
        assert_eq!(open_appended(Some(&ring), &file).unwrap(), expected);
        assert!(open_appended(Some(&ring), &file[..file.len() - 1]).is_err());
        assert!(open_appended(None, &file).is_err());
        assert!(ring.seal_record(b"").is_empty());
    }

    #[test]
    fn text_round_trips_and_plain_text_passes() {
        let ring = Keyring::parse(KEY_A).unwrap();
        let text = ring.seal_text(b"{\"note\":\"secret\"}");
        assert!(!text.contains("secret"));
        assert_eq!(
            &*open_text(Some(&ring), text.as_bytes()).unwrap(),
            b"{\"note\":\"secret\"}"
        );
        assert_eq!(
            &*open_text(None, b"{\"plain\":1}").unwrap(),
            b"{\"plain\":1}"
        );
        assert!(
            open_text(None, text.as_bytes())
                .unwrap_err()
                .contains("no encryption key")
        );
        assert!(open_text(Some(&ring), b"TFNTRUFMMQ!!").is_err());
    }

    #[test]
    fn hostile_headers_are_refused_not_followed() {
        let ring = Keyring::parse(KEY_A).unwrap();
        let mut sealed = ring.seal(b"x");
        // A chunk size past the bound, and zero.
        for chunk in [u32::MAX, (MAX_CHUNK + 1) as u32, 0] {
            sealed[32..36].copy_from_slice(&chunk.to_le_bytes());
            assert!(open(Some(&ring), &sealed).is_err(), "{chunk}");
            assert!(open_appended(Some(&ring), &sealed).is_err(), "{chunk}");
        }
        // Only a header, or less.
        assert!(open(Some(&ring), &sealed[..HEADER_LEN]).is_err());
        assert!(open(Some(&ring), &sealed[..12]).is_err());
    }

    #[test]
    fn a_large_record_is_several_records_each_readable() {
        let ring = Keyring::parse(KEY_A).unwrap();
        let plain: Vec<u8> = (0..CHUNK * 3 + 5).map(|i| (i % 251) as u8).collect();
        let sealed = ring.seal_record(&plain);
        assert_eq!(sealed.len(), plain.len() + 4 * (HEADER_LEN + TAG_LEN));
        assert_eq!(open_appended(Some(&ring), &sealed).unwrap(), plain);
    }

    #[test]
    fn altered_or_cut_bytes_are_refused() {
        let ring = Keyring::parse(KEY_A).unwrap();
        let plain = vec![7u8; CHUNK * 2 + 10];
        let sealed = ring.seal(&plain);
        let mut altered = sealed.clone();
        altered[HEADER_LEN + 5] ^= 1;
        assert!(matches!(
            open(Some(&ring), &altered),
            Err(CryptoError::Altered(0))
        ));
        // Cut at a chunk boundary: the chunk that is now last was not sealed as the last.
        let cut = &sealed[..HEADER_LEN + 2 * (CHUNK + TAG_LEN)];
        assert!(open(Some(&ring), cut).is_err());
        assert!(open(Some(&ring), &sealed[..HEADER_LEN + 3]).is_err());
    }

    proptest! {
        #[test]
        fn random_reads_see_the_plaintext(
            len in 0usize..20_000,
            chunk in prop::sample::select(vec![1usize, 7, 4096, CHUNK]),
            reads in prop::collection::vec((0usize..20_000, 0usize..5_000), 1..8),
        ) {
            let ring = Keyring::parse(KEY_A).unwrap();
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut writer = ring.writer(Vec::new(), chunk);
            // Written in uneven pieces, as a part's frames are.
            for piece in plain.chunks(1 + len / 3) {
                writer.write_all(piece).unwrap();
            }
            let sealed = writer.finish().unwrap();
            prop_assert_eq!(sealed.len() as u64, sealed_len(len as u64, chunk));
            prop_assert_eq!(&*open(Some(&ring), &sealed).unwrap(), &plain[..]);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            std::fs::write(&path, &sealed).unwrap();
            let file = AtRestFile::open(File::open(&path).unwrap(), Some(&ring)).unwrap();
            prop_assert_eq!(file.len(), len as u64);
            for (at, n) in reads {
                let at = at.min(len);
                let n = n.min(len - at);
                let mut buf = vec![0u8; n];
                file.read_exact_at(&mut buf, at as u64).unwrap();
                prop_assert_eq!(&buf[..], &plain[at..at + n]);
            }
        }
    }
}
