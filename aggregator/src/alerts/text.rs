//! Full-text conditions for alert rules, evaluated on each entry as it passes: terms and
//! "phrases" (all required), `OR` between two of them, `NOT term` or `-term` to exclude.
//! Words are compared as the index compares them: lower-cased, split at anything that is not
//! a letter or a digit.

use std::collections::HashMap;

use aho_corasick::{AhoCorasick, MatchKind};

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
/// An ASCII message (nearly all) is searched for every vocabulary word at once with one
/// Aho-Corasick automaton (SIMD prefilters, case-insensitive), and only the hits that are
/// whole words count: the message's other words are never looked at one by one. Other
/// messages are split into words and each is looked up.
#[derive(Debug, Default)]
pub struct Vocabulary {
    ids: HashMap<String, u32, foldhash::fast::RandomState>,
    /// The ASCII words and their ids, built on the first scan.
    automaton: std::sync::OnceLock<Option<(AhoCorasick, Vec<u32>)>>,
}

/// A message as the rules see it: the vocabulary words it holds, in order, each with
/// whether it directly follows the one before (no other word between: phrases), and the set
/// of ids present.
#[derive(Debug, Default)]
pub struct Seen {
    sequence: Vec<(u32, bool)>,
    present: Vec<u64>,
    /// The message lower-cased (a buffer kept between entries).
    lower: Vec<u8>,
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

impl Vocabulary {
    fn id(&mut self, word: &str) -> u32 {
        let next = self.ids.len() as u32;
        *self.ids.entry(word.to_string()).or_insert(next)
    }

    fn automaton(&self) -> Option<&(AhoCorasick, Vec<u32>)> {
        self.automaton
            .get_or_init(|| {
                let (words, ids): (Vec<&str>, Vec<u32>) = self
                    .ids
                    .iter()
                    .filter(|(word, _)| word.is_ascii())
                    .map(|(word, id)| (word.as_str(), *id))
                    .unzip();
                if words.is_empty() {
                    return None;
                }
                // Case-sensitive over a lower-cased copy of the message: the automaton's SIMD
                // prefilter handles the words as they are, not every mix of cases.
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(words)
                    .ok()
                    .map(|automaton| (automaton, ids))
            })
            .as_ref()
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
        if text.is_ascii() {
            let Some((automaton, ids)) = self.automaton() else {
                return;
            };
            let mut lower = std::mem::take(&mut seen.lower);
            lower.clear();
            lower.extend_from_slice(text.as_bytes());
            lower.make_ascii_lowercase();
            let bytes = lower.as_slice();
            // A hit is a word when it is a whole alphanumeric run. Words are alphanumeric, so
            // a hit never spans two runs, and the leftmost-longest hit at a run's start is the
            // whole run whenever the run is a word.
            let mut previous_end: Option<usize> = None;
            for hit in automaton.find_iter(bytes) {
                let (start, end) = (hit.start(), hit.end());
                let whole = (start == 0 || !is_word_byte(bytes[start - 1]))
                    && (end == bytes.len() || !is_word_byte(bytes[end]));
                if !whole {
                    continue;
                }
                let follows = previous_end
                    .is_some_and(|e| !bytes[e..start].iter().copied().any(is_word_byte));
                Vocabulary::record(ids[hit.pattern().as_usize()], follows, seen);
                previous_end = Some(end);
            }
            seen.lower = lower;
            return;
        }
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
}

impl Seen {
    fn has(&self, id: u32) -> bool {
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
        let mut seen = Seen::default();
        for message in messages {
            vocabulary.scan(message, &mut seen);
            for (text, ids) in &compiled {
                assert_eq!(
                    ids.matches(&seen),
                    reference(text, message),
                    "{text:?} on {message:?}"
                );
            }
        }
    }
}
