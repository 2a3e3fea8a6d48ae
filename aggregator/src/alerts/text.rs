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

/// Every word any rule's query looks for, numbered. An entry's message is looked up word
/// by word once, however many rules read it; a rule then tests bits instead of comparing
/// strings.
#[derive(Debug, Default)]
pub struct Vocabulary {
    ids: HashMap<String, u32, foldhash::fast::RandomState>,
}

/// A message as the rules see it: the vocabulary id of each word in order (`UNKNOWN` for
/// words no rule looks for), and the set of ids present.
#[derive(Debug, Default)]
pub struct Seen {
    sequence: Vec<u32>,
    present: Vec<u64>,
}

const UNKNOWN: u32 = u32::MAX;

impl Vocabulary {
    fn id(&mut self, word: &str) -> u32 {
        let next = self.ids.len() as u32;
        *self.ids.entry(word.to_string()).or_insert(next)
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
        let mut lower = String::new();
        for word in text.split(|c: char| !c.is_alphanumeric()) {
            if word.is_empty() {
                continue;
            }
            let id = if word
                .bytes()
                .any(|b| b.is_ascii_uppercase() || !b.is_ascii())
            {
                lower.clear();
                lower.extend(word.chars().flat_map(char::to_lowercase));
                self.ids.get(lower.as_str())
            } else {
                self.ids.get(word)
            };
            let id = id.copied().unwrap_or(UNKNOWN);
            if id != UNKNOWN {
                seen.present[id as usize / 64] |= 1 << (id % 64);
            }
            seen.sequence.push(id);
        }
    }
}

impl Seen {
    fn has(&self, id: u32) -> bool {
        self.present
            .get(id as usize / 64)
            .is_some_and(|bits| bits & (1 << (id % 64)) != 0)
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
                    phrase => {
                        phrase.iter().all(|&id| seen.has(id))
                            && seen.sequence.windows(phrase.len()).any(|w| w == phrase)
                    }
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
}
