//! LogQL text into a bounded tree ([`parse`]), for the subset `docs/logql.md` lists.
//!
//! Everything outside the subset is refused naming the construct and where it starts, as
//! Loki words its parse errors (`parse error at line 1, col 12: …`), never read as something
//! else. The query comes from a client: its length is bounded ([`MAX_LENGTH`]) and so is its
//! nesting ([`MAX_DEPTH`]), which bounds the parser's recursion.

use regex::{Regex, RegexBuilder};

/// Longest query, in bytes.
pub const MAX_LENGTH: usize = 16 * 1024;
/// Deepest nesting of parentheses and aggregations.
pub const MAX_DEPTH: usize = 32;
/// The most a compiled regular expression may take.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A parsed query: log lines, or numbers over time.
#[derive(Debug)]
pub enum Expr {
    Log(LogExpr),
    Metric(MetricExpr),
}

/// A stream selector and the stages each line goes through.
#[derive(Debug, Clone)]
pub struct LogExpr {
    pub selector: Vec<Matcher>,
    pub stages: Vec<Stage>,
}

/// `name op "value"`, as in a stream selector or a string label filter.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub name: String,
    pub op: MatchOp,
    pub value: String,
    /// The value compiled, anchored at both ends, for `=~` and `!~`.
    pub regex: Option<Regex>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchOp {
    Eq,
    Ne,
    Re,
    NotRe,
}

impl Matcher {
    /// Whether a label's value (`""` when it is absent) passes.
    pub fn matches(&self, value: &str) -> bool {
        match self.op {
            MatchOp::Eq => value == self.value,
            MatchOp::Ne => value != self.value,
            MatchOp::Re => self.regex.as_ref().is_some_and(|r| r.is_match(value)),
            MatchOp::NotRe => !self.regex.as_ref().is_some_and(|r| r.is_match(value)),
        }
    }
}

/// One stage of a log pipeline.
#[derive(Debug, Clone)]
pub enum Stage {
    Line(LineFilter),
    /// `| json` with its `label="path"` parameters (none: every field).
    Json(Vec<(String, Vec<PathStep>)>),
    Logfmt {
        strict: bool,
        keep_empty: bool,
        params: Vec<(String, String)>,
    },
    Regexp(Regex),
    Pattern(Vec<PatternPart>),
    Unpack,
    Labels(LabelFilter),
    LineFormat(Template),
    LabelFormat(Vec<(String, LabelFormat)>),
    Drop(Vec<NameOrMatcher>),
    Keep(Vec<NameOrMatcher>),
    Decolorize,
}

/// A step of a `| json` parameter's path: `a.b[0]["c d"]`.
#[derive(Debug, Clone, PartialEq)]
pub enum PathStep {
    Key(String),
    Index(usize),
}

/// A piece of a `| pattern`: text to find, or a capture up to the next text.
#[derive(Debug, Clone, PartialEq)]
pub enum PatternPart {
    Literal(String),
    /// `<name>`; `None` for `<_>`.
    Capture(Option<String>),
}

/// A `| label_format` assignment: another label's value, or a template.
#[derive(Debug, Clone)]
pub enum LabelFormat {
    Rename(String),
    Template(Template),
}

/// A `| drop` or `| keep` argument.
#[derive(Debug, Clone)]
pub enum NameOrMatcher {
    Name(String),
    Matcher(Matcher),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineOp {
    Contains,
    NotContains,
    Matches,
    NotMatches,
}

/// `|= "a" or "b"`: the line must hold one of the texts (for `!=` and `!~`: none of them).
#[derive(Debug, Clone)]
pub struct LineFilter {
    pub op: LineOp,
    pub texts: Vec<String>,
    pub regexes: Vec<Regex>,
}

/// A label filter: string matchers, and comparisons of numbers, durations and byte sizes.
#[derive(Debug, Clone)]
pub enum LabelFilter {
    And(Box<LabelFilter>, Box<LabelFilter>),
    Or(Box<LabelFilter>, Box<LabelFilter>),
    Text(Matcher),
    Compare {
        name: String,
        op: CompareOp,
        kind: ValueKind,
        value: f64,
    },
}

/// How a compared label's value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Number,
    /// Seconds.
    Duration,
    Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl CompareOp {
    pub fn holds(self, a: f64, b: f64) -> bool {
        match self {
            CompareOp::Eq => a == b,
            CompareOp::Ne => a != b,
            CompareOp::Gt => a > b,
            CompareOp::Ge => a >= b,
            CompareOp::Lt => a < b,
            CompareOp::Le => a <= b,
        }
    }
}

/// A `line_format` / `label_format` template: text and `{{ … }}` actions.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(pub Vec<TemplatePart>);

#[derive(Debug, Clone, PartialEq)]
pub enum TemplatePart {
    Text(String),
    /// The first value, then each function applied to it in turn.
    Action(Operand, Vec<(Function, Vec<String>)>),
}

/// What a template action starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Label(String),
    Line,
    Text(String),
    /// A function called on its arguments, the last of which is the label named.
    Call(Function, Vec<String>, Box<Operand>),
}

/// The template functions of the subset, with how many text arguments come before the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    Lower,
    Upper,
    Title,
    TrimSpace,
    Trim,
    TrimPrefix,
    TrimSuffix,
    Replace,
    Default,
    Substr,
    Trunc,
}

impl Function {
    fn named(name: &str) -> Option<Function> {
        Some(match name {
            "lower" | "ToLower" => Function::Lower,
            "upper" | "ToUpper" => Function::Upper,
            "title" | "Title" => Function::Title,
            "trim" | "TrimSpace" | "trimSpace" => Function::TrimSpace,
            "trimAll" => Function::Trim,
            "trimPrefix" | "TrimPrefix" => Function::TrimPrefix,
            "trimSuffix" | "TrimSuffix" => Function::TrimSuffix,
            "replace" => Function::Replace,
            "default" => Function::Default,
            "substr" => Function::Substr,
            "trunc" => Function::Trunc,
            _ => return None,
        })
    }

    /// Arguments before the piped value.
    pub fn arguments(self) -> usize {
        match self {
            Function::Lower | Function::Upper | Function::Title | Function::TrimSpace => 0,
            Function::Trim
            | Function::TrimPrefix
            | Function::TrimSuffix
            | Function::Default
            | Function::Trunc => 1,
            Function::Replace | Function::Substr => 2,
        }
    }
}

/// A log query over a window, as range aggregations take it.
#[derive(Debug, Clone)]
pub struct LogRange {
    pub log: LogExpr,
    pub unwrap: Option<Unwrap>,
    /// Nanoseconds.
    pub range: i64,
    pub offset: i64,
}

/// `| unwrap label` (or `duration(label)`, `bytes(label)`), with the filters after it.
#[derive(Debug, Clone)]
pub struct Unwrap {
    pub label: String,
    pub kind: ValueKind,
    pub filters: Vec<LabelFilter>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOp {
    CountOverTime,
    Rate,
    BytesOverTime,
    BytesRate,
    AbsentOverTime,
    SumOverTime,
    AvgOverTime,
    MinOverTime,
    MaxOverTime,
    FirstOverTime,
    LastOverTime,
    StdvarOverTime,
    StddevOverTime,
    QuantileOverTime,
}

impl RangeOp {
    fn named(name: &str) -> Option<RangeOp> {
        Some(match name {
            "count_over_time" => RangeOp::CountOverTime,
            "rate" => RangeOp::Rate,
            "bytes_over_time" => RangeOp::BytesOverTime,
            "bytes_rate" => RangeOp::BytesRate,
            "absent_over_time" => RangeOp::AbsentOverTime,
            "sum_over_time" => RangeOp::SumOverTime,
            "avg_over_time" => RangeOp::AvgOverTime,
            "min_over_time" => RangeOp::MinOverTime,
            "max_over_time" => RangeOp::MaxOverTime,
            "first_over_time" => RangeOp::FirstOverTime,
            "last_over_time" => RangeOp::LastOverTime,
            "stdvar_over_time" => RangeOp::StdvarOverTime,
            "stddev_over_time" => RangeOp::StddevOverTime,
            "quantile_over_time" => RangeOp::QuantileOverTime,
            _ => return None,
        })
    }

    /// Whether it reads an unwrapped value (and so needs `| unwrap`).
    pub fn needs_unwrap(self) -> bool {
        !matches!(
            self,
            RangeOp::CountOverTime
                | RangeOp::Rate
                | RangeOp::BytesOverTime
                | RangeOp::BytesRate
                | RangeOp::AbsentOverTime
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorOp {
    Sum,
    Avg,
    Min,
    Max,
    Count,
    Stddev,
    Stdvar,
    Topk,
    Bottomk,
    Sort,
    SortDesc,
}

impl VectorOp {
    fn named(name: &str) -> Option<VectorOp> {
        Some(match name {
            "sum" => VectorOp::Sum,
            "avg" => VectorOp::Avg,
            "min" => VectorOp::Min,
            "max" => VectorOp::Max,
            "count" => VectorOp::Count,
            "stddev" => VectorOp::Stddev,
            "stdvar" => VectorOp::Stdvar,
            "topk" => VectorOp::Topk,
            "bottomk" => VectorOp::Bottomk,
            "sort" => VectorOp::Sort,
            "sort_desc" => VectorOp::SortDesc,
            _ => return None,
        })
    }
}

/// `by (a, b)` keeps those labels; `without (a, b)` drops them.
#[derive(Debug, Clone, PartialEq)]
pub struct Grouping {
    pub without: bool,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Pow,
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    And,
    Or,
    Unless,
}

impl BinOp {
    fn precedence(self) -> u8 {
        match self {
            BinOp::Or => 1,
            BinOp::And | BinOp::Unless => 2,
            BinOp::Eq | BinOp::Ne | BinOp::Gt | BinOp::Ge | BinOp::Lt | BinOp::Le => 3,
            BinOp::Add | BinOp::Sub => 4,
            BinOp::Mul | BinOp::Div | BinOp::Mod => 5,
            BinOp::Pow => 6,
        }
    }

    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinOp::Eq | BinOp::Ne | BinOp::Gt | BinOp::Ge | BinOp::Lt | BinOp::Le
        )
    }

    pub fn is_set(self) -> bool {
        matches!(self, BinOp::And | BinOp::Or | BinOp::Unless)
    }
}

/// How two vectors' samples pair up: on these labels, or on all but these.
#[derive(Debug, Clone, PartialEq)]
pub struct VectorMatching {
    pub on: bool,
    pub labels: Vec<String>,
}

/// A query that yields numbers.
#[derive(Debug, Clone)]
pub enum MetricExpr {
    Range {
        op: RangeOp,
        parameter: Option<f64>,
        range: Box<LogRange>,
        grouping: Option<Grouping>,
    },
    Vector {
        op: VectorOp,
        parameter: Option<f64>,
        grouping: Option<Grouping>,
        inner: Box<MetricExpr>,
    },
    Binary {
        op: BinOp,
        /// `bool`: comparisons answer 0 or 1 instead of filtering.
        return_bool: bool,
        matching: Option<VectorMatching>,
        lhs: Box<MetricExpr>,
        rhs: Box<MetricExpr>,
    },
    /// A number.
    Scalar(f64),
    /// `vector(n)`: one sample without labels.
    VectorOf(f64),
}

/// Why a query cannot be read: Loki's wording, with the column where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parse error at line 1, col {column}: {message}")]
pub struct ParseError {
    pub column: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Number(f64),
    /// A number with a unit: `5m`, `1h30m`, `250ms`, `20MB`.
    Unit(String),
    /// `--strict`, `--keep-empty`.
    Flag(String),
    Sym(&'static str),
}

const SYMBOLS: [&str; 25] = [
    "|=", "|~", "!=", "!~", "=~", "==", ">=", "<=", "{", "}", "(", ")", "[", "]", ",", "=", "|",
    ">", "<", "+", "-", "*", "/", "%", "^",
];

/// The tokens, each with the column (from 1) where it starts.
fn lex(text: &str) -> Result<Vec<(Tok, usize)>, ParseError> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let column = |i: usize| text[..i].chars().count() + 1;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'#' {
            // A comment, to the end of the line.
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'"' {
            let (value, end) = quoted(text, i).map_err(|message| ParseError {
                column: column(start),
                message,
            })?;
            out.push((Tok::Str(value), column(start)));
            i = end;
            continue;
        }
        if c == b'`' {
            let Some(len) = text[i + 1..].find('`') else {
                return Err(ParseError {
                    column: column(start),
                    message: "a `-quoted string is missing its closing `".into(),
                });
            };
            out.push((
                Tok::Str(text[i + 1..i + 1 + len].to_string()),
                column(start),
            ));
            i += len + 2;
            continue;
        }
        if c == b'-' && bytes.get(i + 1) == Some(&b'-') {
            let mut end = i + 2;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'-') {
                end += 1;
            }
            out.push((Tok::Flag(text[i + 2..end].to_string()), column(start)));
            i = end;
            continue;
        }
        if c.is_ascii_digit() || (c == b'.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            let mut end = i;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'.') {
                // An exponent's sign belongs to the number.
                if matches!(bytes[end], b'e' | b'E')
                    && matches!(bytes.get(end + 1), Some(b'+' | b'-'))
                    && text[i..end]
                        .bytes()
                        .all(|b| b.is_ascii_digit() || b == b'.')
                {
                    end += 2;
                    continue;
                }
                end += 1;
            }
            let word = &text[i..end];
            let token = match word.parse::<f64>() {
                Ok(n) => Tok::Number(n),
                Err(_) if word.starts_with("0x") => i64::from_str_radix(&word[2..], 16)
                    .map(|n| Tok::Number(n as f64))
                    .map_err(|_| ParseError {
                        column: column(start),
                        message: format!("{word:?} is not a number"),
                    })?,
                Err(_) => Tok::Unit(word.to_string()),
            };
            out.push((token, column(start)));
            i = end;
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            let mut end = i;
            while end < bytes.len()
                && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b'.')
            {
                end += 1;
            }
            out.push((Tok::Ident(text[i..end].to_string()), column(start)));
            i = end;
            continue;
        }
        let Some(symbol) = SYMBOLS.iter().find(|s| text[i..].starts_with(**s)) else {
            let shown = text[i..].chars().next().unwrap_or(' ');
            return Err(ParseError {
                column: column(start),
                message: format!("syntax error: unexpected {shown:?}"),
            });
        };
        out.push((Tok::Sym(symbol), column(start)));
        i += symbol.len();
    }
    Ok(out)
}

/// A `"…"` string with Go's escapes, from the quote at `start`: its value and where it ends.
fn quoted(text: &str, start: usize) -> Result<(String, usize), String> {
    let mut value = String::new();
    let mut chars = text[start + 1..].char_indices();
    while let Some((offset, c)) = chars.next() {
        match c {
            '"' => return Ok((value, start + 1 + offset + 1)),
            '\\' => match chars.next().map(|(_, c)| c) {
                Some('n') => value.push('\n'),
                Some('t') => value.push('\t'),
                Some('r') => value.push('\r'),
                Some('\\') => value.push('\\'),
                Some('"') => value.push('"'),
                Some('\'') => value.push('\''),
                Some('a') => value.push('\x07'),
                Some('b') => value.push('\x08'),
                Some('f') => value.push('\x0c'),
                Some('v') => value.push('\x0b'),
                Some(u @ ('u' | 'x')) => {
                    let width = if u == 'u' { 4 } else { 2 };
                    let hex: String = (0..width)
                        .filter_map(|_| chars.next().map(|(_, c)| c))
                        .collect();
                    let code = u32::from_str_radix(&hex, 16)
                        .ok()
                        .and_then(char::from_u32)
                        .ok_or_else(|| format!("\\{u}{hex} is not a valid escape"))?;
                    value.push(code);
                }
                Some(other) => return Err(format!("\\{other} is not a valid escape in a string")),
                None => break,
            },
            c => value.push(c),
        }
    }
    Err("a string is missing its closing quote".into())
}

/// A Prometheus-style duration: `1h30m`, `5m`, `250ms`, `1d`, `1w`, `1y`; in nanoseconds.
pub fn parse_duration(text: &str) -> Option<i64> {
    let mut total: i128 = 0;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit: i128 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            "w" => 7 * 86_400_000_000_000,
            "y" => 365 * 86_400_000_000_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += (number * unit as f64) as i128;
    }
    i64::try_from(total).ok()
}

/// A byte size as Loki reads it (humanize): `5`, `20MB`, `1.5KiB`, `10b`.
pub fn parse_bytes(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let number: f64 = text[..split].parse().ok()?;
    let unit = text[split..].trim().to_ascii_lowercase();
    let factor: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "pb" | "p" => 1e15,
        "kib" | "ki" => 1024.0,
        "mib" | "mi" => 1024f64.powi(2),
        "gib" | "gi" => 1024f64.powi(3),
        "tib" | "ti" => 1024f64.powi(4),
        "pib" | "pi" => 1024f64.powi(5),
        _ => return None,
    };
    Some(number * factor)
}

/// Reads a query.
pub fn parse(text: &str) -> Result<Expr, ParseError> {
    if text.len() > MAX_LENGTH {
        return Err(ParseError {
            column: 1,
            message: format!("the query is longer than {MAX_LENGTH} bytes"),
        });
    }
    let tokens = lex(text)?;
    let mut parser = Parser {
        tokens,
        at: 0,
        depth: 0,
        end_column: text.chars().count() + 1,
    };
    let expr = parser.expr()?;
    if let Some((tok, column)) = parser.tokens.get(parser.at) {
        return Err(ParseError {
            column: *column,
            message: format!("syntax error: unexpected {}", shown(tok)),
        });
    }
    Ok(expr)
}

fn shown(tok: &Tok) -> String {
    match tok {
        Tok::Ident(s) | Tok::Unit(s) => s.clone(),
        Tok::Str(s) => format!("{s:?}"),
        Tok::Number(n) => n.to_string(),
        Tok::Flag(f) => format!("--{f}"),
        Tok::Sym(s) => (*s).to_string(),
    }
}

struct Parser {
    tokens: Vec<(Tok, usize)>,
    at: usize,
    depth: usize,
    end_column: usize,
}

type Parsed<T> = Result<T, ParseError>;

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.at).map(|(t, _)| t)
    }

    fn peek_at(&self, ahead: usize) -> Option<&Tok> {
        self.tokens.get(self.at + ahead).map(|(t, _)| t)
    }

    fn column(&self) -> usize {
        self.tokens
            .get(self.at)
            .map_or(self.end_column, |(_, c)| *c)
    }

    fn error<T>(&self, message: impl Into<String>) -> Parsed<T> {
        Err(ParseError {
            column: self.column(),
            message: message.into(),
        })
    }

    fn unexpected<T>(&self, wanted: &str) -> Parsed<T> {
        match self.peek() {
            Some(tok) => self.error(format!(
                "syntax error: unexpected {}, expecting {wanted}",
                shown(tok)
            )),
            None => self.error(format!(
                "syntax error: unexpected end of query, expecting {wanted}"
            )),
        }
    }

    fn unsupported<T>(&self, what: &str) -> Parsed<T> {
        self.error(format!(
            "{what} is not supported by this aggregator's LogQL (see docs/logql.md for the subset)"
        ))
    }

    fn is_sym(&self, sym: &str) -> bool {
        matches!(self.peek(), Some(Tok::Sym(s)) if *s == sym)
    }

    fn is_ident(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(s)) if s == word)
    }

    fn eat_sym(&mut self, sym: &str) -> bool {
        let found = self.is_sym(sym);
        if found {
            self.at += 1;
        }
        found
    }

    fn expect_sym(&mut self, sym: &'static str) -> Parsed<()> {
        if self.eat_sym(sym) {
            Ok(())
        } else {
            self.unexpected(sym)
        }
    }

    /// The next token's text when `pick` takes it, else an error naming what was `wanted`.
    fn text(&mut self, wanted: &str, pick: fn(&Tok) -> Option<&String>) -> Parsed<String> {
        match self.peek().and_then(pick) {
            Some(s) => {
                let s = s.clone();
                self.at += 1;
                Ok(s)
            }
            None => self.unexpected(wanted),
        }
    }

    fn ident(&mut self, wanted: &str) -> Parsed<String> {
        self.text(wanted, |t| match t {
            Tok::Ident(s) => Some(s),
            _ => None,
        })
    }

    fn string(&mut self, wanted: &str) -> Parsed<String> {
        self.text(wanted, |t| match t {
            Tok::Str(s) => Some(s),
            _ => None,
        })
    }

    fn number(&mut self) -> Parsed<f64> {
        let negative = self.eat_sym("-");
        match self.peek() {
            Some(Tok::Number(n)) => {
                let n = *n;
                self.at += 1;
                Ok(if negative { -n } else { n })
            }
            _ => self.unexpected("a number"),
        }
    }

    fn deeper(&mut self) -> Parsed<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.error(format!("the query nests deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }

    fn expr(&mut self) -> Parsed<Expr> {
        if self.is_sym("{") {
            let log = self.log_expr()?;
            if self.peek().is_some() && !self.is_sym(")") {
                return self.unexpected("a pipeline stage (`|`) or the end of the log query");
            }
            return Ok(Expr::Log(log));
        }
        // `( {…} | … )` is a log query in parentheses.
        if self.is_sym("(") && self.log_in_parentheses() {
            self.at += 1;
            self.deeper()?;
            let expr = self.expr()?;
            self.depth -= 1;
            self.expect_sym(")")?;
            return Ok(expr);
        }
        Ok(Expr::Metric(self.metric(0)?))
    }

    /// Whether the `(` here opens a log query (and not a metric one).
    fn log_in_parentheses(&self) -> bool {
        let mut ahead = 0;
        while matches!(self.peek_at(ahead), Some(Tok::Sym("("))) {
            ahead += 1;
        }
        matches!(self.peek_at(ahead), Some(Tok::Sym("{")))
    }

    fn metric(&mut self, min_precedence: u8) -> Parsed<MetricExpr> {
        self.deeper()?;
        let mut lhs = self.metric_operand()?;
        while let Some(op) = self.binary_op() {
            if op.precedence() < min_precedence {
                break;
            }
            self.at += 1;
            let return_bool = if self.is_ident("bool") {
                if !op.is_comparison() {
                    return self.error("bool is only allowed after a comparison");
                }
                self.at += 1;
                true
            } else {
                false
            };
            let matching = if self.is_ident("on") || self.is_ident("ignoring") {
                let on = self.is_ident("on");
                self.at += 1;
                let labels = self.label_list()?;
                Some(VectorMatching { on, labels })
            } else {
                None
            };
            if self.is_ident("group_left") || self.is_ident("group_right") {
                return self.unsupported("group_left / group_right (many-to-one matching)");
            }
            // `^` binds to the right; the others to the left.
            let next = if op == BinOp::Pow {
                op.precedence()
            } else {
                op.precedence() + 1
            };
            let rhs = self.metric(next)?;
            lhs = MetricExpr::Binary {
                op,
                return_bool,
                matching,
                lhs: Box::new(lhs),
                rhs: Box::new(rhs),
            };
        }
        self.depth -= 1;
        Ok(lhs)
    }

    fn binary_op(&self) -> Option<BinOp> {
        Some(match self.peek()? {
            Tok::Sym("+") => BinOp::Add,
            Tok::Sym("-") => BinOp::Sub,
            Tok::Sym("*") => BinOp::Mul,
            Tok::Sym("/") => BinOp::Div,
            Tok::Sym("%") => BinOp::Mod,
            Tok::Sym("^") => BinOp::Pow,
            Tok::Sym("==") => BinOp::Eq,
            Tok::Sym("!=") => BinOp::Ne,
            Tok::Sym(">") => BinOp::Gt,
            Tok::Sym(">=") => BinOp::Ge,
            Tok::Sym("<") => BinOp::Lt,
            Tok::Sym("<=") => BinOp::Le,
            Tok::Ident(w) if w == "and" => BinOp::And,
            Tok::Ident(w) if w == "or" => BinOp::Or,
            Tok::Ident(w) if w == "unless" => BinOp::Unless,
            _ => return None,
        })
    }

    fn metric_operand(&mut self) -> Parsed<MetricExpr> {
        match self.peek().cloned() {
            Some(Tok::Number(_)) | Some(Tok::Sym("-")) => Ok(MetricExpr::Scalar(self.number()?)),
            Some(Tok::Sym("(")) => {
                self.at += 1;
                let inner = self.metric(0)?;
                self.expect_sym(")")?;
                Ok(inner)
            }
            Some(Tok::Sym("{")) => self.error(
                "a log query cannot be combined with numbers; wrap it in a range aggregation such as count_over_time({…}[5m])",
            ),
            Some(Tok::Ident(name)) => {
                if let Some(op) = RangeOp::named(&name) {
                    self.at += 1;
                    return self.range_aggregation(op, &name);
                }
                if let Some(op) = VectorOp::named(&name) {
                    self.at += 1;
                    return self.vector_aggregation(op);
                }
                if name == "vector" {
                    self.at += 1;
                    self.expect_sym("(")?;
                    let n = self.number()?;
                    self.expect_sym(")")?;
                    return Ok(MetricExpr::VectorOf(n));
                }
                match name.as_str() {
                    "rate_counter" | "label_replace" | "absent" | "quantile" | "stdvar"
                    | "approx_topk" => self.unsupported(&name),
                    _ => self.unexpected("a metric query (count_over_time, rate, sum, …)"),
                }
            }
            _ => self.unexpected("a metric query (count_over_time, rate, sum, …)"),
        }
    }

    fn label_list(&mut self) -> Parsed<Vec<String>> {
        self.expect_sym("(")?;
        let mut labels = Vec::new();
        while !self.is_sym(")") {
            labels.push(self.ident("a label name")?);
            if !self.eat_sym(",") {
                break;
            }
        }
        self.expect_sym(")")?;
        Ok(labels)
    }

    fn grouping(&mut self) -> Parsed<Option<Grouping>> {
        let without = if self.is_ident("by") {
            false
        } else if self.is_ident("without") {
            true
        } else {
            return Ok(None);
        };
        self.at += 1;
        Ok(Some(Grouping {
            without,
            labels: self.label_list()?,
        }))
    }

    fn range_aggregation(&mut self, op: RangeOp, name: &str) -> Parsed<MetricExpr> {
        self.expect_sym("(")?;
        let parameter = if op == RangeOp::QuantileOverTime {
            let q = self.number()?;
            self.expect_sym(",")?;
            Some(q)
        } else {
            None
        };
        let range = self.log_range()?;
        self.expect_sym(")")?;
        let grouping = self.grouping()?;
        if op.needs_unwrap() && range.unwrap.is_none() {
            return self.error(format!(
                "invalid aggregation {name} without unwrap; add `| unwrap <label>` before the range"
            ));
        }
        if !op.needs_unwrap() && op != RangeOp::Rate && range.unwrap.is_some() {
            return self.error(format!("invalid aggregation {name} with unwrap"));
        }
        if grouping.is_some() && range.unwrap.is_none() {
            return self.error(format!(
                "grouping not allowed for {name} aggregation; use sum by (…) ({name}(…)) instead"
            ));
        }
        Ok(MetricExpr::Range {
            op,
            parameter,
            range: Box::new(range),
            grouping,
        })
    }

    fn vector_aggregation(&mut self, op: VectorOp) -> Parsed<MetricExpr> {
        let mut grouping = self.grouping()?;
        self.expect_sym("(")?;
        let parameter = if matches!(op, VectorOp::Topk | VectorOp::Bottomk) {
            let k = self.number()?;
            if k < 1.0 || k.fract() != 0.0 {
                return self.error(format!(
                    "the k of topk/bottomk must be a whole number ≥ 1, not {k}"
                ));
            }
            self.expect_sym(",")?;
            Some(k)
        } else {
            None
        };
        let inner = self.metric(0)?;
        self.expect_sym(")")?;
        if let Some(after) = self.grouping()? {
            if grouping.is_some() {
                return self.error("a grouping is given both before and after the aggregation");
            }
            grouping = Some(after);
        }
        Ok(MetricExpr::Vector {
            op,
            parameter,
            grouping,
            inner: Box::new(inner),
        })
    }

    fn log_range(&mut self) -> Parsed<LogRange> {
        let parenthesised = self.eat_sym("(");
        let (log, unwrap) = self.log_with_unwrap()?;
        if parenthesised {
            self.expect_sym(")")?;
        }
        let range = self.range_duration()?;
        let offset = if self.is_ident("offset") {
            self.at += 1;
            match self.peek().cloned() {
                Some(Tok::Unit(text)) => {
                    self.at += 1;
                    parse_duration(&text).ok_or_else(|| ParseError {
                        column: self.column(),
                        message: format!("{text:?} is not a duration"),
                    })?
                }
                _ => return self.unexpected("a duration after offset"),
            }
        } else {
            0
        };
        Ok(LogRange {
            log,
            unwrap,
            range,
            offset,
        })
    }

    fn range_duration(&mut self) -> Parsed<i64> {
        self.expect_sym("[")?;
        let range = match self.peek().cloned() {
            Some(Tok::Unit(text)) => match parse_duration(&text) {
                Some(d) if d > 0 => d,
                _ => return self.error(format!("{text:?} is not a duration")),
            },
            _ => return self.unexpected("a range such as [5m]"),
        };
        self.at += 1;
        if self.is_sym(":") {
            return self.unsupported("a subquery");
        }
        self.expect_sym("]")?;
        Ok(range)
    }

    fn log_expr(&mut self) -> Parsed<LogExpr> {
        let (log, unwrap) = self.log_with_unwrap()?;
        if unwrap.is_some() {
            return self.error("unwrap is only allowed inside a range aggregation");
        }
        Ok(log)
    }

    fn log_with_unwrap(&mut self) -> Parsed<(LogExpr, Option<Unwrap>)> {
        let selector = self.selector()?;
        let mut stages = Vec::new();
        let mut unwrap: Option<Unwrap> = None;
        loop {
            match self.peek().cloned() {
                Some(Tok::Sym(op @ ("|=" | "!=" | "|~" | "!~"))) => {
                    if unwrap.is_some() {
                        return self.error("only label filters may follow unwrap");
                    }
                    self.at += 1;
                    stages.push(Stage::Line(self.line_filter(op)?));
                }
                Some(Tok::Sym("|")) => {
                    self.at += 1;
                    if let Some(u) = &mut unwrap {
                        u.filters.push(self.label_filter()?);
                        continue;
                    }
                    if self.is_ident("unwrap") {
                        self.at += 1;
                        unwrap = Some(self.unwrap()?);
                        continue;
                    }
                    stages.push(self.stage()?);
                }
                _ => break,
            }
        }
        Ok((LogExpr { selector, stages }, unwrap))
    }

    fn selector(&mut self) -> Parsed<Vec<Matcher>> {
        self.expect_sym("{")?;
        let mut matchers = Vec::new();
        while !self.is_sym("}") {
            let name = self.ident("a label name")?;
            matchers.push(self.matcher(name)?);
            if !self.eat_sym(",") {
                break;
            }
        }
        self.expect_sym("}")?;
        if !matchers
            .iter()
            .any(|m| matches!(m.op, MatchOp::Eq | MatchOp::Re) && !m.matches(""))
        {
            return self.error(
                "queries require at least one regexp or equality matcher that does not have an empty-compatible value. For instance, app=~\".*\" does not meet this requirement, but app=~\".+\" will",
            );
        }
        Ok(matchers)
    }

    fn matcher(&mut self, name: String) -> Parsed<Matcher> {
        let op = match self.peek() {
            Some(Tok::Sym("=")) => MatchOp::Eq,
            Some(Tok::Sym("!=")) => MatchOp::Ne,
            Some(Tok::Sym("=~")) => MatchOp::Re,
            Some(Tok::Sym("!~")) => MatchOp::NotRe,
            _ => return self.unexpected("=, !=, =~ or !~"),
        };
        self.at += 1;
        let value = self.string("a quoted value")?;
        let regex = match op {
            MatchOp::Re | MatchOp::NotRe => Some(self.regex(&format!("^(?:{value})$"))?),
            _ => None,
        };
        Ok(Matcher {
            name,
            op,
            value,
            regex,
        })
    }

    fn regex(&self, pattern: &str) -> Parsed<Regex> {
        RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .or_else(|e| self.error(format!("invalid regular expression: {e}")))
    }

    fn line_filter(&mut self, op: &str) -> Parsed<LineFilter> {
        let op = match op {
            "|=" => LineOp::Contains,
            "!=" => LineOp::NotContains,
            "|~" => LineOp::Matches,
            _ => LineOp::NotMatches,
        };
        let mut texts = Vec::new();
        loop {
            if self.is_ident("ip") {
                return self.unsupported("the ip() line filter");
            }
            texts.push(self.string("a quoted text to filter lines by")?);
            // `or` here joins texts of this filter, not two queries.
            if self.is_ident("or") && matches!(self.peek_at(1), Some(Tok::Str(_))) {
                self.at += 1;
                continue;
            }
            break;
        }
        let regexes = match op {
            LineOp::Matches | LineOp::NotMatches => texts
                .iter()
                .map(|t| self.regex(t))
                .collect::<Parsed<Vec<_>>>()?,
            _ => Vec::new(),
        };
        Ok(LineFilter { op, texts, regexes })
    }

    fn unwrap(&mut self) -> Parsed<Unwrap> {
        let word = self.ident("a label to unwrap")?;
        let kind = match word.as_str() {
            "duration" | "duration_seconds" if self.is_sym("(") => ValueKind::Duration,
            "bytes" if self.is_sym("(") => ValueKind::Bytes,
            _ => {
                return Ok(Unwrap {
                    label: word,
                    kind: ValueKind::Number,
                    filters: Vec::new(),
                });
            }
        };
        self.expect_sym("(")?;
        let label = self.ident("a label to unwrap")?;
        self.expect_sym(")")?;
        Ok(Unwrap {
            label,
            kind,
            filters: Vec::new(),
        })
    }

    fn stage(&mut self) -> Parsed<Stage> {
        let Some(Tok::Ident(word)) = self.peek().cloned() else {
            if self.is_sym("(") {
                return Ok(Stage::Labels(self.label_filter()?));
            }
            return self.unexpected("a parser, a label filter or a formatting stage");
        };
        // A label filter starts with a name and an operator; a stage's keyword does not.
        let filter_follows = matches!(
            self.peek_at(1),
            Some(Tok::Sym(
                "=" | "!=" | "=~" | "!~" | "==" | ">" | ">=" | "<" | "<="
            ))
        );
        if filter_follows {
            return Ok(Stage::Labels(self.label_filter()?));
        }
        self.at += 1;
        Ok(match word.as_str() {
            "json" => Stage::Json(self.json_parameters()?),
            "logfmt" => {
                let (mut strict, mut keep_empty) = (false, false);
                while let Some(Tok::Flag(flag)) = self.peek().cloned() {
                    match flag.as_str() {
                        "strict" => strict = true,
                        "keep-empty" => keep_empty = true,
                        _ => return self.error(format!("--{flag} is not a logfmt flag")),
                    }
                    self.at += 1;
                }
                let params = self.assignments()?.into_iter().collect();
                Stage::Logfmt {
                    strict,
                    keep_empty,
                    params,
                }
            }
            "regexp" => {
                let pattern = self.string("a quoted regular expression")?;
                let regex = self.regex(&pattern)?;
                if regex.capture_names().flatten().next().is_none() {
                    return self
                        .error("the regexp stage needs at least one named capture (?P<name>…)");
                }
                Stage::Regexp(regex)
            }
            "pattern" => {
                let text = self.string("a quoted pattern")?;
                Stage::Pattern(self.pattern(&text)?)
            }
            "unpack" => Stage::Unpack,
            "line_format" => {
                let text = self.string("a quoted template")?;
                Stage::LineFormat(self.template(&text)?)
            }
            "label_format" => {
                let mut out = Vec::new();
                loop {
                    let name = self.ident("a label name")?;
                    self.expect_sym("=")?;
                    let format = match self.peek().cloned() {
                        Some(Tok::Str(text)) => {
                            self.at += 1;
                            LabelFormat::Template(self.template(&text)?)
                        }
                        Some(Tok::Ident(other)) => {
                            self.at += 1;
                            LabelFormat::Rename(other)
                        }
                        _ => return self.unexpected("a label name or a quoted template"),
                    };
                    out.push((name, format));
                    if !self.eat_sym(",") {
                        break;
                    }
                }
                Stage::LabelFormat(out)
            }
            "drop" | "keep" => {
                let mut names = Vec::new();
                loop {
                    let name = self.ident("a label name")?;
                    if matches!(self.peek(), Some(Tok::Sym("=" | "!=" | "=~" | "!~"))) {
                        names.push(NameOrMatcher::Matcher(self.matcher(name)?));
                    } else {
                        names.push(NameOrMatcher::Name(name));
                    }
                    if !self.eat_sym(",") {
                        break;
                    }
                }
                if word == "drop" {
                    Stage::Drop(names)
                } else {
                    Stage::Keep(names)
                }
            }
            "decolorize" => Stage::Decolorize,
            "unwrap" => return self.error("unwrap is only allowed inside a range aggregation"),
            "distinct" | "ip" => {
                self.at -= 1;
                return self.unsupported(&format!("the {word} stage"));
            }
            _ => {
                self.at -= 1;
                return self.unexpected("a parser (json, logfmt, regexp, pattern, unpack), a label filter, line_format, label_format, drop, keep or decolorize");
            }
        })
    }

    /// `name="value", …` after `| json` or `| logfmt`.
    fn assignments(&mut self) -> Parsed<Vec<(String, String)>> {
        let mut out = Vec::new();
        while matches!(self.peek(), Some(Tok::Ident(_)))
            && matches!(self.peek_at(1), Some(Tok::Sym("=")))
        {
            let name = self.ident("a label name")?;
            self.expect_sym("=")?;
            let value = match self.peek().cloned() {
                Some(Tok::Str(s)) => {
                    self.at += 1;
                    s
                }
                Some(Tok::Ident(s)) => {
                    self.at += 1;
                    s
                }
                _ => return self.unexpected("a quoted expression"),
            };
            out.push((name, value));
            if !self.eat_sym(",") {
                break;
            }
        }
        Ok(out)
    }

    fn json_parameters(&mut self) -> Parsed<Vec<(String, Vec<PathStep>)>> {
        let column = self.column();
        self.assignments()?
            .into_iter()
            .map(|(name, path)| {
                json_path(&path)
                    .map(|steps| (name, steps))
                    .ok_or_else(|| ParseError {
                        column,
                        message: format!("{path:?} is not a JSON expression (a.b[0][\"c\"])"),
                    })
            })
            .collect()
    }

    fn label_filter(&mut self) -> Parsed<LabelFilter> {
        self.deeper()?;
        let mut lhs = self.label_filter_and()?;
        while self.is_ident("or") {
            self.at += 1;
            let rhs = self.label_filter_and()?;
            lhs = LabelFilter::Or(Box::new(lhs), Box::new(rhs));
        }
        self.depth -= 1;
        Ok(lhs)
    }

    fn label_filter_and(&mut self) -> Parsed<LabelFilter> {
        let mut lhs = self.label_filter_primary()?;
        loop {
            if self.is_ident("and") || self.is_sym(",") {
                self.at += 1;
            } else if !(self.is_sym("(")
                || (matches!(self.peek(), Some(Tok::Ident(w)) if w != "or" && w != "offset")
                    && matches!(self.peek_at(1), Some(Tok::Sym(_)))))
            {
                break;
            }
            let rhs = self.label_filter_primary()?;
            lhs = LabelFilter::And(Box::new(lhs), Box::new(rhs));
        }
        Ok(lhs)
    }

    fn label_filter_primary(&mut self) -> Parsed<LabelFilter> {
        if self.eat_sym("(") {
            let inner = self.label_filter()?;
            self.expect_sym(")")?;
            return Ok(inner);
        }
        let name = self.ident("a label name")?;
        let op = match self.peek() {
            Some(Tok::Sym(s)) => *s,
            _ => return self.unexpected("a comparison"),
        };
        let value = self.peek_at(1).cloned();
        match (op, value) {
            ("=" | "!=" | "=~" | "!~", Some(Tok::Str(_))) => {
                Ok(LabelFilter::Text(self.matcher(name)?))
            }
            (_, Some(Tok::Ident(w))) if w == "ip" => self.unsupported("the ip() label filter"),
            (
                "=" | "==" | "!=" | ">" | ">=" | "<" | "<=",
                Some(value @ (Tok::Number(_) | Tok::Unit(_))),
            ) => {
                let op = match op {
                    "=" | "==" => CompareOp::Eq,
                    "!=" => CompareOp::Ne,
                    ">" => CompareOp::Gt,
                    ">=" => CompareOp::Ge,
                    "<" => CompareOp::Lt,
                    _ => CompareOp::Le,
                };
                self.at += 2;
                let (kind, value) = match value {
                    Tok::Number(n) => (ValueKind::Number, n),
                    Tok::Unit(text) => {
                        if let Some(d) = parse_duration(&text) {
                            (ValueKind::Duration, d as f64 / 1e9)
                        } else if let Some(b) = parse_bytes(&text) {
                            (ValueKind::Bytes, b)
                        } else {
                            self.at -= 1;
                            return self
                                .error(format!("{text:?} is neither a duration nor a byte size"));
                        }
                    }
                    _ => unreachable!("matched above"),
                };
                Ok(LabelFilter::Compare {
                    name,
                    op,
                    kind,
                    value,
                })
            }
            _ => {
                self.at += 1;
                self.unexpected("a quoted value, a number, a duration or a byte size")
            }
        }
    }

    fn pattern(&self, text: &str) -> Parsed<Vec<PatternPart>> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let capture = rest.find('<').and_then(|open| {
                let close = rest[open..].find('>')? + open;
                let name = &rest[open + 1..close];
                (name == "_"
                    || (!name.is_empty()
                        && name
                            .chars()
                            .next()
                            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')))
                .then_some((open, close, name))
            });
            match capture {
                Some((open, close, name)) => {
                    if open > 0 {
                        parts.push(PatternPart::Literal(rest[..open].to_string()));
                    }
                    if matches!(parts.last(), Some(PatternPart::Capture(_))) {
                        return self.error("a pattern cannot have two captures next to each other");
                    }
                    parts.push(PatternPart::Capture(
                        (name != "_").then(|| name.to_string()),
                    ));
                    rest = &rest[close + 1..];
                }
                None => {
                    parts.push(PatternPart::Literal(rest.to_string()));
                    rest = "";
                }
            }
        }
        if !parts
            .iter()
            .any(|p| matches!(p, PatternPart::Capture(Some(_))))
        {
            return self.error("a pattern needs at least one named capture (<name>)");
        }
        Ok(parts)
    }

    fn template(&self, text: &str) -> Parsed<Template> {
        parse_template(text).or_else(|message| self.error(message))
    }
}

/// A `| json` parameter's expression: `a.b[0]["c d"]`.
fn json_path(text: &str) -> Option<Vec<PathStep>> {
    let mut steps = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'.' => i += 1,
            b'[' => {
                let close = text[i..].find(']')? + i;
                let inner = text[i + 1..close].trim();
                if let Some(key) = inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                    steps.push(PathStep::Key(key.to_string()));
                } else {
                    steps.push(PathStep::Index(inner.parse().ok()?));
                }
                i = close + 1;
            }
            _ => {
                let end = text[i..].find(['.', '[']).map_or(text.len(), |e| e + i);
                steps.push(PathStep::Key(text[i..end].to_string()));
                i = end;
            }
        }
    }
    (!steps.is_empty()).then_some(steps)
}

/// A Go-template subset: text, `{{ .label }}`, `{{ __line__ }}`, `{{ "text" }}`, and pipes
/// into the functions of [`Function`] (`{{ .path | trimPrefix "/api" | upper }}`), or a
/// function called directly on a label (`{{ upper .name }}`).
pub fn parse_template(text: &str) -> Result<Template, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let Some(open) = rest.find("{{") else {
            parts.push(TemplatePart::Text(rest.to_string()));
            break;
        };
        if open > 0 {
            parts.push(TemplatePart::Text(rest[..open].to_string()));
        }
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or("a template action {{ is missing its closing }}")?;
        let action = after[..close].trim_matches(|c: char| c == '-' || c.is_whitespace());
        parts.push(template_action(action)?);
        rest = &after[close + 2..];
    }
    Ok(Template(parts))
}

fn template_words(action: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = action.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if c == '|' {
            chars.next();
            words.push("|".into());
            continue;
        }
        if c == '"' {
            let (value, end) = quoted(action, i)?;
            words.push(format!("\"{value}"));
            while chars.peek().is_some_and(|(j, _)| *j < end) {
                chars.next();
            }
            continue;
        }
        let mut word = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c.is_whitespace() || c == '|' {
                break;
            }
            word.push(c);
            chars.next();
        }
        words.push(word);
    }
    Ok(words)
}

fn template_action(action: &str) -> Result<TemplatePart, String> {
    let words = template_words(action)?;
    let mut commands = words.split(|w| w == "|");
    let first = commands.next().unwrap_or_default();
    let operand = template_operand(first)?;
    let mut pipes = Vec::new();
    for command in commands {
        let Some((name, args)) = command.split_first() else {
            return Err("a template pipe `|` has nothing after it".into());
        };
        let function = template_function(name)?;
        if args.len() != function.arguments() {
            return Err(format!(
                "the template function {name} takes {} argument(s) before the piped value",
                function.arguments()
            ));
        }
        pipes.push((
            function,
            args.iter()
                .map(|a| literal_argument(a))
                .collect::<Result<_, _>>()?,
        ));
    }
    Ok(TemplatePart::Action(operand, pipes))
}

fn template_function(name: &str) -> Result<Function, String> {
    Function::named(name).ok_or_else(|| match name {
        "if" | "else" | "end" | "range" | "with" | "define" | "template" | "block" => format!(
            "the template action {{{{{name}}}}} is not supported by this aggregator's LogQL (see docs/logql.md)"
        ),
        _ => format!(
            "the template function {name} is not supported by this aggregator's LogQL (see docs/logql.md)"
        ),
    })
}

fn literal_argument(word: &str) -> Result<String, String> {
    if let Some(text) = word.strip_prefix('"') {
        return Ok(text.to_string());
    }
    if word.parse::<f64>().is_ok() {
        return Ok(word.to_string());
    }
    Err(format!(
        "template argument {word} must be a quoted text or a number"
    ))
}

fn template_operand(words: &[String]) -> Result<Operand, String> {
    match words {
        [] => Err("a template action {{ }} is empty".into()),
        [one] => single_operand(one),
        [name, args @ ..] => {
            let function = template_function(name)?;
            let Some((value, texts)) = args.split_last() else {
                return Err(format!("the template function {name} needs a value"));
            };
            if texts.len() != function.arguments() {
                return Err(format!(
                    "the template function {name} takes {} argument(s) and a value",
                    function.arguments()
                ));
            }
            Ok(Operand::Call(
                function,
                texts
                    .iter()
                    .map(|a| literal_argument(a))
                    .collect::<Result<_, _>>()?,
                Box::new(single_operand(value)?),
            ))
        }
    }
}

fn single_operand(word: &str) -> Result<Operand, String> {
    if let Some(text) = word.strip_prefix('"') {
        return Ok(Operand::Text(text.to_string()));
    }
    if word == "__line__" {
        return Ok(Operand::Line);
    }
    if let Some(name) = word.strip_prefix('.')
        && !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Ok(Operand::Label(name.to_string()));
    }
    Err(format!(
        "{word} is not supported in a template by this aggregator's LogQL (use .label, __line__ or a quoted text)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(query: &str) -> String {
        parse(query).expect_err(query).to_string()
    }

    #[test]
    fn durations_bytes_and_times_read_as_loki_reads_them() {
        assert_eq!(parse_duration("1h30m"), Some(5_400_000_000_000));
        assert_eq!(parse_duration("250ms"), Some(250_000_000));
        assert_eq!(parse_duration("1.5s"), Some(1_500_000_000));
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_bytes("20MB"), Some(20e6));
        assert_eq!(parse_bytes("1KiB"), Some(1024.0));
        assert_eq!(parse_bytes("7"), Some(7.0));
        assert_eq!(parse_bytes("7 parsecs"), None);
    }

    #[test]
    fn precedence_and_groupings_follow_promql() {
        let Ok(Expr::Metric(MetricExpr::Binary { op, rhs, .. })) =
            parse(r#"sum(rate({a="b"}[1m])) + 2 * 3"#)
        else {
            panic!("a binary expression");
        };
        assert_eq!(op, BinOp::Add);
        assert!(matches!(*rhs, MetricExpr::Binary { op: BinOp::Mul, .. }));
        let Ok(Expr::Metric(MetricExpr::Vector { grouping, .. })) =
            parse(r#"sum(count_over_time({a="b"}[1m])) without (pod)"#)
        else {
            panic!("an aggregation");
        };
        assert_eq!(
            grouping,
            Some(Grouping {
                without: true,
                labels: vec!["pod".into()]
            })
        );
        let Ok(Expr::Log(log)) = parse(
            r#"{a="b"} |= "x" or "y" | json | status >= 500 and method="GET", dur > 1s or size < 2KB | line_format "{{.a | upper}}""#,
        ) else {
            panic!("a log query");
        };
        assert_eq!(log.stages.len(), 4);
    }

    #[test]
    fn what_is_outside_the_subset_is_named_with_its_column() {
        assert!(
            error(r#"{a="b"} | distinct x"#)
                .contains("col 11: the distinct stage is not supported")
        );
        assert!(
            error(r#"sum by (a) (rate({a="b"}[1m])) * on (a) group_left rate({a="b"}[1m])"#)
                .contains("group_left")
        );
        assert!(error(r#"rate({a="b"}[5m:1m])"#).starts_with("parse error at line 1, col"));
        assert!(error(r#"{a="b"} |= ip("10.0.0.0/8")"#).contains("ip() line filter"));
        assert!(error(r#"{a="b"} | line_format `{{ printf "%s" .a }}`"#).contains("printf"));
        assert!(error(r#"{a=""}"#).contains("at least one regexp or equality matcher"));
        assert!(error(r#"{a="b"} | regexp "[""#).contains("invalid regular expression"));
        assert!(error(&"(".repeat(100)).contains("nests deeper than 32"));
        assert!(error(&"x".repeat(MAX_LENGTH + 1)).contains("longer than"));
        assert!(
            error(&format!("{{a=\"b\"}} | {}", "(a=\"1\" or ".repeat(40))).contains("nests deeper")
        );
    }

    #[test]
    fn templates_read_pipes_calls_and_refuse_control_actions() {
        let t = parse_template(
            r#"a {{ .x | trimPrefix "/api" | upper }} {{ default "-" .y }} {{__line__}}"#,
        )
        .unwrap();
        assert_eq!(t.0.len(), 6);
        assert!(
            parse_template("{{ if .x }}y{{ end }}")
                .unwrap_err()
                .contains("{{if}}")
        );
        assert!(
            parse_template("{{ .x | nope }}")
                .unwrap_err()
                .contains("nope")
        );
        assert!(parse_template("{{ .x ").is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any text is a query or a parse error: nothing panics, nothing runs away.
        #[test]
        fn any_text_parses_or_is_refused(text in r#"[{}()\[\]|=!~"`a-z0-9 ,.<>*+/^%#-]{0,80}"#) {
            let _ = parse(&text);
        }

        #[test]
        fn any_template_parses_or_is_refused(text in r#"[{}. |"a-zA-Z0-9_-]{0,60}"#) {
            let _ = parse_template(&text);
        }
    }
}
