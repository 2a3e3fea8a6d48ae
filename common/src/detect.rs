//! The level of a plain-text log line, read where the common formats put it.
//!
//! One table of rules ([`RULES`]), tried in order on the entry's first line; the first that
//! finds a level wins. The rules, and why each is shaped as it is, are in `docs/levels.md`.
//! In short: a level word counts only where formats put one — in brackets (`[error]`,
//! `[core:warn]`), as the first word after the line's prefix of timestamps, numbers and dashes
//! (`2026-12-01 12:00:00,123 - WARN …`, `fail: …`), followed by a colon in the first two words
//! (`PHP Warning: …`), or shouted (`ERROR`) within the first eight words — so `0 errors`,
//! `error_count=0`, `retrying after error` and `/var/www/error.html` never make an error.
//! Formats that spell the level as a letter or a symbol (klog, logcat, Redis, the kernel's
//! `<N>`) and exception headers (`Traceback …`, `panic: …`, `java.lang.…Exception: …`) have
//! rules of their own.
//!
//! Cost: the rules look at the first 200 bytes of the first line at most, without allocating;
//! a line with its level early (most formatted logs) stops there.

use crate::LogLevel;

/// How far into the first line a level is looked for.
const HEAD_BYTES: usize = 200;
/// How far past the first line a multiline entry is looked at for a stack trace.
const TRACE_BYTES: usize = 4096;
/// How many words (tokens with letters, brackets included) a shouted level may follow.
const SHOUT_WINDOW: usize = 8;

/// A rule of the detector: what it reads, an example, and the reader.
pub struct Rule {
    pub name: &'static str,
    pub example: &'static str,
    read: fn(&Line<'_>) -> Option<LogLevel>,
}

/// The rules, in the order they are tried.
pub const RULES: &[Rule] = &[
    Rule {
        name: "exception header",
        example: "Traceback (most recent call last):  |  panic: runtime error  |  java.lang.IllegalStateException: boom",
        read: exception_header,
    },
    Rule {
        name: "kernel or syslog priority",
        example: "<3>usb 1-1: device descriptor read error  |  <165>1 2026-12-01T12:00:00Z host app - - - msg",
        read: priority,
    },
    Rule {
        name: "redis",
        example: "1:M 30 Nov 2026 12:00:00.123 # WARNING overcommit_memory is set to 0",
        read: redis,
    },
    Rule {
        name: "level word, letter or tag",
        example: "2026-11-30 19:04:29,071 - WARN [main] …  |  [Mon Nov 30 2026] [error] …  |  E1201 12:00:00.123 …",
        read: words,
    },
    Rule {
        name: "stack trace",
        example: "Unexpected failure\\n\\tat com.example.Foo.bar(Foo.java:12)",
        read: stack_trace,
    },
];

/// The level a plain-text entry states, if it states one.
pub fn detect_level(body: &str) -> Option<LogLevel> {
    let line = Line::new(body);
    RULES.iter().find_map(|rule| (rule.read)(&line))
}

/// A level as a field may spell it: every spelling [`LogLevel::parse`] takes, the
/// abbreviations of the word table (`SEVERE`, `fail`, `ERRO`, `dbug`, `FINE`, `verbose`…) and
/// the one-letter levels of klog and logcat (`E`, `W`, `I`, `D`, `V`, `F`, `A`).
pub fn level_name(text: &str) -> Option<LogLevel> {
    let text = text.trim();
    match text.as_bytes() {
        [letter] if letter.is_ascii_uppercase() => level_letter(*letter),
        word => LogLevel::parse(text).or_else(|| level_word(word).map(|(level, _)| level)),
    }
}

/// The rule that finds the level of `body`, for tests and documentation.
pub fn detecting_rule(body: &str) -> Option<&'static str> {
    let line = Line::new(body);
    RULES
        .iter()
        .find(|rule| (rule.read)(&line).is_some())
        .map(|rule| rule.name)
}

/// What the rules read: the whole entry, its first line, and the head of that line.
struct Line<'a> {
    body: &'a str,
    first: &'a str,
    head: &'a [u8],
}

impl<'a> Line<'a> {
    fn new(body: &'a str) -> Line<'a> {
        let first = match memchr::memchr(b'\n', body.as_bytes()) {
            Some(end) => &body[..end],
            None => body,
        };
        let first = first.strip_suffix('\r').unwrap_or(first);
        let head = &first.as_bytes()[..first.len().min(HEAD_BYTES)];
        Line { body, first, head }
    }
}

/// How freely a level word counts.
#[derive(Clone, Copy, PartialEq)]
enum Strength {
    /// Counts shouted anywhere in the window and as a bare first word in any case (`Error …`).
    Strong,
    /// Counts shouted anywhere in the window; in other cases only bracketed or before a colon.
    Shouted,
    /// Counts only bracketed, as the first word shouted or before a colon (`fail:`, `FINE`).
    Anchored,
}

/// Every level word, case-insensitive: the canonical spellings and the abbreviations real
/// software prints (logrus's `ERRO`, .NET's `fail`/`dbug`/`trce`, java.util.logging's
/// `SEVERE`/`FINE`, Android's `VERBOSE`).
const LEVEL_WORDS: &[(&str, LogLevel, Strength)] = &[
    ("error", LogLevel::Error, Strength::Strong),
    ("info", LogLevel::Info, Strength::Strong),
    ("warn", LogLevel::Warning, Strength::Strong),
    ("warning", LogLevel::Warning, Strength::Strong),
    ("debug", LogLevel::Debug, Strength::Strong),
    ("fatal", LogLevel::Critical, Strength::Strong),
    ("err", LogLevel::Error, Strength::Shouted),
    ("eror", LogLevel::Error, Strength::Shouted),
    ("erro", LogLevel::Error, Strength::Shouted),
    ("severe", LogLevel::Error, Strength::Shouted),
    ("inf", LogLevel::Info, Strength::Shouted),
    ("information", LogLevel::Info, Strength::Shouted),
    ("informational", LogLevel::Info, Strength::Shouted),
    ("wrn", LogLevel::Warning, Strength::Shouted),
    ("dbg", LogLevel::Debug, Strength::Shouted),
    ("debu", LogLevel::Debug, Strength::Shouted),
    ("trace", LogLevel::Trace, Strength::Shouted),
    ("trc", LogLevel::Trace, Strength::Shouted),
    ("trac", LogLevel::Trace, Strength::Shouted),
    ("notice", LogLevel::Notice, Strength::Shouted),
    ("critical", LogLevel::Critical, Strength::Shouted),
    ("crit", LogLevel::Critical, Strength::Shouted),
    ("crt", LogLevel::Critical, Strength::Shouted),
    ("fata", LogLevel::Critical, Strength::Shouted),
    ("alert", LogLevel::Alert, Strength::Shouted),
    ("emerg", LogLevel::Emergency, Strength::Shouted),
    ("emergency", LogLevel::Emergency, Strength::Shouted),
    ("panic", LogLevel::Emergency, Strength::Shouted),
    ("pani", LogLevel::Emergency, Strength::Shouted),
    ("fail", LogLevel::Error, Strength::Anchored),
    ("dbug", LogLevel::Debug, Strength::Anchored),
    ("trce", LogLevel::Trace, Strength::Anchored),
    ("fine", LogLevel::Debug, Strength::Anchored),
    ("finer", LogLevel::Trace, Strength::Anchored),
    ("finest", LogLevel::Trace, Strength::Anchored),
    ("verbose", LogLevel::Trace, Strength::Anchored),
];

/// A word of up to 16 ASCII letters as one number, lower-cased: what the lookup compares.
const fn pack(word: &[u8]) -> u128 {
    let mut packed = 0u128;
    let mut i = 0;
    while i < word.len() {
        packed = (packed << 8) | word[i].to_ascii_lowercase() as u128;
        i += 1;
    }
    packed
}

/// [`LEVEL_WORDS`] packed, so a token is looked up by comparing numbers.
const PACKED_WORDS: [u128; LEVEL_WORDS.len()] = {
    let mut packed = [0u128; LEVEL_WORDS.len()];
    let mut i = 0;
    while i < LEVEL_WORDS.len() {
        packed[i] = pack(LEVEL_WORDS[i].0.as_bytes());
        i += 1;
    }
    packed
};

/// For each first letter, the entries of [`LEVEL_WORDS`] (at most 64) that start with it, as
/// bits.
const BY_FIRST_LETTER: [u64; 26] = {
    let mut table = [0u64; 26];
    let mut i = 0;
    while i < LEVEL_WORDS.len() {
        let first = LEVEL_WORDS[i].0.as_bytes()[0];
        table[(first - b'a') as usize] |= 1 << i;
        i += 1;
    }
    table
};

fn level_word(word: &[u8]) -> Option<(LogLevel, Strength)> {
    if !(3..=13).contains(&word.len()) || !word.iter().all(u8::is_ascii_alphabetic) {
        return None;
    }
    let mut candidates = BY_FIRST_LETTER[(word[0].to_ascii_lowercase() - b'a') as usize];
    let packed = pack(word);
    while candidates != 0 {
        let i = candidates.trailing_zeros() as usize;
        if PACKED_WORDS[i] == packed {
            let (_, level, strength) = LEVEL_WORDS[i];
            return Some((level, strength));
        }
        candidates &= candidates - 1;
    }
    None
}

/// One-letter levels: klog/glog, Android logcat, MongoDB, Ruby's Logger.
fn level_letter(letter: u8) -> Option<LogLevel> {
    Some(match letter {
        b'V' => LogLevel::Trace,
        b'D' => LogLevel::Debug,
        b'I' => LogLevel::Info,
        b'W' => LogLevel::Warning,
        b'E' => LogLevel::Error,
        b'F' | b'A' => LogLevel::Critical,
        _ => return None,
    })
}

/// `Traceback (most recent call last):`, `Exception in thread …`, `panic: …`,
/// `goroutine 1 [running]:`, `thread 'main' panicked at …`, `Unhandled exception. …`,
/// `Caused by: …`, `java.lang.IllegalStateException: …`, `TypeError: …`: an exception, an error.
fn exception_header(line: &Line<'_>) -> Option<LogLevel> {
    let first = line.first;
    if !first.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    const ERRORS: [&str; 6] = [
        "Traceback (most recent call last):",
        "Exception in thread ",
        "panic: ",
        "Unhandled exception",
        "Unhandled Exception",
        "Caused by: ",
    ];
    if ERRORS.iter().any(|p| first.starts_with(p)) {
        return Some(LogLevel::Error);
    }
    if first.starts_with("fatal error: ") || first.starts_with("Fatal Python error: ") {
        return Some(LogLevel::Critical);
    }
    if let Some(rest) = first.strip_prefix("goroutine ")
        && rest.starts_with(|c: char| c.is_ascii_digit())
        && first.ends_with("]:")
    {
        return Some(LogLevel::Error);
    }
    if let Some(rest) = first.strip_prefix("thread '")
        && rest.contains("' panicked at")
    {
        return Some(LogLevel::Error);
    }
    // An exception's type as the first field: `pkg.Name(Exception|Error)` then `:` or the end.
    let field = match first.as_bytes().iter().position(|b| *b == b' ') {
        Some(end) => &first[..end],
        None => first,
    };
    let (name, colon) = match field.strip_suffix(':') {
        Some(name) => (name, true),
        None => (field, false),
    };
    if !colon && field.len() != first.len() {
        return None;
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'$'))
        && last.starts_with(|c: char| c.is_ascii_uppercase())
        && (last.ends_with("Exception") || last.ends_with("Error"));
    valid.then_some(LogLevel::Error)
}

/// `<3>…` (the kernel's printk level) or `<165>…` (a syslog PRI): the severity is the number
/// modulo 8.
fn priority(line: &Line<'_>) -> Option<LogLevel> {
    let rest = line.head.strip_prefix(b"<")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if !(1..=3).contains(&digits) || rest.get(digits) != Some(&b'>') {
        return None;
    }
    let n: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    if n > 191 {
        return None;
    }
    LogLevel::from_syslog_severity(n % 8)
}

/// Redis: `pid:role dd Mon yyyy hh:mm:ss.mmm <symbol> message` (or `[pid] dd Mon hh:mm:ss.mmm`
/// before 3.0), the symbol being `.` debug, `-` verbose, `*` notice, `#` warning.
fn redis(line: &Line<'_>) -> Option<LogLevel> {
    // `1:M ` or `[1] `: a short first field ending in a role letter or a bracket.
    let end = line.head.iter().take(14).position(|b| *b == b' ')?;
    if end < 3 || !matches!(line.head[end - 1], b'M' | b'S' | b'C' | b'X' | b']') {
        return None;
    }
    let mut fields = line.first.split(' ').filter(|f| !f.is_empty());
    let pid = fields.next()?;
    let role = pid
        .split_once(':')
        .is_some_and(|(n, r)| is_digits(n) && matches!(r, "M" | "S" | "C" | "X"));
    let old = pid
        .strip_prefix('[')
        .and_then(|p| p.strip_suffix(']'))
        .is_some_and(is_digits);
    if !role && !old {
        return None;
    }
    // The date and time, then the symbol.
    for field in fields.take(5) {
        match field {
            "." | "-" => return Some(LogLevel::Debug),
            "*" => return Some(LogLevel::Notice),
            "#" => return Some(LogLevel::Warning),
            _ if field.starts_with(|c: char| c.is_ascii_digit()) || is_month(field) => {}
            _ => return None,
        }
    }
    None
}

fn is_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

fn is_month(word: &str) -> bool {
    matches!(
        word,
        "Jan"
            | "Feb"
            | "Mar"
            | "Apr"
            | "May"
            | "Jun"
            | "Jul"
            | "Aug"
            | "Sep"
            | "Oct"
            | "Nov"
            | "Dec"
    )
}

/// Words that belong to a line's prefix, not its message: weekdays, months, time zones, and
/// the `PHP` of PHP's error log.
fn is_prefix_word(word: &[u8]) -> bool {
    matches!(
        word,
        b"Mon"
            | b"Tue"
            | b"Wed"
            | b"Thu"
            | b"Fri"
            | b"Sat"
            | b"Sun"
            | b"Jan"
            | b"Feb"
            | b"Mar"
            | b"Apr"
            | b"May"
            | b"Jun"
            | b"Jul"
            | b"Aug"
            | b"Sep"
            | b"Oct"
            | b"Nov"
            | b"Dec"
            | b"UTC"
            | b"GMT"
            | b"Z"
            | b"CET"
            | b"CEST"
            | b"EST"
            | b"EDT"
            | b"PST"
            | b"PDT"
            | b"AM"
            | b"PM"
            | b"PHP"
    )
}

/// The bytes that end a token.
const SEPARATORS: [bool; 256] = {
    let mut table = [false; 256];
    let bytes = b" \t[]()<>{}|,;:.\"'!?";
    let mut i = 0;
    while i < bytes.len() {
        table[bytes[i] as usize] = true;
        i += 1;
    }
    table
};

fn is_separator(b: u8) -> bool {
    SEPARATORS[b as usize]
}

/// The tokens of the head, each with what surrounds it, and the level-bearing ones: a level
/// word where it counts, a klog or logcat letter, a `…Warning:` type.
fn words(line: &Line<'_>) -> Option<LogLevel> {
    let head = line.head;
    let mut i = 0;
    // Brackets open at the current position.
    let mut depth = 0u32;
    // Words seen (tokens with a letter, bracketed or not), and words outside brackets since the
    // prefix or the last `]:` (the anchor: the first of them is the line's first word).
    let mut words_seen = 0usize;
    let mut anchored_words = 0usize;
    // Tokens so far are all prefix (numbers, timestamps, dashes): a letter may follow.
    let mut only_prefix = true;
    let mut first_token = true;
    while i < head.len() {
        let b = head[i];
        if is_separator(b) {
            match b {
                b'[' => depth += 1,
                b']' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 && head.get(i + 1) == Some(&b':') {
                        // `sshd[123]: error: …`: a syslog tag; the message starts after it.
                        anchored_words = 0;
                    }
                }
                _ => {}
            }
            i += 1;
            continue;
        }
        let start = i;
        while i < head.len() && !is_separator(head[i]) {
            i += 1;
        }
        let token = &head[start..i];
        let before = start.checked_sub(1).map(|j| head[j]);
        let after = head.get(i).copied();
        let is_first = std::mem::replace(&mut first_token, false);

        if is_first && let Some(level) = klog(token, &head[i..]) {
            return Some(level);
        }
        if token[0].is_ascii_digit()
            || token.iter().all(|b| !b.is_ascii_alphanumeric())
            || (token[0] == b'+' && token[1..].iter().all(u8::is_ascii_digit))
            || is_prefix_word(token)
        {
            continue;
        }
        let quoted = matches!(before, Some(b'"' | b'\''));
        let in_brackets = depth > 0;
        let anchor = if in_brackets {
            None
        } else {
            Some(anchored_words)
        };
        if !in_brackets {
            anchored_words += 1;
        }
        words_seen += 1;

        if only_prefix
            && !in_brackets
            && let Some(level) = letter(token, after, &head[i..])
        {
            return Some(level);
        }
        only_prefix = false;
        if quoted {
            continue;
        }
        // Celery's `ERROR/MainProcess`: a shouted level before a slash.
        let letters = token.iter().take_while(|b| b.is_ascii_alphabetic()).count();
        let (word, slashed) = match token.get(letters) {
            None => (token, false),
            Some(b'/') => (&token[..letters], true),
            Some(_) => (&token[..0], false),
        };
        let shouted = word.iter().all(u8::is_ascii_uppercase);
        if let Some((level, strength)) = level_word(word).filter(|_| shouted || !slashed) {
            let bracketed = in_brackets
                && matches!(skip_spaces_back(head, start), Some(b'[' | b':'))
                && skip_spaces(head, i) == Some(b']');
            let colon = after == Some(b':');
            let counts = bracketed
                || (anchor == Some(0) && (colon || shouted || strength == Strength::Strong))
                || (anchor == Some(1) && colon)
                || (shouted && strength != Strength::Anchored && words_seen <= SHOUT_WINDOW);
            if counts {
                return Some(level);
            }
        } else if after == Some(b':')
            && token.len() > 7
            && token.ends_with(b"Warning")
            && token[0].is_ascii_uppercase()
            && words_seen <= SHOUT_WINDOW
        {
            // `DeprecationWarning: …`, `UserWarning: …`.
            return Some(LogLevel::Warning);
        }
        if words_seen >= SHOUT_WINDOW && anchored_words > 1 {
            return None;
        }
    }
    None
}

/// klog/glog: `E1201 12:00:00.123456 …`: a severity letter and MMDD, then the time.
fn klog(token: &[u8], rest: &[u8]) -> Option<LogLevel> {
    if token.len() != 5 || !token[1..].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let time = rest.strip_prefix(b" ")?;
    if !(time.len() >= 3 && time[..2].iter().all(u8::is_ascii_digit) && time[2] == b':') {
        return None;
    }
    match token[0] {
        b'I' | b'W' | b'E' | b'F' => level_letter(token[0]),
        _ => None,
    }
}

/// A one-letter level after nothing but a prefix: logcat's `… 1702  2395 W Tag: …` and
/// `W/Tag( 1702): …`, MongoDB's `… E NETWORK [conn1] …`, Ruby's `E, [… #1] ERROR -- : …`.
fn letter(token: &[u8], after: Option<u8>, rest: &[u8]) -> Option<LogLevel> {
    if token.len() >= 3 && token[1] == b'/' && token[2].is_ascii_alphabetic() {
        // logcat brief and time formats: `E/Tag(` or `E/Tag:`.
        return level_letter(token[0]).filter(|_| matches!(after, Some(b'(' | b':')));
    }
    if token.len() != 1 {
        return None;
    }
    let level = level_letter(token[0])?;
    if after == Some(b',') {
        return rest.starts_with(b", [").then_some(level);
    }
    // The next token: a tag ending in `:` (logcat) or a shouted component (MongoDB).
    let next = rest.strip_prefix(b" ")?;
    let next = &next[next.iter().take_while(|b| **b == b' ').count()..];
    let end = next
        .iter()
        .position(|b| *b == b' ' || *b == b':')
        .unwrap_or(next.len());
    let word = &next[..end];
    let tag = next.get(end) == Some(&b':') && end > 0;
    let component = word.len() >= 2 && word.iter().all(|b| b.is_ascii_uppercase() || *b == b'_');
    (tag || component).then_some(level)
}

fn skip_spaces_back(head: &[u8], start: usize) -> Option<u8> {
    head[..start].iter().rev().find(|b| **b != b' ').copied()
}

fn skip_spaces(head: &[u8], from: usize) -> Option<u8> {
    head[from..].iter().find(|b| **b != b' ').copied()
}

/// A multiline entry whose first line states no level but whose next lines are a stack
/// trace's frames: an error.
fn stack_trace(line: &Line<'_>) -> Option<LogLevel> {
    let rest = line.body.get(line.first.len()..)?;
    if rest.is_empty() {
        return None;
    }
    const FRAMES: [&str; 6] = [
        "\n\tat ",
        "\n    at ",
        "\nCaused by: ",
        "\n  File \"",
        "\nTraceback (most recent call last):",
        "\ngoroutine ",
    ];
    // A trace starts right under the line it belongs to: its first lines decide.
    let rest = &rest.as_bytes()[..rest.len().min(TRACE_BYTES)];
    FRAMES
        .iter()
        .any(|frame| memchr::memmem::find(rest, frame.as_bytes()).is_some())
        .then_some(LogLevel::Error)
}

#[cfg(test)]
mod tests;
