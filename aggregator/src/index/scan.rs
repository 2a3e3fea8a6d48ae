//! How a read finds its rows: a filter and a `q` tree compiled against one block at a time.
//!
//! For each block, from its summary alone: is its time range, are its levels and services,
//! any use? Then each term of the query is decided once per **template** where the template
//! settles it: a word without digits can only be a template word, so "does this row say
//! `declined`" is "does its template", asked once per template and answered for every row by
//! its template number. Only terms that depend on variables (words with digits, ids, values
//! of keyword fields that hold variables, fragments) look at the row's variables, and a
//! block's Bloom filter turns most blocks away for those before any variable is read. Counting
//! a common word over millions of rows therefore costs a byte per row, and finding a rare id
//! costs the few blocks whose filter says "maybe".

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use logging_common::LogLevel;
use uuid::Uuid;

use super::block::{Block, BlockCounts, BlockError, NumberCounts, Summary, VarColumn, slot_counts};
use super::bloom::{self, Bloom};
use super::part::Part;
use super::query::{LogFilter, Order, SortPosition};
use super::query_language::{Field, Match, Node, Pattern, words};
use super::template::{self, Piece, Value, WHOLE_LINE, is_template_word};

/// Paths that are not searched by a term without a field: they are not the entry's content.
const NOT_CONTENT: [&str; 5] = ["created_at", "timestamp", "id", "level", "service"];

/// A block, in memory or in a part, with its columns decoded as a query asks for them.
pub struct View<'a> {
    summary: Cow<'a, Summary>,
    memory: Option<(&'a Block, &'a [Vec<u32>])>,
    disk: Option<(&'a Arc<Part>, usize)>,
    ts: OnceLock<Cow<'a, [i64]>>,
    seq: OnceLock<Cow<'a, [u64]>>,
    ids: OnceLock<Cow<'a, [Uuid]>>,
    levels: OnceLock<Cow<'a, [u8]>>,
    service: OnceLock<Cow<'a, [u32]>>,
    template: OnceLock<Cow<'a, [u32]>>,
    /// The templates, and for each of their paths the block's column (where it is not the
    /// path's own number).
    templates: OnceLock<(Arc<TemplateSet>, Option<Vec<u32>>)>,
    columns: Vec<OnceLock<Cow<'a, VarColumn>>>,
    bloom: OnceLock<Option<Bloom>>,
    counts: OnceLock<Option<BlockCounts>>,
    numbers: OnceLock<Option<NumberCounts>>,
}

/// What a query needs of one template.
pub struct TemplateInfo {
    pub text: Box<[u8]>,
    pub values: Vec<Placed>,
    /// The path (a number in its set's `paths`) of each variable.
    pub slots: Vec<u32>,
    /// Variables per path: how far a row of this template moves each path's column.
    pub counts: Vec<(u32, u32)>,
}

/// A value of a template. Its shape (the path and the pieces, variables numbered from 0
/// within the value) is kept once per set: the thousands of templates of a part are made of a
/// few hundred values (a service's messages times the optional fields it sets), and a query
/// decides each shape once.
pub struct Placed {
    /// The shape's number in its set.
    pub shape: u32,
    pub value: Arc<Value>,
    /// The template's number of the value's first variable.
    pub first: u32,
}

/// Templates prepared for queries, with the paths their variables are filed under.
pub struct TemplateSet {
    pub infos: Vec<TemplateInfo>,
    pub paths: Vec<String>,
    /// The distinct values of the templates, by shape number.
    pub shapes: Vec<Arc<Value>>,
    /// Each shape's words, lower-cased, `None` where a variable stands (what terms are
    /// matched against), worked out once.
    tokens: Vec<Box<[Option<Box<str>>]>>,
    /// For each shape, the templates that hold it.
    by_shape: Vec<Vec<u32>>,
    /// Each template's message pattern, worked out the first time analytics asks.
    patterns: OnceLock<Vec<Option<Box<str>>>>,
    /// The words of every JSON key the templates hold, worked out the first time asked.
    key_words: OnceLock<Box<[Box<str>]>>,
}

/// Gathers a set's distinct values.
#[derive(Default)]
struct Shapes {
    all: Vec<Arc<Value>>,
    tokens: Vec<Box<[Option<Box<str>>]>>,
    numbers: HashMap<Arc<Value>, u32>,
}

impl Shapes {
    fn place(&mut self, mut value: Value) -> Placed {
        let first = value
            .pieces
            .iter()
            .find_map(|p| match p {
                Piece::Var(k) => Some(*k),
                Piece::Text(_) => None,
            })
            .unwrap_or(0);
        for piece in &mut value.pieces {
            if let Piece::Var(k) = piece {
                *k -= first;
            }
        }
        let shape = match self.numbers.get(&value) {
            Some(&n) => n,
            None => {
                let n = self.all.len() as u32;
                self.tokens.push(template_tokens(&value).into_boxed_slice());
                let value = Arc::new(value);
                self.all.push(value.clone());
                self.numbers.insert(value, n);
                n
            }
        };
        Placed {
            shape,
            value: self.all[shape as usize].clone(),
            first: first as u32,
        }
    }
}

/// For each of `shapes` shapes, the templates (by number) that hold it.
fn by_shape(infos: &[TemplateInfo], shapes: usize) -> Vec<Vec<u32>> {
    let mut by_shape = vec![Vec::new(); shapes];
    for (t, info) in infos.iter().enumerate() {
        for placed in &info.values {
            if let Some(list) = by_shape.get_mut(placed.shape as usize)
                && list.last() != Some(&(t as u32))
            {
                list.push(t as u32);
            }
        }
    }
    by_shape
}

impl TemplateSet {
    /// A part's dictionary: paths numbered as the templates name them.
    pub fn new(texts: Vec<Box<[u8]>>) -> TemplateSet {
        let mut paths: Vec<String> = Vec::new();
        let mut numbers: HashMap<String, u32> = HashMap::new();
        let mut all_slots = Vec::with_capacity(texts.len());
        let mut all_values = Vec::with_capacity(texts.len());
        let mut shapes = Shapes::default();
        for text in &texts {
            let values = template::values(text);
            let mut slots = Vec::new();
            for value in &values {
                let vars = value
                    .pieces
                    .iter()
                    .filter(|p| matches!(p, Piece::Var(_)))
                    .count();
                if vars == 0 {
                    continue;
                }
                let n = match numbers.get(&value.path) {
                    Some(&n) => n,
                    None => {
                        let n = paths.len() as u32;
                        paths.push(value.path.clone());
                        numbers.insert(value.path.clone(), n);
                        n
                    }
                };
                slots.extend(std::iter::repeat_n(n, vars));
            }
            all_slots.push(slots);
            all_values.push(values.into_iter().map(|v| shapes.place(v)).collect());
        }
        let columns = paths.len();
        let infos = texts
            .into_iter()
            .zip(all_slots)
            .zip(all_values)
            .map(|((text, slots), values)| TemplateInfo::with_values(text, values, slots, columns))
            .collect::<Vec<_>>();
        TemplateSet {
            paths,
            by_shape: by_shape(&infos, shapes.all.len()),
            infos,
            shapes: shapes.all,
            tokens: shapes.tokens,
            patterns: OnceLock::new(),
            key_words: OnceLock::new(),
        }
    }

    /// Each template's message pattern (see [`super::patterns`]), from the template alone:
    /// each variable read as a digit, which the pattern masks anyway. `None` for a template
    /// without a text message.
    pub fn message_patterns(&self) -> &[Option<Box<str>>] {
        self.patterns.get_or_init(|| {
            let mut by_shape: HashMap<u32, Box<str>> = HashMap::new();
            self.infos
                .iter()
                .map(|info| {
                    let message = info.message()?;
                    let pattern = by_shape.entry(message.shape).or_insert_with(|| {
                        let shape: String = message
                            .value
                            .pieces
                            .iter()
                            .map(|p| match p {
                                Piece::Text(t) => t.as_str(),
                                Piece::Var(_) => "0",
                            })
                            .collect();
                        super::patterns::template(&shape).into_boxed_str()
                    });
                    Some(pattern.clone())
                })
                .collect()
        })
    }

    /// The lower-cased words of every key (at any depth) of the templates' JSON: what a text
    /// search over whole lines can match that the values' words cannot.
    pub fn key_words(&self) -> &[Box<str>] {
        self.key_words.get_or_init(|| {
            let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
            for shape in &self.shapes {
                seen.extend(words(&shape.path));
            }
            seen.into_iter().map(String::into_boxed_str).collect()
        })
    }

    /// A block's own templates, their variables in the block's columns.
    fn of_block(texts: Vec<Box<[u8]>>, slots: Vec<Vec<u32>>, paths: &[String]) -> TemplateSet {
        let columns = paths.len();
        let mut shapes = Shapes::default();
        let infos = texts
            .into_iter()
            .zip(slots)
            .map(|(text, slots)| {
                let values = template::values(&text)
                    .into_iter()
                    .map(|v| shapes.place(v))
                    .collect();
                TemplateInfo::with_values(text, values, slots, columns)
            })
            .collect::<Vec<_>>();
        TemplateSet {
            paths: paths.to_vec(),
            by_shape: by_shape(&infos, shapes.all.len()),
            infos,
            shapes: shapes.all,
            tokens: shapes.tokens,
            patterns: OnceLock::new(),
            key_words: OnceLock::new(),
        }
    }

    /// About what it takes in memory.
    pub fn bytes(&self) -> usize {
        let shapes: usize = self
            .shapes
            .iter()
            .map(|v| {
                96 + v.path.len()
                    + v.pieces
                        .iter()
                        .map(|p| match p {
                            Piece::Text(t) => 32 + t.len(),
                            Piece::Var(_) => 32,
                        })
                        .sum::<usize>()
            })
            .sum();
        let infos: usize = self
            .infos
            .iter()
            .map(|info| {
                96 + info.text.len()
                    + 20 * info.values.len()
                    + 4 * info.slots.len()
                    + 8 * info.counts.len()
            })
            .sum();
        shapes + infos
    }
}

impl<'a> View<'a> {
    pub fn memory(block: &'a Block, slots: &'a [Vec<u32>], summary: Cow<'a, Summary>) -> View<'a> {
        View::new(summary, Some((block, slots)), None)
    }

    pub fn disk(part: &'a Arc<Part>, block: usize) -> View<'a> {
        View::new(
            Cow::Borrowed(&part.blocks[block].summary),
            None,
            Some((part, block)),
        )
    }

    fn new(
        summary: Cow<'a, Summary>,
        memory: Option<(&'a Block, &'a [Vec<u32>])>,
        disk: Option<(&'a Arc<Part>, usize)>,
    ) -> View<'a> {
        let columns = (0..summary.paths.len()).map(|_| OnceLock::new()).collect();
        View {
            summary,
            memory,
            disk,
            ts: OnceLock::new(),
            seq: OnceLock::new(),
            ids: OnceLock::new(),
            levels: OnceLock::new(),
            service: OnceLock::new(),
            template: OnceLock::new(),
            templates: OnceLock::new(),
            columns,
            bloom: OnceLock::new(),
            counts: OnceLock::new(),
            numbers: OnceLock::new(),
        }
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    pub fn rows(&self) -> usize {
        self.summary.rows as usize
    }

    pub fn ts(&self) -> Result<&[i64], BlockError> {
        cell(&self.ts, || match (self.memory, self.disk) {
            (Some((b, _)), _) => Ok(Cow::Borrowed(&b.ts[..])),
            (_, Some((p, i))) => Ok(Cow::Owned(p.ts(i)?)),
            _ => Ok(Cow::Borrowed(&[][..])),
        })
    }

    pub fn seq(&self) -> Result<&[u64], BlockError> {
        cell(&self.seq, || match (self.memory, self.disk) {
            (Some((b, _)), _) => Ok(Cow::Borrowed(&b.seq[..])),
            (_, Some((p, i))) => Ok(Cow::Owned(p.seq(i)?)),
            _ => Ok(Cow::Borrowed(&[][..])),
        })
    }

    pub fn ids(&self) -> Result<&[Uuid], BlockError> {
        if let Some(v) = self.ids.get() {
            return Ok(v);
        }
        let ids = match (self.memory, self.disk) {
            (Some((b, _)), _) => Cow::Borrowed(&b.ids[..]),
            (_, Some((p, i))) => Cow::Owned(p.ids(i, self.ts()?)?),
            _ => Cow::Borrowed(&[][..]),
        };
        Ok(self.ids.get_or_init(|| ids))
    }

    pub fn levels(&self) -> Result<&[u8], BlockError> {
        cell(&self.levels, || match (self.memory, self.disk) {
            (Some((b, _)), _) => Ok(Cow::Borrowed(&b.levels[..])),
            (_, Some((p, i))) => Ok(Cow::Owned(p.levels(i)?)),
            _ => Ok(Cow::Borrowed(&[][..])),
        })
    }

    pub fn service(&self) -> Result<&[u32], BlockError> {
        cell(&self.service, || match (self.memory, self.disk) {
            (Some((b, _)), _) => Ok(Cow::Borrowed(&b.service[..])),
            (_, Some((p, i))) => Ok(Cow::Owned(p.service(i)?)),
            _ => Ok(Cow::Borrowed(&[][..])),
        })
    }

    pub fn template(&self) -> Result<&[u32], BlockError> {
        cell(&self.template, || match (self.memory, self.disk) {
            (Some((b, _)), _) => Ok(Cow::Borrowed(&b.template[..])),
            (_, Some((p, i))) => Ok(Cow::Owned(p.template(i)?)),
            _ => Ok(Cow::Borrowed(&[][..])),
        })
    }

    pub fn templates(&self) -> Result<&[TemplateInfo], BlockError> {
        Ok(&self.template_set()?.0.infos)
    }

    /// The view's templates as a set.
    pub fn template_set_arc(&self) -> Result<Arc<TemplateSet>, BlockError> {
        Ok(self.template_set()?.0.clone())
    }

    /// How many paths the templates' variables are filed under (the length of a row's
    /// positions).
    pub fn path_count(&self) -> Result<usize, BlockError> {
        Ok(self.template_set()?.0.paths.len())
    }

    /// The paths the templates' variables are filed under, by number.
    pub fn paths(&self) -> Result<&[String], BlockError> {
        Ok(&self.template_set()?.0.paths)
    }

    fn template_set(&self) -> Result<&(Arc<TemplateSet>, Option<Vec<u32>>), BlockError> {
        if let Some(v) = self.templates.get() {
            return Ok(v);
        }
        let paths = &self.summary.paths;
        let set = match (self.memory, self.disk) {
            (Some((b, slots)), _) => (
                Arc::new(TemplateSet::of_block(
                    b.templates.clone(),
                    slots.to_vec(),
                    paths,
                )),
                None,
            ),
            (_, Some((p, _))) => {
                let set = p.templates()?;
                if paths.iter().any(|p| p == super::block::OTHER_PATHS) {
                    // A block with more paths than columns shares one column among several
                    // paths: its rows' positions are counted by the block's own columns.
                    let texts: Vec<Box<[u8]>> = set.infos.iter().map(|i| i.text.clone()).collect();
                    let slots = super::block::template_slots(&texts, paths);
                    (Arc::new(TemplateSet::of_block(texts, slots, paths)), None)
                } else {
                    let by_name: HashMap<&str, u32> = paths
                        .iter()
                        .enumerate()
                        .map(|(i, p)| (p.as_str(), i as u32))
                        .collect();
                    let map = set
                        .paths
                        .iter()
                        .map(|p| by_name.get(p.as_str()).copied().unwrap_or(u32::MAX))
                        .collect();
                    (set, Some(map))
                }
            }
            _ => (
                Arc::new(TemplateSet::of_block(Vec::new(), Vec::new(), &[])),
                None,
            ),
        };
        Ok(self.templates.get_or_init(|| set))
    }

    /// The part whose dictionary the view's templates are, numbered as there (what a query
    /// may cache per part).
    pub fn shared_templates(&self) -> Option<u64> {
        let (_, map) = self.templates.get()?;
        map.as_ref()?;
        self.disk.map(|(part, _)| part.id)
    }

    /// The variables of path number `path` (of the templates' paths), in row order.
    pub fn column(&self, path: usize) -> Result<&VarColumn, BlockError> {
        let column = match &self.template_set()?.1 {
            Some(map) => map.get(path).copied().unwrap_or(u32::MAX) as usize,
            None => path,
        };
        self.block_column(column)
    }

    /// The variables of the block's column `column` (of `summary().paths`), in row order.
    fn block_column(&self, column: usize) -> Result<&VarColumn, BlockError> {
        let Some(cell_) = self.columns.get(column) else {
            static EMPTY: VarColumn = VarColumn {
                data: Vec::new(),
                starts: Vec::new(),
            };
            return Ok(&EMPTY);
        };
        cell(cell_, || match (self.memory, self.disk) {
            (Some((b, _)), _) => Ok(Cow::Borrowed(&b.columns[column])),
            (_, Some((p, i))) => Ok(Cow::Owned(p.column(i, column)?)),
            _ => Ok(Cow::Owned(VarColumn::default())),
        })
    }

    pub fn bloom(&self) -> Result<Option<&Bloom>, BlockError> {
        self.read_once(&self.bloom, Part::bloom)
    }

    /// Rows per template and per (service, level), where the block is in a part that keeps
    /// them.
    pub fn counts(&self) -> Result<Option<&BlockCounts>, BlockError> {
        self.read_once(&self.counts, Part::counts)
    }

    /// The value counts of the block's numeric paths, where the block is in a part that keeps
    /// them.
    pub fn numbers(&self) -> Result<Option<&NumberCounts>, BlockError> {
        self.read_once(&self.numbers, Part::numbers)
    }

    /// What only a block on disk has, read from its part once (`None` for a block in memory).
    fn read_once<'s, T>(
        &'s self,
        cell: &'s OnceLock<Option<T>>,
        read: impl FnOnce(&Part, usize) -> Result<Option<T>, BlockError>,
    ) -> Result<Option<&'s T>, BlockError> {
        if let Some(v) = cell.get() {
            return Ok(v.as_ref());
        }
        let value = match self.disk {
            Some((p, i)) => read(p, i)?,
            None => None,
        };
        Ok(cell.get_or_init(|| value).as_ref())
    }

    /// Whether the block's Bloom filter may hold every one of `hashes` (true without one).
    pub fn bloom_allows(&self, hashes: &[u64]) -> Result<bool, BlockError> {
        if hashes.is_empty() {
            return Ok(true);
        }
        match (self.disk, self.bloom.get()) {
            (Some((p, i)), None) => p.bloom_allows(i, hashes),
            _ => Ok(match self.bloom()? {
                Some(bloom) => hashes.iter().all(|h| bloom.contains(*h)),
                None => true,
            }),
        }
    }

    /// The service name of service number `n`, decoded.
    pub fn service_name(&self, n: usize) -> String {
        self.summary
            .services
            .get(n)
            .map(|(json, _)| serde_json::from_str::<String>(json).unwrap_or_else(|_| json.clone()))
            .unwrap_or_default()
    }

    /// The stored lines of `rows` (ascending), in that order; those of a part restored from
    /// the archive say `"archived":true`.
    pub fn lines(&self, rows: &[usize]) -> Result<Vec<Vec<u8>>, BlockError> {
        let mut lines = self.stored_lines(rows)?;
        if self.disk.is_some_and(|(part, _)| part.archived) {
            for line in &mut lines {
                super::mark_archived(line);
            }
        }
        Ok(lines)
    }

    fn stored_lines(&self, rows: &[usize]) -> Result<Vec<Vec<u8>>, BlockError> {
        let templates = self.templates()?;
        let template = self.template()?;
        let ts = self.ts()?;
        let ids = self.ids()?;
        let levels = self.levels()?;
        let service = self.service()?;
        let corrupt = |row: usize| BlockError::Corrupt {
            file: "a block".into(),
            what: format!("row {row} asks for a variable its columns lack"),
        };
        let paths = self.path_count()?;
        let (Some(&first), Some(&last)) = (rows.first(), rows.last()) else {
            return Ok(Vec::new());
        };
        if self.rows().saturating_sub(first) < last {
            // The rows are near the end (the newest of a block in time order): where a row's
            // variables are, from the end of each column, walking back only past the rows
            // after it.
            let mut after = vec![0u32; paths];
            let mut out = Vec::with_capacity(rows.len());
            let mut wanted = rows.iter().rev().peekable();
            for row in (first..self.rows()).rev() {
                let info = &templates[template[row] as usize];
                for (c, n) in &info.counts {
                    after[*c as usize] += n;
                }
                if wanted.next_if(|w| **w == row).is_none() {
                    continue;
                }
                let mut mine = vec![0u32; paths];
                for &c in &info.slots {
                    let len = self.column(c as usize)?.len() as u32;
                    let (Some(at), Some(after)) = (mine.get_mut(c as usize), after.get(c as usize))
                    else {
                        return Err(corrupt(row));
                    };
                    *at = len.checked_sub(*after).ok_or_else(|| corrupt(row))?;
                }
                let mut line = Vec::new();
                if !self.write_line(row, info, &mut mine, ts, ids, levels, service, &mut line)? {
                    return Err(corrupt(row));
                }
                out.push(line);
            }
            out.reverse();
            return Ok(out);
        }
        let mut at = vec![0u32; paths];
        let mut out = Vec::with_capacity(rows.len());
        let mut wanted = rows.iter().peekable();
        for row in 0..self.rows() {
            let Some(&&next) = wanted.peek() else { break };
            let info = &templates[template[row] as usize];
            if row == next {
                wanted.next();
                let mut line = Vec::new();
                let mut mine = at.clone();
                if !self.write_line(row, info, &mut mine, ts, ids, levels, service, &mut line)? {
                    return Err(corrupt(row));
                }
                out.push(line);
            }
            for (c, n) in &info.counts {
                at[*c as usize] += n;
            }
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_line(
        &self,
        row: usize,
        info: &TemplateInfo,
        at: &mut [u32],
        ts: &[i64],
        ids: &[Uuid],
        levels: &[u8],
        service: &[u32],
        out: &mut Vec<u8>,
    ) -> Result<bool, BlockError> {
        let mut values: Vec<&[u8]> = Vec::with_capacity(info.slots.len());
        for &column in &info.slots {
            let c = self.column(column as usize)?;
            let Some(position) = at.get_mut(column as usize) else {
                return Ok(false);
            };
            let Some(v) = c.get(*position as usize) else {
                return Ok(false);
            };
            *position += 1;
            values.push(v);
        }
        let var = |i: usize| values.get(i).copied();
        Ok(match info.text.strip_prefix(&[WHOLE_LINE]) {
            Some(whole) => template::fill(whole, var, out),
            None => {
                let level = LogLevel::ALL
                    .iter()
                    .find(|l| l.rank() == levels[row])
                    .copied()
                    .unwrap_or(LogLevel::Info);
                let name = self
                    .summary
                    .services
                    .get(service[row] as usize)
                    .map(|(s, _)| s.as_bytes())
                    .unwrap_or(b"\"\"");
                template::write_head(
                    out,
                    &ids[row],
                    logging_common::Timestamp::from_nanos(ts[row]),
                    level,
                    name,
                );
                template::fill(&info.text, var, out)
            }
        })
    }

    /// Where row `row`'s variables start in each column.
    pub fn positions_at(&self, row: usize) -> Result<Vec<u32>, BlockError> {
        let templates = self.templates()?;
        let template = self.template()?;
        let mut at = vec![0u32; self.path_count()?];
        for t in template.iter().take(row) {
            if let Some(info) = templates.get(*t as usize) {
                for (c, n) in &info.counts {
                    at[*c as usize] += n;
                }
            }
        }
        Ok(at)
    }

    /// The text of a value of a row (its variables taken from `at`, the row's positions).
    pub fn value_text(
        &self,
        info: &TemplateInfo,
        value: &Placed,
        at: &[u32],
    ) -> Result<String, BlockError> {
        let mut text = String::new();
        for piece in &value.value.pieces {
            match piece {
                Piece::Text(t) => text.push_str(t),
                Piece::Var(k) => {
                    let k = &(value.first as usize + k);
                    let column = info.slots.get(*k).copied().unwrap_or(0) as usize;
                    // Earlier variables of the same row in the same column come first.
                    let before = info.slots[..*k]
                        .iter()
                        .filter(|c| **c as usize == column)
                        .count();
                    let position = at.get(column).copied().unwrap_or(0) as usize + before;
                    if let Some(v) = self.column(column)?.get(position) {
                        text.push_str(&String::from_utf8_lossy(v));
                    }
                }
            }
        }
        Ok(text)
    }
}

fn cell<'s, 'a, T: ?Sized + ToOwned>(
    cell: &'s OnceLock<Cow<'a, T>>,
    make: impl FnOnce() -> Result<Cow<'a, T>, BlockError>,
) -> Result<&'s T, BlockError> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let v = make()?;
    Ok(cell.get_or_init(|| v))
}

impl TemplateInfo {
    /// The entry's message, where it is text.
    pub fn message(&self) -> Option<&Placed> {
        self.values
            .iter()
            .find(|p| p.value.path == "message" && !p.value.number)
    }

    fn with_values(
        text: Box<[u8]>,
        values: Vec<Placed>,
        slots: Vec<u32>,
        columns: usize,
    ) -> TemplateInfo {
        let counts = slot_counts(std::slice::from_ref(&slots), columns)
            .pop()
            .unwrap_or_default();
        TemplateInfo {
            text,
            values,
            slots,
            counts,
        }
    }
}

/// A read's question, compiled once: row filters, and the tree of terms (`q` and the id and
/// tag filters, which are terms on their fields).
pub struct Compiled {
    /// `[start, end)` in nanoseconds.
    start: Option<i64>,
    end: Option<i64>,
    /// Only rows written at these WAL sequences (a tail's new arrivals).
    seqs: Option<std::ops::Range<u64>>,
    /// Bit `rank` for each level wanted.
    levels: u16,
    services: Option<Vec<String>>,
    expr: Option<Expr>,
    atoms: Vec<Match>,
    /// Whether any term looks at templates (the template column is needed).
    values: bool,
    /// Each term's plan for the templates of a part, made once per part and query (the
    /// blocks of a part share one dictionary).
    plans: parking_lot::Mutex<HashMap<(u64, usize), Arc<TemplatePlan>>>,
    held: parking_lot::Mutex<Option<Arc<TemplateSet>>>,
    /// Per part, where every term is decided by templates alone: the whole expression's
    /// answer for each template (`Some(true/false)`, `None` where a row decides).
    answers: parking_lot::Mutex<HashMap<u64, Arc<Vec<Option<bool>>>>>,
}

/// How a term is decided for each template of a set.
struct TemplatePlan {
    verdicts: Vec<Verdict>,
    /// For a term a single variable decides, by template: the (path, place in the row) of
    /// each variable the term looks at; `None` where the template needs the whole value's
    /// text instead.
    slots: Option<Vec<Option<HitSlots>>>,
}

/// The (path, place in the row) of each variable a term looks at in one template.
type HitSlots = Vec<(u32, u32)>;

/// The tree of a query, its terms numbered.
#[derive(Clone, Debug)]
enum Expr {
    Atom(usize),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
}

fn compile_node(node: &Node, atoms: &mut Vec<Match>) -> Expr {
    match node {
        Node::Match(m) => {
            atoms.push(m.clone());
            Expr::Atom(atoms.len() - 1)
        }
        Node::And(all) => Expr::And(all.iter().map(|n| compile_node(n, atoms)).collect()),
        Node::Or(any) => Expr::Or(any.iter().map(|n| compile_node(n, atoms)).collect()),
        Node::Not(inner) => Expr::Not(Box::new(compile_node(inner, atoms))),
    }
}

fn keyword(field: Field, value: &str) -> Node {
    Node::Match(Match {
        field,
        raw: value.to_string(),
        pattern: Pattern::Words(words(value).collect()),
    })
}

impl Compiled {
    pub fn new(filter: &LogFilter) -> Compiled {
        let mut levels = u16::MAX;
        if let Some(level) = filter.level {
            levels &= 1 << level.rank();
        }
        if let Some(min) = filter.min_level {
            levels &= LogLevel::ALL
                .iter()
                .filter(|l| l.rank() >= min.rank())
                .fold(0, |m, l| m | 1 << l.rank());
        }
        let mut terms = Vec::new();
        if let Some(node) = &filter.parsed {
            terms.push(node.clone());
        }
        for (field, value) in [
            (Field::TraceId, &filter.trace_id),
            (Field::RequestId, &filter.request_id),
            (Field::CorrelationId, &filter.correlation_id),
            (Field::UserId, &filter.user_id),
        ] {
            if let Some(value) = value {
                terms.push(keyword(field, value));
            }
        }
        for tag in &filter.tags {
            terms.push(keyword(Field::Tags, tag));
        }
        let mut atoms = Vec::new();
        let expr = match terms.len() {
            0 => None,
            1 => Some(compile_node(&terms[0], &mut atoms)),
            _ => Some(compile_node(&Node::And(terms), &mut atoms)),
        };
        let values = atoms
            .iter()
            .any(|m| !matches!(m.field, Field::Service | Field::Level | Field::Id));
        Compiled {
            start: filter.start.map(|t| t.as_nanos()),
            end: filter.end.map(|t| t.as_nanos()),
            seqs: None,
            levels,
            services: (!filter.services.is_empty()).then(|| filter.services.clone()),
            expr,
            atoms,
            values,
            plans: parking_lot::Mutex::new(HashMap::new()),
            held: parking_lot::Mutex::new(None),
            answers: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// Keeps only rows written at WAL sequences in `seqs`.
    pub fn written_in(mut self, seqs: std::ops::Range<u64>) -> Compiled {
        self.seqs = Some(seqs);
        self
    }

    /// Whether the query has terms (`q`, ids, tags), not only row filters.
    pub fn has_terms(&self) -> bool {
        self.expr.is_some()
    }

    /// The positive word terms on the message (or anywhere), for highlighting.
    pub fn highlight_words(&self) -> Vec<Vec<String>> {
        self.atoms
            .iter()
            .filter(|m| matches!(m.field, Field::Anywhere | Field::Message))
            .filter_map(|m| match &m.pattern {
                Pattern::Words(ws) if !ws.is_empty() => Some(ws.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether a block's summary rules it out of an unpaged read.
    pub fn excludes_block(&self, summary: &Summary) -> bool {
        self.excludes(summary, None)
    }

    /// Whether the block's summary rules it out.
    fn excludes(&self, summary: &Summary, bound: Option<(Order, SortPosition)>) -> bool {
        if summary.rows == 0
            || self.start.is_some_and(|s| summary.ts_max < s)
            || self.end.is_some_and(|e| summary.ts_min >= e)
            || self
                .seqs
                .as_ref()
                .is_some_and(|r| summary.seq_max < r.start || summary.seq_min >= r.end)
            || summary.levels & self.levels == 0
        {
            return true;
        }
        if let Some((order, after)) = bound {
            let past = match order {
                Order::Desc => summary.ts_min > after.ts,
                Order::Asc => summary.ts_max < after.ts,
            };
            if past {
                return true;
            }
        }
        if let Some(wanted) = &self.services {
            let any = summary.services.iter().any(|(json, _)| {
                let name = serde_json::from_str::<String>(json).unwrap_or_default();
                wanted.contains(&name)
            });
            if !any {
                return true;
            }
        }
        false
    }
}

/// How one term is decided in one block.
enum AtomPlan {
    /// The row's level is in the mask.
    Level(u16),
    /// By service number.
    Service(Vec<bool>),
    Id(Option<Uuid>),
    Values {
        /// `None` when the Bloom filter rules the term out of the block.
        templates: Option<Arc<TemplatePlan>>,
        /// Anywhere: also a match when the service (by number) matches…
        services: Vec<bool>,
        /// …or when the term is this entry's id.
        id: Option<Uuid>,
        /// For templates left to the row: the variables that match, where one decides.
        hits: Option<Hits>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Yes,
    No,
    /// Depends on the row's variables.
    Row,
}

fn admitted(field: &Field, path: &str) -> bool {
    match field {
        Field::Anywhere => !NOT_CONTENT.contains(&path),
        Field::Message => path == "message",
        Field::Context(p) => path.strip_prefix("context.") == Some(p.as_str()),
        Field::TraceId => path == "trace_id",
        Field::SpanId => path == "span_id",
        Field::RequestId => path == "request_id",
        Field::CorrelationId => path == "correlation_id",
        Field::UserId => path == "user_id",
        Field::Tags => path == "tags",
        Field::Environment => path == "environment",
        Field::ServiceVersion => path == "service_version",
        Field::Service | Field::Level | Field::Id => false,
    }
}

/// The lower-cased words of a text.
fn tokens(text: &str) -> Vec<String> {
    words(text).collect()
}

fn phrase_in(text: &str, phrase: &[String]) -> bool {
    let tokens = tokens(text);
    !phrase.is_empty() && tokens.windows(phrase.len()).any(|w| w == phrase)
}

/// Whether a value's text matches a term's pattern.
fn value_matches(m: &Match, keyword: bool, text: &str) -> bool {
    match (&m.pattern, keyword) {
        (Pattern::Words(_), true) => text == m.raw,
        (Pattern::Words(phrase), false) => phrase_in(text, phrase),
        (Pattern::Contains(f), _) => text.to_lowercase().contains(f.as_str()),
        (Pattern::Prefix(f), true) => text.to_lowercase().starts_with(f.as_str()),
        (Pattern::Suffix(f), true) => text.to_lowercase().ends_with(f.as_str()),
        (Pattern::Prefix(f), false) => tokens(text).iter().any(|t| t.starts_with(f.as_str())),
        (Pattern::Suffix(f), false) => tokens(text).iter().any(|t| t.ends_with(f.as_str())),
    }
}

/// A value's words from its template alone: `None` where a variable stands.
fn template_tokens(value: &Value) -> Vec<Option<Box<str>>> {
    let mut out = Vec::new();
    for piece in &value.pieces {
        match piece {
            Piece::Text(t) => out.extend(words(t).map(|w| Some(w.into_boxed_str()))),
            Piece::Var(_) => out.push(None),
        }
    }
    out
}

fn plain_text(value: &Value) -> Option<String> {
    let mut text = String::new();
    for piece in &value.pieces {
        match piece {
            Piece::Text(t) => text.push_str(t),
            Piece::Var(_) => return None,
        }
    }
    Some(text)
}

/// How a term is decided for the rows of a value of this shape (`tokens`: its words).
fn value_verdict(m: &Match, value: &Value, tokens: &[Option<Box<str>>]) -> Verdict {
    if !admitted(&m.field, &value.path) {
        return Verdict::No;
    }
    let keyword = m.field.is_keyword();
    let plain = !value.pieces.iter().any(|p| matches!(p, Piece::Var(_)));
    let has = |w: &Option<Box<str>>, p: &String| w.as_deref() == Some(p.as_str());
    match &m.pattern {
        Pattern::Words(phrase) if !keyword => {
            if plain || phrase.iter().all(|w| is_template_word(w)) {
                // Template words only (or no variable at all): a variable between them
                // breaks the phrase.
                let found = !phrase.is_empty()
                    && tokens
                        .windows(phrase.len())
                        .any(|w| w.iter().zip(phrase).all(|(t, p)| has(t, p)));
                if found { Verdict::Yes } else { Verdict::No }
            } else if phrase
                .iter()
                .filter(|w| is_template_word(w))
                .all(|w| tokens.iter().any(|t| has(t, w)))
            {
                Verdict::Row
            } else {
                Verdict::No
            }
        }
        _ => match plain_text(value) {
            Some(text) if value_matches(m, keyword, &text) => Verdict::Yes,
            Some(_) => Verdict::No,
            None => Verdict::Row,
        },
    }
}

/// The words of a term that only variables can hold: what a Bloom filter can rule out.
fn variable_words(m: &Match) -> Vec<String> {
    match &m.pattern {
        Pattern::Words(phrase) if !m.field.is_keyword() => phrase
            .iter()
            .filter(|w| !is_template_word(w))
            .cloned()
            .collect(),
        Pattern::Words(_) => tokens(&m.raw)
            .into_iter()
            .filter(|w| !is_template_word(w))
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether every variable word of the term is a word of some variable of the block under a
/// path the term looks at: what rules out a block the Bloom filter let through by chance,
/// before any template is read.
fn variables_allow(m: &Match, view: &View<'_>) -> Result<bool, BlockError> {
    let wanted = variable_words(m);
    if wanted.is_empty() {
        return Ok(true);
    }
    let mut seen = vec![false; wanted.len()];
    for (c, path) in view.summary().paths.iter().enumerate() {
        if !(admitted(&m.field, path) || path == super::block::OTHER_PATHS) {
            continue;
        }
        let column = view.block_column(c)?;
        if let Some(found) = ascii_words_in(&column.data, &wanted) {
            for (seen, found) in seen.iter_mut().zip(found) {
                *seen |= found;
            }
            if seen.iter().all(|s| *s) {
                return Ok(true);
            }
            continue;
        }
        for i in 0..column.len() {
            for word in super::block::words_of(column.get(i).unwrap_or_default()) {
                for (w, seen) in wanted.iter().zip(seen.iter_mut()) {
                    if !*seen
                        && if word.is_ascii() {
                            w.len() == word.len() && word.eq_ignore_ascii_case(w)
                        } else {
                            word.to_lowercase() == *w
                        }
                    {
                        *seen = true;
                    }
                }
            }
        }
        if seen.iter().all(|s| *s) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a fragment term (`*4711*`, `a1b2*`) with a digit can match in the block: such a
/// fragment lies inside one variable (a run of letters and digits with a digit is always
/// one), so some column the term looks at must hold it. A substring search over the
/// columns' text rules out the blocks that cannot, before any row is read; where that is not
/// exact (text that is not ASCII), the block is let through.
fn fragment_allows(m: &Match, view: &View<'_>) -> Result<bool, BlockError> {
    let fragment = match &m.pattern {
        Pattern::Contains(f) | Pattern::Prefix(f) | Pattern::Suffix(f) => f,
        Pattern::Words(_) => return Ok(true),
    };
    if fragment.is_empty()
        || !fragment.bytes().all(|b| b.is_ascii_alphanumeric())
        || !fragment.bytes().any(|b| b.is_ascii_digit())
    {
        return Ok(true);
    }
    let finder = memchr::memmem::Finder::new(fragment.as_bytes());
    for (c, path) in view.summary().paths.iter().enumerate() {
        if !(admitted(&m.field, path) || path == super::block::OTHER_PATHS) {
            continue;
        }
        let column = view.block_column(c)?;
        if !column.data.is_ascii() {
            return Ok(true);
        }
        let text: Cow<'_, [u8]> = if column.data.iter().any(u8::is_ascii_uppercase) {
            Cow::Owned(column.data.to_ascii_lowercase())
        } else {
            Cow::Borrowed(&column.data)
        };
        if finder.find(&text).is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether each of `words` (lower-cased) is a whole word of the text, found with a substring
/// search instead of cutting every value into words; `None` where that is not exact (text or
/// words that are not ASCII).
fn ascii_words_in(text: &[u8], words: &[String]) -> Option<Vec<bool>> {
    if !text.is_ascii() || !words.iter().all(|w| w.is_ascii()) {
        return None;
    }
    let text: Cow<'_, [u8]> = if text.iter().any(u8::is_ascii_uppercase) {
        Cow::Owned(text.to_ascii_lowercase())
    } else {
        Cow::Borrowed(text)
    };
    let word_byte = |at: Option<&u8>| at.is_some_and(u8::is_ascii_alphanumeric);
    Some(
        words
            .iter()
            .map(|w| {
                !w.is_empty()
                    && memchr::memmem::find_iter(&text, w.as_bytes()).any(|at| {
                        !word_byte(at.checked_sub(1).and_then(|p| text.get(p)))
                            && !word_byte(text.get(at + w.len()))
                    })
            })
            .collect(),
    )
}

/// The hashes of the variable words of a term: what a Bloom filter can rule out.
fn variable_hashes(m: &Match) -> Vec<u64> {
    variable_words(m)
        .iter()
        .map(|w| bloom::word_hash(w))
        .collect()
}

/// Which variables of a block match a term that a single variable decides: one word with
/// digits (or a long one), which can only be a whole variable or one of a number's words; or
/// a keyword field's value, when the template holds it as one variable.
struct Hits {
    /// By path: a bit per value.
    columns: Vec<Option<Vec<u64>>>,
}

impl Hits {
    fn hit(&self, column: u32, position: u32) -> bool {
        self.columns
            .get(column as usize)
            .and_then(|bits| bits.as_ref())
            .and_then(|bits| bits.get(position as usize / 64))
            .is_some_and(|word| word & (1 << (position % 64)) != 0)
    }
}

/// What a term's single-variable test is, if it has one.
enum VarTest<'m> {
    Word(&'m str),
    Equals(&'m str),
}

fn var_test(m: &Match) -> Option<VarTest<'_>> {
    match &m.pattern {
        Pattern::Words(words) if !m.field.is_keyword() => match words.as_slice() {
            [word] if !is_template_word(word) => Some(VarTest::Word(word)),
            _ => None,
        },
        Pattern::Words(_) => Some(VarTest::Equals(&m.raw)),
        _ => None,
    }
}

fn var_hits(m: &Match, test: &VarTest<'_>, view: &View<'_>) -> Result<Hits, BlockError> {
    let paths = view.paths()?;
    let mut columns: Vec<Option<Vec<u64>>> = vec![None; paths.len()];
    for (c, path) in paths.iter().enumerate() {
        if !(admitted(&m.field, path) || path == super::block::OTHER_PATHS) {
            continue;
        }
        let column = view.column(c)?;
        let mut bits = vec![0u64; column.len().div_ceil(64)];
        for i in 0..column.len() {
            let value = column.get(i).unwrap_or_default();
            let hit = match test {
                VarTest::Word(word) => super::block::words_of(value)
                    .any(|w| w.len() == word.len() && w.to_lowercase() == *word),
                VarTest::Equals(raw) => value == raw.as_bytes(),
            };
            if hit {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        columns[c] = Some(bits);
    }
    Ok(Hits { columns })
}

/// Which variables of each template a single-variable test looks at.
fn hit_slots(
    m: &Match,
    test: &VarTest<'_>,
    templates: &[TemplateInfo],
    verdicts: &[Verdict],
) -> Vec<Option<HitSlots>> {
    templates
        .iter()
        .zip(verdicts)
        .map(|(info, verdict)| {
            if *verdict != Verdict::Row {
                return None;
            }
            let mut slots = Vec::new();
            for placed in info
                .values
                .iter()
                .filter(|p| admitted(&m.field, &p.value.path))
            {
                let value = &placed.value;
                let vars: Vec<usize> = value
                    .pieces
                    .iter()
                    .filter_map(|p| match p {
                        Piece::Var(k) => Some(placed.first as usize + *k),
                        Piece::Text(_) => None,
                    })
                    .collect();
                if let VarTest::Equals(_) = test
                    && (vars.len() != 1 || value.pieces.len() != 1)
                {
                    if vars.is_empty() {
                        continue;
                    }
                    // Literal text around the variable: the whole value must be read.
                    return None;
                }
                for k in vars {
                    let column = *info.slots.get(k)?;
                    let before = info.slots[..k].iter().filter(|c| **c == column).count();
                    slots.push((column, before as u32));
                }
            }
            Some(slots)
        })
        .collect()
}

/// Term `atom`'s plan for the view's templates: from the query's cache when the view's
/// templates are its part's dictionary.
fn template_plan(
    query: &Compiled,
    atom: usize,
    view: &View<'_>,
) -> Result<Arc<TemplatePlan>, BlockError> {
    let templates = view.templates()?;
    let key = view.shared_templates().map(|part| (part, atom));
    if let Some(key) = key
        && let Some(plan) = query.plans.lock().get(&key)
    {
        return Ok(plan.clone());
    }
    let m = &query.atoms[atom];
    // Each shape decided once; a template is a match where one of its shapes is, and left
    // to the row where one of them depends on its variables.
    let set = &view.template_set()?.0;
    let mut verdicts = vec![Verdict::No; templates.len()];
    let shape_verdicts: Vec<Verdict> = set
        .shapes
        .iter()
        .zip(&set.tokens)
        .map(|(value, tokens)| value_verdict(m, value, tokens))
        .collect();
    for wanted in [Verdict::Row, Verdict::Yes] {
        for (shape, verdict) in shape_verdicts.iter().enumerate() {
            if *verdict == wanted {
                for &t in &set.by_shape[shape] {
                    verdicts[t as usize] = wanted;
                }
            }
        }
    }
    let slots = match var_test(m) {
        Some(test) if verdicts.contains(&Verdict::Row) => {
            Some(hit_slots(m, &test, templates, &verdicts))
        }
        _ => None,
    };
    let plan = Arc::new(TemplatePlan { verdicts, slots });
    // The part's next blocks will want the same templates: the last part's are held for the
    // query (one part's at a time, so a query over many parts stays small).
    *query.held.lock() = Some(view.template_set_arc()?);
    if let Some(key) = key {
        query.plans.lock().insert(key, plan.clone());
    }
    Ok(plan)
}

/// A term that names an entry id: the whole id, however it was cut into words.
fn as_id(m: &Match) -> Option<Uuid> {
    Uuid::try_parse(m.raw.trim()).ok()
}

fn plan_atom(query: &Compiled, atom: usize, view: &View<'_>) -> Result<AtomPlan, BlockError> {
    let m = &query.atoms[atom];
    Ok(match &m.field {
        Field::Level => AtomPlan::Level(match m.raw.parse::<LogLevel>() {
            Ok(level) => 1 << level.rank(),
            Err(_) => 0,
        }),
        Field::Service => AtomPlan::Service(
            (0..view.summary().services.len())
                .map(|n| value_matches(m, true, &view.service_name(n)))
                .collect(),
        ),
        Field::Id => AtomPlan::Id(as_id(m)),
        field => {
            // Ruled out by the Bloom filter: no template is looked at (none is read at all).
            let templates = if view.bloom_allows(&variable_hashes(m))?
                && variables_allow(m, view)?
                && fragment_allows(m, view)?
            {
                Some(template_plan(query, atom, view)?)
            } else {
                None
            };
            let hits = match (var_test(m), &templates) {
                (Some(test), Some(plan)) if plan.slots.is_some() => Some(var_hits(m, &test, view)?),
                _ => None,
            };
            let anywhere = *field == Field::Anywhere;
            AtomPlan::Values {
                templates,
                services: if anywhere {
                    (0..view.summary().services.len())
                        .map(|n| value_matches(m, false, &view.service_name(n)))
                        .collect()
                } else {
                    Vec::new()
                },
                id: if anywhere { as_id(m) } else { None },
                hits,
            }
        }
    })
}

/// Whether the whole block is past the cursor, and inside the query's time range: what lets
/// its rows be counted without looking at their timestamps.
pub fn covers_block(
    query: &Compiled,
    summary: &Summary,
    bound: Option<(Order, SortPosition)>,
) -> bool {
    let inside = query.start.is_none_or(|s| summary.ts_min >= s)
        && query.end.is_none_or(|e| summary.ts_max < e)
        && query
            .seqs
            .as_ref()
            .is_none_or(|r| r.contains(&summary.seq_min) && r.contains(&summary.seq_max));
    let past = match bound {
        None => true,
        Some((Order::Desc, after)) => summary.ts_max < after.ts,
        Some((Order::Asc, after)) => summary.ts_min > after.ts,
    };
    inside && past
}

/// The services of a block the query keeps, by number (`None`: every one).
fn wanted_services(query: &Compiled, view: &View<'_>) -> Option<Vec<bool>> {
    query.services.as_ref().map(|wanted| {
        (0..view.summary().services.len())
            .map(|n| wanted.contains(&view.service_name(n)))
            .collect()
    })
}

/// What the level and service filters make of a block's (service, level) counts: the rows
/// they keep, and all rows.
pub fn count_filtered(view: &View<'_>, query: &Compiled, counts: &BlockCounts) -> (u64, u64) {
    let wanted = wanted_services(query, view);
    let keeps = |s: u32, l: u8| {
        query.levels & (1 << l) != 0
            && wanted
                .as_ref()
                .is_none_or(|w| w.get(s as usize).copied().unwrap_or(false))
    };
    counts
        .service_levels
        .iter()
        .fold((0, 0), |(kept, all), &(s, l, n)| {
            let n = u64::from(n);
            (kept + if keeps(s, l) { n } else { 0 }, all + n)
        })
}

/// How many rows of the block match, from its counts alone (no column is read), where that
/// is exact: the block lies wholly inside the query's time range and past any cursor, none of
/// its entries is hidden, and each term is decided for every template of the block by the
/// template itself or by the Bloom filter. `None`: the rows must be scanned.
pub fn count_without_rows(
    view: &View<'_>,
    query: &Compiled,
    hidden: &HashSet<Uuid>,
    bound: Option<(Order, SortPosition)>,
) -> Result<Option<u64>, BlockError> {
    if query.excludes(view.summary(), bound) {
        return Ok(Some(0));
    }
    if !hidden.is_empty() || !covers_block(query, view.summary(), bound) {
        return Ok(None);
    }
    let Some(counts) = view.counts()? else {
        return Ok(None);
    };
    let (kept, all) = count_filtered(view, query, counts);
    let Some(expr) = &query.expr else {
        return Ok(Some(kept));
    };
    if kept == 0 {
        return Ok(Some(0));
    }
    if kept != all {
        // Terms and a filter that keeps part of the block: the rows decide.
        return Ok(None);
    }
    let plans: Vec<AtomPlan> = (0..query.atoms.len())
        .map(|atom| plan_atom(query, atom, view))
        .collect::<Result<_, _>>()?;
    let by_templates_alone = plans.iter().all(
        |p| matches!(p, AtomPlan::Values { services, id: None, .. } if services.iter().all(|s| !s)),
    );
    if !by_templates_alone {
        return Ok(None);
    }
    let answers = template_answers(query, expr, &plans, view)?;
    let mut total = 0;
    for &(t, n) in &counts.templates {
        match answers.get(t as usize).copied().flatten() {
            Some(true) => total += u64::from(n),
            Some(false) => {}
            None => return Ok(None),
        }
    }
    Ok(Some(total))
}

/// The expression's answer for each template of the view's set, from terms that templates
/// decide; kept per part for the query when no term depends on the block (a term with
/// variable words depends on the block's Bloom filter).
fn template_answers(
    query: &Compiled,
    expr: &Expr,
    plans: &[AtomPlan],
    view: &View<'_>,
) -> Result<Arc<Vec<Option<bool>>>, BlockError> {
    let per_part = query.atoms.iter().all(|m| variable_words(m).is_empty());
    let key = view.shared_templates().filter(|_| per_part);
    if let Some(key) = key
        && let Some(answers) = query.answers.lock().get(&key)
    {
        return Ok(answers.clone());
    }
    let templates = view.templates()?.len();
    let mut answers = Vec::with_capacity(templates);
    for t in 0..templates {
        let mut undecided = false;
        let mut atom = |i: usize| -> Result<bool, BlockError> {
            let AtomPlan::Values { templates, .. } = &plans[i] else {
                undecided = true;
                return Ok(false);
            };
            Ok(match templates.as_ref().and_then(|p| p.verdicts.get(t)) {
                Some(Verdict::Yes) => true,
                Some(Verdict::Row) => {
                    undecided = true;
                    false
                }
                _ => false,
            })
        };
        let hit = eval(expr, &mut atom)?;
        answers.push(if undecided { None } else { Some(hit) });
    }
    let answers = Arc::new(answers);
    if let Some(key) = key {
        query.answers.lock().insert(key, answers.clone());
    }
    Ok(answers)
}

/// Scans one block: calls `found(row, positions)` for every row that matches, in row order,
/// until it returns false. `hidden` are soft-deleted ids; `bound` keeps only rows past a
/// cursor. With `positions`, `found` gets where the row's variables start in each column.
pub fn scan(
    view: &View<'_>,
    query: &Compiled,
    hidden: &HashSet<Uuid>,
    bound: Option<(Order, SortPosition)>,
    positions: bool,
    mut found: impl FnMut(usize, &[u32]) -> bool,
) -> Result<(), BlockError> {
    if query.excludes(view.summary(), bound) {
        return Ok(());
    }
    let plans: Vec<AtomPlan> = (0..query.atoms.len())
        .map(|atom| plan_atom(query, atom, view))
        .collect::<Result<_, _>>()?;
    // A term ruled out for the whole block settles an AND of terms at once.
    if let Some(expr) = &query.expr
        && constant(expr, &plans) == Some(false)
    {
        return Ok(());
    }
    let ts = view.ts()?;
    let seq = if bound.is_some() || query.seqs.is_some() {
        Some(view.seq()?)
    } else {
        None
    };
    let levels =
        if query.levels != u16::MAX || plans.iter().any(|p| matches!(p, AtomPlan::Level(_))) {
            Some(view.levels()?)
        } else {
            None
        };
    let wanted_services = wanted_services(query, view);
    let needs_service = wanted_services.is_some()
        || plans.iter().any(|p| match p {
            AtomPlan::Service(_) => true,
            AtomPlan::Values { services, .. } => services.iter().any(|s| *s),
            _ => false,
        });
    let service = if needs_service {
        Some(view.service()?)
    } else {
        None
    };
    let needs_ids = !hidden.is_empty()
        || plans.iter().any(|p| match p {
            AtomPlan::Id(Some(_)) => true,
            AtomPlan::Values { id, .. } => id.is_some(),
            _ => false,
        });
    let ids = if needs_ids { Some(view.ids()?) } else { None };
    let (template, templates) = if query.values || positions {
        (Some(view.template()?), Some(view.templates()?))
    } else {
        (None, None)
    };
    let needs_positions = positions
        || plans.iter().any(|p| match p {
            AtomPlan::Values {
                templates: Some(plan),
                ..
            } => plan.verdicts.contains(&Verdict::Row),
            _ => false,
        });
    let mut at = vec![
        0u32;
        if template.is_some() {
            view.path_count()?
        } else {
            0
        }
    ];
    for row in 0..view.rows() {
        let info = match (template, templates) {
            (Some(t), Some(infos)) => infos.get(t[row] as usize),
            _ => None,
        };
        let keep = (|| -> Result<bool, BlockError> {
            let t = ts[row];
            if query.start.is_some_and(|s| t < s) || query.end.is_some_and(|e| t >= e) {
                return Ok(false);
            }
            if let (Some(seqs), Some(seq)) = (&query.seqs, seq)
                && !seqs.contains(&seq[row])
            {
                return Ok(false);
            }
            if let (Some((order, after)), Some(seq)) = (bound, seq) {
                let key = SortPosition {
                    ts: t,
                    seq: seq[row],
                }
                .key();
                let past = match order {
                    Order::Desc => key < after.key(),
                    Order::Asc => key > after.key(),
                };
                if !past {
                    return Ok(false);
                }
            }
            if let Some(levels) = levels
                && query.levels & (1 << levels[row]) == 0
            {
                return Ok(false);
            }
            if let (Some(wanted), Some(service)) = (&wanted_services, service)
                && !wanted[service[row] as usize]
            {
                return Ok(false);
            }
            if let Some(expr) = &query.expr {
                let mut atom = |i: usize| -> Result<bool, BlockError> {
                    Ok(match &plans[i] {
                        AtomPlan::Level(mask) => levels.is_some_and(|l| mask & (1 << l[row]) != 0),
                        AtomPlan::Service(by) => service.is_some_and(|s| by[s[row] as usize]),
                        AtomPlan::Id(id) => ids.zip(*id).is_some_and(|(ids, id)| ids[row] == id),
                        AtomPlan::Values {
                            templates: verdicts,
                            services,
                            id,
                            hits,
                        } => {
                            if service.is_some_and(|s| services.get(s[row] as usize) == Some(&true))
                                || ids.zip(*id).is_some_and(|(ids, id)| ids[row] == id)
                            {
                                return Ok(true);
                            }
                            let Some(info) = info else { return Ok(false) };
                            let Some(plan) = verdicts else {
                                return Ok(false);
                            };
                            let t = template.map_or(0, |t| t[row] as usize);
                            match plan.verdicts.get(t) {
                                Some(Verdict::Yes) => true,
                                Some(Verdict::Row)
                                    if let Some((hits, slots)) = hits.as_ref().and_then(|h| {
                                        Some((h, plan.slots.as_ref()?.get(t)?.as_ref()?))
                                    }) =>
                                {
                                    slots.iter().any(|(column, before)| {
                                        let position =
                                            at.get(*column as usize).copied().unwrap_or(0) + before;
                                        hits.hit(*column, position)
                                    })
                                }
                                Some(Verdict::Row) => {
                                    let m = &query.atoms[i];
                                    let keyword = m.field.is_keyword();
                                    let mut any = false;
                                    for value in info
                                        .values
                                        .iter()
                                        .filter(|p| admitted(&m.field, &p.value.path))
                                    {
                                        let text = view.value_text(info, value, &at)?;
                                        if value_matches(m, keyword, &text) {
                                            any = true;
                                            break;
                                        }
                                    }
                                    any
                                }
                                _ => false,
                            }
                        }
                    })
                };
                if !eval(expr, &mut atom)? {
                    return Ok(false);
                }
            }
            if let Some(ids) = ids
                && !hidden.is_empty()
                && hidden.contains(&ids[row])
            {
                return Ok(false);
            }
            Ok(true)
        })()?;
        if keep && !found(row, &at) {
            break;
        }
        if needs_positions && let Some(info) = info {
            for (c, n) in &info.counts {
                at[*c as usize] += n;
            }
        }
    }
    Ok(())
}

/// The expression's value when its terms are constants for the whole block, if it is.
fn constant(expr: &Expr, plans: &[AtomPlan]) -> Option<bool> {
    match expr {
        Expr::Atom(i) => match &plans[*i] {
            AtomPlan::Values {
                templates,
                services,
                id: None,
                ..
            } if services.iter().all(|s| !s) => {
                if templates
                    .as_ref()
                    .is_none_or(|plan| plan.verdicts.iter().all(|v| *v == Verdict::No))
                {
                    Some(false)
                } else {
                    None
                }
            }
            AtomPlan::Service(by) if by.iter().all(|b| !b) => Some(false),
            _ => None,
        },
        Expr::And(all) => {
            let mut result = Some(true);
            for e in all {
                match constant(e, plans) {
                    Some(false) => return Some(false),
                    Some(true) => {}
                    None => result = None,
                }
            }
            result
        }
        Expr::Or(any) => {
            let mut result = Some(false);
            for e in any {
                match constant(e, plans) {
                    Some(true) => return Some(true),
                    Some(false) => {}
                    None => result = None,
                }
            }
            result
        }
        Expr::Not(inner) => constant(inner, plans).map(|b| !b),
    }
}

fn eval(
    expr: &Expr,
    atom: &mut impl FnMut(usize) -> Result<bool, BlockError>,
) -> Result<bool, BlockError> {
    Ok(match expr {
        Expr::Atom(i) => atom(*i)?,
        Expr::And(all) => {
            for e in all {
                if !eval(e, atom)? {
                    return Ok(false);
                }
            }
            true
        }
        Expr::Or(any) => {
            for e in any {
                if eval(e, atom)? {
                    return Ok(true);
                }
            }
            false
        }
        Expr::Not(inner) => !eval(inner, atom)?,
    })
}

/// Where in `message` the query's words are, for a highlight: the fragment of at most
/// `max_chars` characters around the first match, and the byte ranges in it.
pub fn highlight(
    message: &str,
    phrases: &[Vec<String>],
    max_chars: usize,
) -> Option<(String, Vec<[usize; 2]>)> {
    // Word spans of the message, lower-cased.
    let mut spans: Vec<(usize, usize, String)> = Vec::new();
    let mut start = None;
    for (i, c) in message.char_indices() {
        match (c.is_alphanumeric(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                spans.push((s, i, message[s..i].to_lowercase()));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        spans.push((s, message.len(), message[s..].to_lowercase()));
    }
    let mut hits: Vec<(usize, usize)> = Vec::new();
    for phrase in phrases {
        for w in 0..spans.len() {
            if spans.len() - w >= phrase.len()
                && spans[w..w + phrase.len()]
                    .iter()
                    .zip(phrase)
                    .all(|(s, p)| s.2 == *p)
            {
                hits.push((spans[w].0, spans[w + phrase.len() - 1].1));
            }
        }
    }
    if hits.is_empty() {
        return None;
    }
    hits.sort_unstable();
    // A fragment of `max_chars` characters from a little before the first hit.
    let first = hits[0].0;
    let from = message[..first]
        .char_indices()
        .rev()
        .nth(20)
        .map_or(0, |(i, _)| i);
    let to = message[from..]
        .char_indices()
        .nth(max_chars)
        .map_or(message.len(), |(i, _)| from + i);
    let fragment = message[from..to].to_string();
    let ranges = hits
        .into_iter()
        .filter(|(s, e)| *s >= from && *e <= to)
        .map(|(s, e)| [s - from, e - from])
        .collect();
    Some((fragment, ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The substring search finds exactly the whole words that cutting values into words
    /// finds, whatever the case, and declines text it cannot decide exactly.
    #[test]
    fn whole_words_are_found_by_substring_search_as_by_cutting() {
        let text = b"req-AB12cd\0xylophone3 x\0order 4711-b\0a4711\0";
        let words: Vec<String> = ["ab12cd", "4711", "xylophone3", "711", "b", "req", "a47"]
            .iter()
            .map(|w| w.to_string())
            .collect();
        let by_cutting: Vec<bool> = words
            .iter()
            .map(|w| {
                text.split(|b| *b == 0)
                    .flat_map(super::super::block::words_of)
                    .any(|word| word.to_lowercase() == *w)
            })
            .collect();
        assert_eq!(by_cutting, vec![true, true, true, false, true, true, false]);
        assert_eq!(ascii_words_in(text, &words), Some(by_cutting));
        assert_eq!(ascii_words_in("café 12".as_bytes(), &words), None);
    }
}
