//! Full-text conditions for alert rules, evaluated on each entry as it passes: terms and
//! "phrases" (all required), `OR` between two of them, `NOT term` or `-term` to exclude.
//! Words are compared as the index compares them: lower-cased, split at anything that is not
//! a letter or a digit.

use std::collections::HashMap;

/// One term or phrase, as lower-case words.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Clause {
    words: Vec<String>,
    negated: bool,
}

/// A compiled query: every group must be satisfied; a group is satisfied when any of its
/// clauses is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextQuery {
    groups: Vec<Vec<Clause>>,
}

/// Every word any rule's query looks for, numbered. An entry's message is read once,
/// however many rules look at it; a rule then tests bits instead of comparing strings.
///
/// An ASCII message (nearly all) is cut into its words in one pass over its bytes, and a
/// word is looked up only if a vocabulary word has its length and its first two letters
/// ([`WordFilter`]): most of a message's words are turned away by two bit tests, without
/// being lower-cased or hashed. Other messages are split into words and each is looked up.
#[derive(Debug, Default)]
pub struct Vocabulary {
    ids: HashMap<String, u32, foldhash::fast::RandomState>,
    /// Built on the first scan, once every word is in.
    filter: std::sync::OnceLock<WordFilter>,
}

/// The vocabulary's ASCII words, and their lengths and first two letters.
#[derive(Debug)]
struct WordFilter {
    ids: HashMap<Vec<u8>, u32, foldhash::fast::RandomState>,
    /// Bit `n` (63: 63 and longer) is set when a word has `n` bytes.
    lengths: u64,
    /// Bit `first << 8 | second` (second 0 for a one-letter word) of 65,536, lower-cased.
    pairs: Box<[u64]>,
}

impl WordFilter {
    fn new<'w>(words: impl Iterator<Item = (&'w String, &'w u32)>) -> WordFilter {
        let mut filter = WordFilter {
            ids: HashMap::default(),
            lengths: 0,
            pairs: vec![0; 1024].into_boxed_slice(),
        };
        for (word, &id) in words.filter(|(w, _)| w.is_ascii() && !w.is_empty()) {
            filter.ids.insert(word.as_bytes().to_vec(), id);
            filter.lengths |= WordFilter::length_bit(word.len());
            let pair = WordFilter::pair(word.as_bytes());
            filter.pairs[pair / 64] |= 1 << (pair % 64);
        }
        filter
    }

    fn length_bit(len: usize) -> u64 {
        1 << len.min(63)
    }

    fn pair(word: &[u8]) -> usize {
        let first = word.first().map_or(0, u8::to_ascii_lowercase);
        let second = word.get(1).map_or(0, u8::to_ascii_lowercase);
        usize::from(first) << 8 | usize::from(second)
    }

    /// Records `word` (ASCII) in `seen` if it is a vocabulary word, and says whether it was.
    #[inline(always)]
    fn read(&self, word: &[u8], follows: bool, lower: &mut Vec<u8>, seen: &mut Seen) -> bool {
        if !self.may_hold(word) {
            return false;
        }
        lower.clear();
        lower.extend(word.iter().map(u8::to_ascii_lowercase));
        match self.ids.get(lower.as_slice()) {
            Some(&id) => {
                Vocabulary::record(id, follows, seen);
                true
            }
            None => false,
        }
    }

    /// Whether `word` (a non-empty ASCII word, any case) may be a vocabulary word.
    fn may_hold(&self, word: &[u8]) -> bool {
        let pair = WordFilter::pair(word);
        self.lengths & WordFilter::length_bit(word.len()) != 0
            && self.pairs[pair / 64] & (1 << (pair % 64)) != 0
    }
}

/// A message as the rules see it: the vocabulary words it holds, in order, each with
/// whether it directly follows the one before (no other word between: phrases), and the set
/// of ids present.
#[derive(Debug, Default)]
pub struct Seen {
    sequence: Vec<(u32, bool)>,
    present: Vec<u64>,
    /// A word lower-cased (a buffer kept between entries).
    lower: Vec<u8>,
}

/// 1 for the bytes ASCII words are made of (letters and digits), 0 for the others.
const WORD_BYTES: [u8; 256] = {
    let mut table = [0; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric() as u8;
        b += 1;
    }
    table
};

impl Vocabulary {
    fn id(&mut self, word: &str) -> u32 {
        let next = self.ids.len() as u32;
        *self.ids.entry(word.to_string()).or_insert(next)
    }

    /// The number of `word` (lower-case), if a query looks for it.
    #[cfg(test)]
    pub fn id_of(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied()
    }

    fn filter(&self) -> &WordFilter {
        self.filter.get_or_init(|| WordFilter::new(self.ids.iter()))
    }

    fn record(id: u32, follows: bool, seen: &mut Seen) {
        seen.present[id as usize / 64] |= 1 << (id % 64);
        seen.sequence.push((id, follows));
    }

    /// Reads `text` into `seen` (reused between entries, so no allocation in the steady
    /// state). Does nothing when no rule has a query.
    pub fn scan(&self, text: &str, seen: &mut Seen) {
        seen.sequence.clear();
        seen.present.clear();
        if self.ids.is_empty() {
            return;
        }
        seen.present.resize(self.ids.len().div_ceil(64), 0);
        if self.scan_ascii(text.as_bytes(), seen) {
            return;
        }
        // Not ASCII (nothing was read): word by word.
        let mut lower = String::new();
        let mut previous_known = false;
        for word in text.split(|c: char| !c.is_alphanumeric()) {
            if word.is_empty() {
                continue;
            }
            lower.clear();
            lower.extend(word.chars().flat_map(char::to_lowercase));
            match self.ids.get(lower.as_str()) {
                Some(&id) => {
                    Vocabulary::record(id, previous_known, seen);
                    previous_known = true;
                }
                None => previous_known = false,
            }
        }
    }

    /// Reads an ASCII message into `seen`; `false` (and nothing read) if it is not ASCII.
    ///
    /// The message is read 64 bytes at a time into a bit mask of its word bytes, without a
    /// branch per byte; the words are then found from the mask's edges, one step per word.
    fn scan_ascii(&self, bytes: &[u8], seen: &mut Seen) -> bool {
        if !bytes.is_ascii() {
            return false;
        }
        let filter = self.filter();
        let mut lower = std::mem::take(&mut seen.lower);
        let mut previous_known = false;
        // Where the word that runs into the current chunk started.
        let mut open: Option<usize> = None;
        for (n, chunk) in bytes.chunks(64).enumerate() {
            let base = n * 64;
            let mut mask = 0u64;
            for (i, &b) in chunk.iter().enumerate() {
                mask |= u64::from(WORD_BYTES[usize::from(b)]) << i;
            }
            // Bit i of `edges`: byte i starts a word (it is a word byte) or ends one.
            let mut edges = mask ^ (mask << 1 | u64::from(open.is_some()));
            while edges != 0 {
                let i = edges.trailing_zeros() as usize;
                edges &= edges - 1;
                if mask & (1 << i) != 0 {
                    open = Some(base + i);
                } else if let Some(start) = open.take() {
                    let word = &bytes[start..base + i];
                    previous_known = filter.read(word, previous_known, &mut lower, seen);
                }
            }
        }
        if let Some(start) = open {
            filter.read(&bytes[start..], previous_known, &mut lower, seen);
        }
        seen.lower = lower;
        true
    }
}

impl Seen {
    /// Whether the message holds word `id`.
    pub fn has(&self, id: u32) -> bool {
        self.present
            .get(id as usize / 64)
            .is_some_and(|bits| bits & (1 << (id % 64)) != 0)
    }

    /// Whether the words of `phrase` appear one right after the other.
    fn has_phrase(&self, phrase: &[u32]) -> bool {
        self.sequence.windows(phrase.len()).any(|window| {
            window
                .iter()
                .zip(phrase)
                .enumerate()
                .all(|(i, ((id, follows), wanted))| id == wanted && (i == 0 || *follows))
        })
    }
}

/// A query compiled against a vocabulary.
#[derive(Clone, Debug)]
pub struct IdQuery {
    groups: Vec<Vec<(Vec<u32>, bool)>>,
}

impl IdQuery {
    /// A word that every message the query matches holds: the first word of a group that is
    /// one clause, not negated (`a -b` needs `a`; `a OR b` and `-b` need no single word).
    pub fn required_word(&self) -> Option<u32> {
        self.groups.iter().find_map(|group| match group.as_slice() {
            [(words, false)] => words.first().copied(),
            _ => None,
        })
    }

    pub fn matches(&self, seen: &Seen) -> bool {
        self.groups.iter().all(|group| {
            group.iter().any(|(words, negated)| {
                let found = match words.as_slice() {
                    [] => false,
                    [one] => seen.has(*one),
                    phrase => phrase.iter().all(|&id| seen.has(id)) && seen.has_phrase(phrase),
                };
                found != *negated
            })
        })
    }
}

/// The words of a text, as the matcher sees them.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

impl TextQuery {
    pub fn parse(query: &str) -> Result<TextQuery, String> {
        let mut tokens: Vec<(String, bool)> = Vec::new(); // (text, quoted)
        let mut rest = query.trim();
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('"') {
                let end = after
                    .find('"')
                    .ok_or_else(|| "a phrase is missing its closing quote".to_string())?;
                tokens.push((after[..end].to_string(), true));
                rest = after[end + 1..].trim_start();
            } else if let Some(after) = rest.strip_prefix("-\"") {
                let end = after
                    .find('"')
                    .ok_or_else(|| "a phrase is missing its closing quote".to_string())?;
                tokens.push(("NOT".into(), false));
                tokens.push((after[..end].to_string(), true));
                rest = after[end + 1..].trim_start();
            } else {
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                tokens.push((rest[..end].to_string(), false));
                rest = rest[end..].trim_start();
            }
        }
        let mut groups: Vec<Vec<Clause>> = Vec::new();
        let mut negate = false;
        let mut join = false;
        for (token, quoted) in tokens {
            if !quoted && token == "NOT" {
                negate = true;
                continue;
            }
            if !quoted && token == "OR" {
                if groups.is_empty() || negate {
                    return Err("OR needs a term on each side".into());
                }
                join = true;
                continue;
            }
            if !quoted && token == "AND" {
                continue;
            }
            let (text, negated) = match token.strip_prefix('-') {
                Some(t) if !quoted && !t.is_empty() => (t.to_string(), true),
                _ => (token, negate),
            };
            let words: Vec<String> = words(&text).collect();
            if words.is_empty() {
                return Err(format!("{text:?} has no word to look for"));
            }
            let clause = Clause { words, negated };
            match groups.last_mut() {
                Some(group) if join => group.push(clause),
                _ => groups.push(vec![clause]),
            }
            negate = false;
            join = false;
        }
        if negate || join {
            return Err("the query ends with an operator".into());
        }
        if groups.is_empty() {
            return Err("the query is empty".into());
        }
        Ok(TextQuery { groups })
    }

    /// The query with its words numbered in `vocabulary` (adding those it lacks).
    pub fn compile(&self, vocabulary: &mut Vocabulary) -> IdQuery {
        IdQuery {
            groups: self
                .groups
                .iter()
                .map(|group| {
                    group
                        .iter()
                        .map(|clause| {
                            let ids = clause.words.iter().map(|w| vocabulary.id(w)).collect();
                            (ids, clause.negated)
                        })
                        .collect()
                })
                .collect(),
        }
    }

    /// Whether `text` satisfies the query (one-off; the evaluator shares a vocabulary).
    pub fn matches(&self, text: &str) -> bool {
        let mut vocabulary = Vocabulary::default();
        let query = self.compile(&mut vocabulary);
        let mut seen = Seen::default();
        vocabulary.scan(text, &mut seen);
        query.matches(&seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(query: &str) -> TextQuery {
        TextQuery::parse(query).unwrap()
    }

    #[test]
    fn terms_phrases_or_and_not() {
        let text = "Payment 4711 FAILED: card declined by issuer";
        assert!(q("payment declined").matches(text));
        assert!(!q("payment refunded").matches(text));
        assert!(q("\"card declined\"").matches(text));
        assert!(!q("\"declined card\"").matches(text));
        assert!(q("refunded OR declined").matches(text));
        assert!(q("payment AND (declined)").matches(text));
        assert!(!q("payment -declined").matches(text));
        assert!(!q("payment NOT declined").matches(text));
        assert!(q("payment -\"card accepted\"").matches(text));
        assert!(q("4711").matches(text));
        assert!(!q("471").matches(text));
    }

    #[test]
    fn malformed_queries_say_why() {
        for query in ["", "\"open", "OR x", "x OR", "NOT", "--"] {
            assert!(TextQuery::parse(query).is_err(), "{query:?}");
        }
    }

    /// The meaning of a query, written plainly: every group has a clause whose words appear
    /// in a row among the text's words (or do not, when negated).
    fn reference(query: &TextQuery, text: &str) -> bool {
        let text_words: Vec<String> = words(text).collect();
        query.groups.iter().all(|group| {
            group.iter().any(|clause| {
                let found = !clause.words.is_empty()
                    && text_words
                        .windows(clause.words.len())
                        .any(|w| w == clause.words.as_slice());
                found != clause.negated
            })
        })
    }

    #[test]
    fn compiled_queries_answer_as_the_text_does() {
        let queries = [
            "payment declined",
            "\"card declined\"",
            "überfällig",
            "refunded OR declined",
            "payment -declined",
            "a",
            "supercalifragilisticexpialidocioussupercalifragilisticexpialidocious",
        ];
        let mut vocabulary = Vocabulary::default();
        let compiled: Vec<(TextQuery, IdQuery)> = queries
            .iter()
            .map(|query| {
                let parsed = q(query);
                let ids = parsed.compile(&mut vocabulary);
                (parsed, ids)
            })
            .collect();
        let messages = [
            "Payment 4711 FAILED: card declined by issuer",
            "PAYMENT DECLINED",
            "Zahlung ÜBERFÄLLIG seit 3 Tagen",
            "card-declined,payment",
            "A b c",
            "SUPERCALIFRAGILISTICEXPIALIDOCIOUSSUPERCALIFRAGILISTICEXPIALIDOCIOUS!",
            "",
            "payment refunded",
            "card, declined",
            "card foo declined",
            "xcard declined",
            "CARD DECLINED twice: card declined",
            "déclined card declined",
            "card déjà declined",
        ];
        let required: Vec<Option<u32>> = compiled
            .iter()
            .map(|(_, ids)| ids.required_word())
            .collect();
        let id = |word: &str| vocabulary.ids.get(word).copied();
        assert_eq!(required[0], id("payment"));
        assert_eq!(required[1], id("card"));
        assert_eq!(required[3], None, "either word will do");
        assert_eq!(required[4], id("payment"));
        // Long messages: words on, across and right after the 64-byte steps of the scan.
        let mut long = Vec::new();
        for pad in 50..=140 {
            for tail in ["card declined", "payment refunded 4711", "declined"] {
                long.push(format!("{}{tail}", ".".repeat(pad)));
                long.push(format!("{} {tail}", "x".repeat(pad)));
                long.push(format!("{tail}{}", " ".repeat(pad)));
            }
        }
        let mut seen = Seen::default();
        for message in messages
            .iter()
            .copied()
            .chain(long.iter().map(String::as_str))
        {
            vocabulary.scan(message, &mut seen);
            for (text, ids) in &compiled {
                assert_eq!(
                    ids.matches(&seen),
                    reference(text, message),
                    "{text:?} on {message:?}"
                );
                // The evaluator turns a message away when it lacks the required word.
                if let Some(word) = ids.required_word() {
                    assert!(!ids.matches(&seen) || seen.has(word), "{text:?}");
                }
            }
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            /// A rule's query from any text: compiled, or refused with a reason.
            #[test]
            fn any_text_is_a_rule_query_or_refused(text in ".{0,200}") {
                if let Ok(query) = TextQuery::parse(&text) {
                    let mut vocabulary = Vocabulary::default();
                    let _ = query.compile(&mut vocabulary);
                }
            }

            #[test]
            fn deep_or_long_rule_queries_stay_flat(n in 1usize..5000) {
                let _ = TextQuery::parse(&"NOT ".repeat(n));
                let _ = TextQuery::parse(&"(".repeat(n));
                let _ = TextQuery::parse(&"a OR ".repeat(n));
            }
        }
    }
}
