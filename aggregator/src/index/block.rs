//! A block: up to [`BLOCK_ROWS`] entries of one day, stored column by column.
//!
//! | column | per row | encoded as |
//! |---|---|---|
//! | `ts` | the entry's timestamp (ns) | zig-zag varint deltas |
//! | `seq` | its WAL position (the sort's tie-break) | zig-zag varint deltas |
//! | `id` | its UUID | the 10 random bytes of a UUIDv7 whose time is the entry's millisecond, else all 16 |
//! | `level` | its level's rank | one byte |
//! | `service` | its service, by number | varint; the names are in the block's header |
//! | `template` | its template, by number | varint; the templates are a column of their own |
//! | one per path | the variables found under that path ([`super::template`]) | each followed by a 0 byte |
//!
//! Each column is a zstd frame with a CRC32 of its bytes; the header (row count, time range,
//! levels and services present, where each column is) is in the part's footer, so a query
//! decides from the header alone which blocks to read, and reads only the columns it needs.
//! A Bloom filter of the words of the variables ([`super::bloom`]) is one more column.

use std::collections::HashMap;
use std::sync::OnceLock;

use logging_common::{LogLevel, Timestamp};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::bloom::{self, Bloom};
use super::template::{self, Cutter, Piece, Variable, WHOLE_LINE};

/// Rows in a full block.
pub const BLOCK_ROWS: usize = 16_384;
/// Distinct paths a block keeps columns for; the variables of further paths share the last
/// column, [`OTHER_PATHS`]. A client cannot grow a block's header without bound.
pub const MAX_COLUMNS: usize = 512;
/// The column of the variables of paths past [`MAX_COLUMNS`].
pub const OTHER_PATHS: &str = "\u{0}other";

/// Why a block could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("the store's file {file} is damaged: {what}")]
    Corrupt { file: String, what: String },
    #[error("the store cannot read {file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
}

/// One column's values of variables: each value followed by a 0 byte.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VarColumn {
    pub data: Vec<u8>,
    /// Where each value starts in `data`.
    pub starts: Vec<u32>,
}

impl VarColumn {
    fn push(&mut self, value: &[u8]) {
        self.starts.push(self.data.len() as u32);
        self.data.extend_from_slice(value);
        self.data.push(0);
    }

    /// The `i`-th value.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let start = *self.starts.get(i)? as usize;
        let end = self
            .starts
            .get(i + 1)
            .map_or(self.data.len(), |s| *s as usize)
            .saturating_sub(1);
        self.data.get(start..end.max(start))
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Reads what was written: values each ending in a 0 byte.
    pub fn from_bytes(data: Vec<u8>) -> VarColumn {
        let mut starts = Vec::with_capacity(data.len() / 8);
        let mut at = 0;
        zero_bytes(&data, |end| {
            starts.push(at as u32);
            at = end + 1;
        });
        VarColumn { data, starts }
    }
}

/// Calls `each` with the position of every 0 byte of `data`, in order. Values are short (a
/// 0 every ten bytes or so), where calling `memchr` once per value costs more than the
/// search: this tests eight bytes at a time, exactly (no carry crosses a byte).
fn zero_bytes(data: &[u8], mut each: impl FnMut(usize)) {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    for (i, word) in words.enumerate() {
        let x = u64::from_le_bytes(word.try_into().unwrap_or_default());
        // A byte's high bit is set here exactly when the byte is 0.
        let mut zeros = !(((x & LOW7) + LOW7) | x | LOW7);
        while zeros != 0 {
            each(i * 8 + zeros.trailing_zeros() as usize / 8);
            zeros &= zeros - 1;
        }
    }
    let base = data.len() - tail.len();
    for (i, b) in tail.iter().enumerate() {
        if *b == 0 {
            each(base + i);
        }
    }
}

/// The rows of a block, decoded.
#[derive(Debug, Default)]
pub struct Block {
    pub ts: Vec<i64>,
    pub seq: Vec<u64>,
    pub ids: Vec<Uuid>,
    pub levels: Vec<u8>,
    pub service: Vec<u32>,
    /// Service names as JSON text (quotes included), by number.
    pub services: Vec<Box<[u8]>>,
    pub template: Vec<u32>,
    pub templates: Vec<Box<[u8]>>,
    /// The path of each variable column.
    pub paths: Vec<String>,
    pub columns: Vec<VarColumn>,
    /// Per column: whether every variable in it is a whole JSON number.
    pub numeric: Vec<bool>,
    /// Bytes of the stored lines.
    pub raw_bytes: u64,
    /// Rows per service number.
    pub service_counts: Vec<u32>,
}

/// What a query needs to know of a block before reading it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub rows: u32,
    pub ts_min: i64,
    pub ts_max: i64,
    pub seq_min: u64,
    pub seq_max: u64,
    /// Bit `rank` for each level present.
    pub levels: u16,
    pub raw_bytes: u64,
    /// Service names as JSON text, and how many rows each.
    pub services: Vec<(String, u32)>,
    /// The path of each variable column.
    pub paths: Vec<String>,
}

impl Block {
    pub fn rows(&self) -> usize {
        self.ts.len()
    }

    /// Bytes its columns take in memory.
    pub fn memory_bytes(&self) -> u64 {
        let fixed = self.rows() * (8 + 8 + 16 + 1 + 4 + 4);
        let dicts: usize = self
            .services
            .iter()
            .chain(&self.templates)
            .map(|t| t.len())
            .sum();
        let vars: usize = self
            .columns
            .iter()
            .map(|c| c.data.len() + 4 * c.starts.len())
            .sum();
        (fixed + dicts + vars) as u64
    }

    pub fn summary(&self) -> Summary {
        Summary {
            rows: self.rows() as u32,
            ts_min: self.ts.iter().copied().min().unwrap_or(0),
            ts_max: self.ts.iter().copied().max().unwrap_or(0),
            seq_min: self.seq.iter().copied().min().unwrap_or(0),
            seq_max: self.seq.iter().copied().max().unwrap_or(0),
            levels: self.levels.iter().fold(0u16, |m, l| m | 1 << l),
            raw_bytes: self.raw_bytes,
            services: self
                .services
                .iter()
                .zip(&self.service_counts)
                .map(|(s, n)| (String::from_utf8_lossy(s).into_owned(), *n))
                .collect(),
            paths: self.paths.clone(),
        }
    }

    /// The stored line of row `row`, given the positions of its variables in each column
    /// (`at[c]`: the index of its first value in column `c`; advanced past them).
    pub fn line(&self, row: usize, slots: &[u32], at: &mut [u32], out: &mut Vec<u8>) -> bool {
        line_of(self, row, slots, at, out)
    }
}

/// Paths the builder's cutter keeps numbered from block to block before it starts again.
const MAX_CUTTER_PATHS: usize = 1 << 16;

/// Builds a block from stored lines. Reused from block to block.
#[derive(Default)]
pub struct BlockBuilder {
    pub block: Block,
    templates: HashMap<Box<[u8]>, u32, foldhash::fast::RandomState>,
    services: HashMap<Box<[u8]>, u32, foldhash::fast::RandomState>,
    columns: HashMap<String, u32>,
    /// The column of each of the cutter's path numbers, in this block.
    column_of_path: Vec<Option<u32>>,
    /// The column of each variable of each template.
    slots: Vec<Vec<u32>>,
    cutter: Cutter,
    template: Vec<u8>,
    vars: Vec<Variable>,
}

/// A line the store cannot read at all (not an entry).
#[derive(Debug, thiserror::Error)]
#[error("not a stored entry: {0}")]
pub struct NotAnEntry(pub String);

/// What the store needs from a line that is not in the canonical form.
#[derive(Deserialize)]
struct HeadView<'a> {
    id: Uuid,
    timestamp: Timestamp,
    level: LogLevel,
    #[serde(borrow)]
    service: &'a serde_json::value::RawValue,
}

impl BlockBuilder {
    pub fn rows(&self) -> usize {
        self.block.rows()
    }

    /// Adds the stored line of the entry at WAL position `seq`.
    pub fn push(&mut self, line: &[u8], seq: u64) -> Result<(), NotAnEntry> {
        self.template.clear();
        self.vars.clear();
        let (id, ts, level, service, text): (Uuid, Timestamp, LogLevel, &[u8], &[u8]) =
            match template::split_line(line) {
                Some((head, rest)) => {
                    self.cutter
                        .cut(rest, true, &mut self.template, &mut self.vars);
                    (head.id, head.ts, head.level, head.service, rest)
                }
                None => {
                    let head: HeadView<'_> =
                        serde_json::from_slice(line).map_err(|e| NotAnEntry(e.to_string()))?;
                    self.template.push(WHOLE_LINE);
                    self.cutter
                        .cut(line, false, &mut self.template, &mut self.vars);
                    (
                        head.id,
                        head.timestamp,
                        head.level,
                        head.service.get().as_bytes(),
                        line,
                    )
                }
            };
        let block = &mut self.block;
        block.ts.push(ts.as_nanos());
        block.seq.push(seq);
        block.ids.push(id);
        block.levels.push(level.rank());
        block.raw_bytes += line.len() as u64;
        let service = match self.services.get(service) {
            Some(&n) => n,
            None => {
                let n = block.services.len() as u32;
                block.services.push(service.into());
                block.service_counts.push(0);
                self.services.insert(service.into(), n);
                n
            }
        };
        block.service.push(service);
        block.service_counts[service as usize] += 1;
        let template = match self.templates.get(self.template.as_slice()) {
            Some(&n) => n,
            None => {
                let n = block.templates.len() as u32;
                block.templates.push(self.template.as_slice().into());
                self.templates.insert(self.template.as_slice().into(), n);
                // Each variable's column, by its path (the same for every row of a template).
                let mut slots = Vec::with_capacity(self.vars.len());
                for v in &self.vars {
                    let id = v.path as usize;
                    if self.column_of_path.len() <= id {
                        self.column_of_path.resize(id + 1, None);
                    }
                    let column = match self.column_of_path[id] {
                        Some(c) => c,
                        None => {
                            let c = column_for(
                                &mut self.columns,
                                &mut block.paths,
                                &mut block.columns,
                                self.cutter.path(v.path),
                            );
                            self.column_of_path[id] = Some(c);
                            c
                        }
                    };
                    if block.numeric.len() < block.columns.len() {
                        block.numeric.resize(block.columns.len(), true);
                    }
                    // A number counts as the field's value when it is the path's only
                    // variable in the row (not an array of them).
                    let repeated = slots.contains(&column);
                    block.numeric[column as usize] &= v.number && !repeated;
                    slots.push(column);
                }
                self.slots.push(slots);
                n
            }
        };
        block.template.push(template);
        for (var, column) in self.vars.iter().zip(&self.slots[template as usize]) {
            block.columns[*column as usize].push(&text[var.range.clone()]);
        }
        Ok(())
    }

    /// The block built so far, and a fresh builder.
    pub fn take(&mut self) -> Block {
        self.templates.clear();
        self.services.clear();
        self.columns.clear();
        self.column_of_path.clear();
        self.slots.clear();
        // Path numbers mean something only within a block (`column_of_path` is cleared), so
        // the cutter may start again: keys chosen by clients cannot grow it without end.
        if self.cutter.paths() > MAX_CUTTER_PATHS {
            self.cutter = Cutter::default();
        }
        std::mem::take(&mut self.block)
    }

    /// The variable columns of each template of the block being built.
    pub fn slots(&self) -> &[Vec<u32>] {
        &self.slots
    }
}

fn column_for(
    columns: &mut HashMap<String, u32>,
    paths: &mut Vec<String>,
    data: &mut Vec<VarColumn>,
    path: &str,
) -> u32 {
    if let Some(&n) = columns.get(path) {
        return n;
    }
    let name = if paths.len() + 1 < MAX_COLUMNS {
        path
    } else {
        OTHER_PATHS
    };
    if let Some(&n) = columns.get(name) {
        columns.insert(path.to_string(), n);
        return n;
    }
    let n = paths.len() as u32;
    paths.push(name.to_string());
    data.push(VarColumn::default());
    columns.insert(name.to_string(), n);
    if name != path {
        columns.insert(path.to_string(), n);
    }
    n
}

/// The variable columns of each template, from the templates and the block's paths (what the
/// builder knew as it went, worked out again for a block read from disk).
pub fn template_slots(templates: &[Box<[u8]>], paths: &[String]) -> Vec<Vec<u32>> {
    let by_path: HashMap<&str, u32> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_str(), i as u32))
        .collect();
    let other = by_path.get(OTHER_PATHS).copied().unwrap_or(0);
    templates
        .iter()
        .map(|t| {
            let mut slots = Vec::new();
            for value in template::values(t) {
                for piece in &value.pieces {
                    if let Piece::Var(_) = piece {
                        slots.push(by_path.get(value.path.as_str()).copied().unwrap_or(other));
                    }
                }
            }
            slots
        })
        .collect()
}

/// Puts row `row`'s stored line back together.
fn line_of(block: &Block, row: usize, slots: &[u32], at: &mut [u32], out: &mut Vec<u8>) -> bool {
    let template = &block.templates[block.template[row] as usize];
    let columns = &block.columns;
    let mut n = 0;
    let mut var = |_: usize| {
        let column = *slots.get(n)? as usize;
        n += 1;
        let position = at.get_mut(column)?;
        let value = columns.get(column)?.get(*position as usize)?;
        *position += 1;
        Some(value)
    };
    match template.strip_prefix(&[WHOLE_LINE]) {
        Some(whole) => template::fill(whole, &mut var, out),
        None => {
            let level = LogLevel::ALL
                .iter()
                .find(|l| l.rank() == block.levels[row])
                .copied()
                .unwrap_or(LogLevel::Info);
            template::write_head(
                out,
                &block.ids[row],
                Timestamp::from_nanos(block.ts[row]),
                level,
                &block.services[block.service[row] as usize],
            );
            template::fill(template, &mut var, out)
        }
    }
}

/// The number of variables per column of each template: how far a row moves each column's
/// position.
pub fn slot_counts(slots: &[Vec<u32>], columns: usize) -> Vec<Vec<(u32, u32)>> {
    slots
        .iter()
        .map(|s| {
            let mut counts: Vec<(u32, u32)> = Vec::new();
            for &c in s {
                match counts.iter_mut().find(|(col, _)| *col == c) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((c, 1)),
                }
            }
            counts.retain(|(c, _)| (*c as usize) < columns);
            counts
        })
        .collect()
}

// --- encoding ---

fn put_varint(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut n = 0u64;
    let mut shift = 0;
    loop {
        let b = *bytes.get(*at)?;
        *at += 1;
        if shift > 63 {
            return None;
        }
        n |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(n);
        }
        shift += 7;
    }
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// Signed deltas, as varints.
pub fn encode_deltas(values: impl Iterator<Item = i64>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut previous = 0i64;
    for v in values {
        put_varint(zigzag(v.wrapping_sub(previous)), &mut out);
        previous = v;
    }
    out
}

pub fn decode_deltas(bytes: &[u8], rows: usize) -> Option<Vec<i64>> {
    let mut out = Vec::with_capacity(rows);
    let mut at = 0;
    let mut previous = 0i64;
    for _ in 0..rows {
        previous = previous.wrapping_add(unzigzag(get_varint(bytes, &mut at)?));
        out.push(previous);
    }
    (at == bytes.len()).then_some(out)
}

pub fn encode_varints(values: impl Iterator<Item = u32>) -> Vec<u8> {
    let mut out = Vec::new();
    for v in values {
        put_varint(u64::from(v), &mut out);
    }
    out
}

pub fn decode_varints(bytes: &[u8], rows: usize) -> Option<Vec<u32>> {
    let mut out = Vec::with_capacity(rows);
    let mut at = 0;
    for _ in 0..rows {
        out.push(u32::try_from(get_varint(bytes, &mut at)?).ok()?);
    }
    (at == bytes.len()).then_some(out)
}

/// Distinct values a numeric column may have and still be counted, whatever the block's rows.
pub const FEW_NUMBERS: usize = 4096;

/// How many rows of a block each template and each (service, level) has: what answers a
/// count over a whole block without reading its columns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockCounts {
    /// (template number, rows), by template number.
    pub templates: Vec<(u32, u32)>,
    /// (service number, level rank, rows).
    pub service_levels: Vec<(u32, u8, u32)>,
    /// Value counts of numeric paths ([`count_numbers`]), in parts written before they got a
    /// frame of their own (empty in newer parts: a count by template need not decode them).
    pub numbers: NumberCounts,
}

impl BlockCounts {
    /// The counts of rows with these template numbers, services and levels.
    pub fn of(templates: impl Iterator<Item = u32>, service: &[u32], levels: &[u8]) -> BlockCounts {
        let mut by_template: HashMap<u32, u32> = HashMap::new();
        for t in templates {
            *by_template.entry(t).or_default() += 1;
        }
        let mut by_service_level: HashMap<(u32, u8), u32> = HashMap::new();
        for (s, l) in service.iter().zip(levels) {
            *by_service_level.entry((*s, *l)).or_default() += 1;
        }
        let mut templates: Vec<(u32, u32)> = by_template.into_iter().collect();
        templates.sort_unstable();
        let mut service_levels: Vec<(u32, u8, u32)> = by_service_level
            .into_iter()
            .map(|((s, l), n)| (s, l, n))
            .collect();
        service_levels.sort_unstable();
        BlockCounts {
            templates,
            service_levels,
            numbers: Vec::new(),
        }
    }

    /// Varints: the number of templates, then (template, rows) pairs; the number of
    /// (service, level) pairs, then (service, level, rows) triples.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 * self.templates.len() + 16);
        put_varint(self.templates.len() as u64, &mut out);
        for (t, n) in &self.templates {
            put_varint(u64::from(*t), &mut out);
            put_varint(u64::from(*n), &mut out);
        }
        put_varint(self.service_levels.len() as u64, &mut out);
        for (s, l, n) in &self.service_levels {
            put_varint(u64::from(*s), &mut out);
            put_varint(u64::from(*l), &mut out);
            put_varint(u64::from(*n), &mut out);
        }
        put_numbers(&self.numbers, &mut out);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<BlockCounts> {
        let mut at = 0;
        let next = |at: &mut usize| u32::try_from(get_varint(bytes, at)?).ok();
        let n = next(&mut at)? as usize;
        let mut templates = Vec::with_capacity(n.min(bytes.len()));
        for _ in 0..n {
            templates.push((next(&mut at)?, next(&mut at)?));
        }
        let n = next(&mut at)? as usize;
        let mut service_levels = Vec::with_capacity(n.min(bytes.len()));
        for _ in 0..n {
            service_levels.push((
                next(&mut at)?,
                u8::try_from(next(&mut at)?).ok()?,
                next(&mut at)?,
            ));
        }
        let numbers = get_numbers(bytes, &mut at)?;
        (at == bytes.len()).then_some(BlockCounts {
            templates,
            service_levels,
            numbers,
        })
    }
}

/// Per numeric path of a block: each value and its rows, by value ([`count_numbers`]).
pub type NumberCounts = Vec<(String, Vec<(f64, u32)>)>;

/// The value counts of the block's numeric columns that have at most a quarter as many
/// distinct values as rows (where counts are smaller than the values), or at most
/// [`FEW_NUMBERS`] (so a small block, the last of a flush, is counted too: analytics would
/// otherwise read its rows).
pub fn count_numbers(block: &Block) -> NumberCounts {
    let most = (block.rows() / 4).max(FEW_NUMBERS);
    let mut numbers = Vec::new();
    for (c, column) in block.columns.iter().enumerate() {
        if !block.numeric.get(c).copied().unwrap_or(false) || block.paths[c] == OTHER_PATHS {
            continue;
        }
        let mut by_text: HashMap<&[u8], u32> = HashMap::new();
        for i in 0..column.len() {
            *by_text
                .entry(column.get(i).unwrap_or_default())
                .or_default() += 1;
            if by_text.len() > most {
                break;
            }
        }
        if by_text.len() > most {
            continue;
        }
        let values: Option<Vec<(f64, u32)>> = by_text
            .into_iter()
            .map(|(text, n)| {
                let v = std::str::from_utf8(text).ok()?.parse::<f64>().ok()?;
                v.is_finite().then_some((v, n))
            })
            .collect();
        if let Some(mut values) = values {
            values.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
            numbers.push((block.paths[c].clone(), values));
        }
    }
    numbers
}

/// Value counts as bytes: the number of paths, then per path its length and text, the number
/// of values, and (f64 little-endian, rows varint) per value.
pub fn put_numbers(numbers: &NumberCounts, out: &mut Vec<u8>) {
    put_varint(numbers.len() as u64, out);
    for (path, values) in numbers {
        put_varint(path.len() as u64, out);
        out.extend_from_slice(path.as_bytes());
        put_varint(values.len() as u64, out);
        for (v, n) in values {
            out.extend_from_slice(&v.to_le_bytes());
            put_varint(u64::from(*n), out);
        }
    }
}

pub fn get_numbers(bytes: &[u8], at: &mut usize) -> Option<NumberCounts> {
    let next = |at: &mut usize| u32::try_from(get_varint(bytes, at)?).ok();
    let n = next(at)? as usize;
    let mut numbers = Vec::with_capacity(n.min(bytes.len()));
    for _ in 0..n {
        let len = next(at)? as usize;
        let path = std::str::from_utf8(bytes.get(*at..at.checked_add(len)?)?).ok()?;
        *at += len;
        let count = next(at)? as usize;
        let mut values = Vec::with_capacity(count.min(bytes.len()));
        for _ in 0..count {
            let v = f64::from_le_bytes(bytes.get(*at..*at + 8)?.try_into().ok()?);
            *at += 8;
            values.push((v, next(at)?));
        }
        numbers.push((path.to_string(), values));
    }
    Some(numbers)
}

/// Ids: a flag byte per row (1: a UUIDv7 of the row's own millisecond, stored as its 10
/// random bytes) followed by the ids' bytes.
pub fn encode_ids(ids: &[Uuid], ts: &[i64]) -> Vec<u8> {
    let mut flags = Vec::with_capacity(ids.len());
    let mut bytes = Vec::with_capacity(ids.len() * 10);
    for (id, ts) in ids.iter().zip(ts) {
        if derivable(id, *ts) {
            flags.push(1);
            bytes.extend_from_slice(&id.as_bytes()[6..]);
        } else {
            flags.push(0);
            bytes.extend_from_slice(id.as_bytes());
        }
    }
    flags.extend_from_slice(&bytes);
    flags
}

/// Whether the id is a UUIDv7 whose 48-bit time is the row's millisecond.
pub fn derivable(id: &Uuid, ts: i64) -> bool {
    id.get_version_num() == 7 && millis_of(id) == ts.div_euclid(1_000_000) as u64
}

fn millis_of(id: &Uuid) -> u64 {
    let b = id.as_bytes();
    u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
}

pub fn decode_ids(bytes: &[u8], ts: &[i64]) -> Option<Vec<Uuid>> {
    let rows = ts.len();
    let flags = bytes.get(..rows)?;
    let mut at = rows;
    let mut out = Vec::with_capacity(rows);
    for (flag, ts) in flags.iter().zip(ts) {
        let id = if *flag == 1 {
            let mut b = [0u8; 16];
            let millis = (ts.div_euclid(1_000_000) as u64).to_be_bytes();
            b[..6].copy_from_slice(&millis[2..]);
            b[6..].copy_from_slice(bytes.get(at..at + 10)?);
            at += 10;
            Uuid::from_bytes(b)
        } else {
            let id = Uuid::from_slice(bytes.get(at..at + 16)?).ok()?;
            at += 16;
            id
        };
        out.push(id);
    }
    (at == bytes.len()).then_some(out)
}

/// Templates (or any byte strings without 0 bytes), each followed by a 0 byte.
pub fn encode_strings<'a>(items: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(item);
        out.push(0);
    }
    out
}

pub fn decode_strings(bytes: &[u8]) -> Vec<Box<[u8]>> {
    split_zero(bytes).map(Into::into).collect()
}

fn split_zero(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0;
    memchr::memchr_iter(0, bytes).map(move |end| {
        let item = &bytes[at..end];
        at = end + 1;
        item
    })
}

/// The Bloom filter of a block: every word of every variable (whatever its path: one probe
/// answers a search anywhere, and a search on a field checks the field's column after), and
/// the ids the store cannot find by their timestamp.
pub fn bloom_of(block: &Block) -> Bloom {
    let mut hashes = bloom::HashSet::default();
    for column in &block.columns {
        // Values are separated by 0 bytes, which no word holds: one pass cuts them all.
        if column.data.is_ascii() {
            bloom::for_each_word_hash(&column.data, |hash| {
                hashes.insert(hash);
            });
            continue;
        }
        for value in column.data.split(|&b| b == 0) {
            bloom::for_each_word_hash(value, |hash| {
                hashes.insert(hash);
            });
        }
    }
    for (id, ts) in block.ids.iter().zip(&block.ts) {
        if !derivable(id, *ts) {
            hashes.insert(bloom::id_hash(id));
        }
    }
    let mut filter = Bloom::with_capacity(hashes.len());
    for hash in hashes {
        filter.insert(hash);
    }
    filter
}

/// The words (runs of alphanumerics) of a variable, as search cuts them.
pub fn words_of(value: &[u8]) -> impl Iterator<Item = &str> {
    let text = std::str::from_utf8(value).unwrap_or("");
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
}

/// Lazily decoded parts of a block read from disk.
#[derive(Default)]
pub struct Lazy<T>(OnceLock<T>);

impl<T> Lazy<T> {
    pub fn get_or_try<E>(&self, make: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
        if let Some(v) = self.0.get() {
            return Ok(v);
        }
        let v = make()?;
        Ok(self.0.get_or_init(|| v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chosen_by_clients_do_not_grow_the_builder_without_end() {
        let mut builder = BlockBuilder::default();
        let mut most = 0;
        for b in 0..3u64 {
            let mut first = None;
            for i in 0..MAX_CUTTER_PATHS as u64 / 2 + 10 {
                let n = (b * 1_000_000 + i) as usize;
                // Every line brings a key of its own.
                let text =
                    line(n).replacen(r#""message""#, &format!(r#""k{n}":"v{n}x","message""#), 1);
                builder.push(text.as_bytes(), n as u64).unwrap();
                first.get_or_insert(text);
            }
            let slots = builder.slots().to_vec();
            let block = builder.take();
            most = most.max(builder.cutter.paths());
            // The block reads back whatever the cutter's numbering was.
            let mut out = Vec::new();
            let mut at = vec![0u32; block.columns.len()];
            assert!(block.line(0, &slots[block.template[0] as usize], &mut at, &mut out));
            assert_eq!(Some(String::from_utf8(out).unwrap()), first, "block {b}");
        }
        assert!(most <= MAX_CUTTER_PATHS, "{most} paths kept");
    }

    proptest::proptest! {
        #[test]
        fn zero_bytes_are_found_as_memchr_finds_them(data in proptest::collection::vec(
            proptest::prop_oneof![proptest::prelude::Just(0u8), proptest::prelude::Just(1u8), proptest::prelude::Just(0x80u8), proptest::prelude::Just(0x7fu8), proptest::prelude::any::<u8>()],
            0..100,
        )) {
            let mut found = Vec::new();
            zero_bytes(&data, |i| found.push(i));
            proptest::prop_assert_eq!(found, memchr::memchr_iter(0, &data).collect::<Vec<_>>());
        }
    }

    fn line(i: usize) -> String {
        let id = logging_common::id::new_log_id(Timestamp::from_nanos(
            1_800_000_000_000_000_000 + i as i64 * 1_000_003,
        ));
        format!(
            r#"{{"id":"{id}","timestamp":"{}","level":"{}","service":"svc-{}","message":"request {i} served in {} ms","context":{{"path":"/api/v1/items/{}","status":{}}},"request_id":"req-{i:08x}","created_at":"2026-11-27T04:00:00Z"}}"#,
            Timestamp::from_nanos(1_800_000_000_000_000_000 + i as i64 * 1_000_003).to_rfc3339(),
            ["info", "error", "debug"][i % 3],
            i % 4,
            i * 7 % 1000,
            i % 97,
            [200, 404, 500][i % 3]
        )
    }

    #[test]
    fn lines_go_in_and_come_back_byte_for_byte() {
        let mut builder = BlockBuilder::default();
        let mut lines: Vec<String> = (0..500).map(line).collect();
        // A line whose head is not canonical, and one that is not JSON the cutter reads.
        lines.push(r#"{"level":"info","id":"01a21af2-0b80-7a74-a3ba-88d4f077a5ad","timestamp":"2026-11-27T03:00:00Z","service":"odd","message":"m 1"}"#.to_string());
        for (i, l) in lines.iter().enumerate() {
            builder.push(l.as_bytes(), 100 + i as u64).unwrap();
        }
        assert!(builder.push(b"not json", 9).is_err());
        let slots = builder.slots().to_vec();
        let block = builder.take();
        assert_eq!(block.rows(), lines.len());
        assert!(
            block.templates.len() < 20,
            "{} templates",
            block.templates.len()
        );
        assert_eq!(template_slots(&block.templates, &block.paths), slots);
        let counts = slot_counts(&slots, block.columns.len());
        let mut at = vec![0u32; block.columns.len()];
        for (row, expected) in lines.iter().enumerate() {
            let mut out = Vec::new();
            let t = block.template[row] as usize;
            let mut mine = at.clone();
            assert!(block.line(row, &slots[t], &mut mine, &mut out));
            assert_eq!(String::from_utf8(out).unwrap(), *expected);
            for (c, n) in &counts[t] {
                at[*c as usize] += n;
            }
            assert_eq!(mine, at);
        }
        let summary = block.summary();
        assert_eq!(summary.services.len(), 5);
        assert_eq!(
            summary.levels,
            1 << LogLevel::Info.rank() | 1 << LogLevel::Error.rank() | 1 << LogLevel::Debug.rank()
        );
    }

    #[test]
    fn columns_encode_and_decode() {
        let ts = vec![5, 3, i64::MAX, i64::MIN, 0, -7];
        assert_eq!(
            decode_deltas(&encode_deltas(ts.iter().copied()), ts.len()).unwrap(),
            ts
        );
        let v = vec![0u32, 1, 300, u32::MAX];
        assert_eq!(
            decode_varints(&encode_varints(v.iter().copied()), 4).unwrap(),
            v
        );
        assert!(decode_varints(&[0x80], 1).is_none());
        let ts = vec![1_800_000_000_123_456_789, 1_800_000_000_000_000_000];
        let ids = vec![
            logging_common::id::new_log_id(Timestamp::from_nanos(ts[0])),
            Uuid::new_v4(),
        ];
        let encoded = encode_ids(&ids, &ts);
        assert_eq!(encoded.len(), 2 + 10 + 16);
        assert_eq!(decode_ids(&encoded, &ts).unwrap(), ids);
        let strings: Vec<&[u8]> = vec![b"a", b"", b"\x01b"];
        let back = decode_strings(&encode_strings(strings.iter().copied()));
        assert_eq!(back.iter().map(|b| &b[..]).collect::<Vec<_>>(), strings);
    }
}
