//! Full-text conditions for alert rules, evaluated on each entry as it passes: terms and
//! "phrases" (all required), `OR` between two of them, `NOT term` or `-term` to exclude.
//! Words are compared as the index compares them: lower-cased, split at anything that is not
//! a letter or a digit.

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

/// A text lower-cased once, with where each word is: two allocations, however many words
/// and rules.
pub struct Words {
    lower: String,
    spans: Vec<(usize, usize)>,
}

impl Words {
    pub fn of(text: &str) -> Words {
        let lower = text.to_lowercase();
        let mut spans = Vec::new();
        let mut start = None;
        for (i, c) in lower.char_indices() {
            match (c.is_alphanumeric(), start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    spans.push((s, i));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            spans.push((s, lower.len()));
        }
        Words { lower, spans }
    }

    fn word(&self, i: usize) -> &str {
        let (start, end) = self.spans[i];
        &self.lower[start..end]
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

    /// Whether `text` satisfies the query.
    pub fn matches(&self, text: &str) -> bool {
        self.matches_words(&Words::of(text))
    }

    /// The same, for a text split once and matched by many rules.
    pub fn matches_words(&self, words: &Words) -> bool {
        self.groups.iter().all(|group| {
            group.iter().any(|clause| {
                let n = clause.words.len();
                let found = (0..words.spans.len().saturating_sub(n - 1)).any(|start| {
                    clause
                        .words
                        .iter()
                        .enumerate()
                        .all(|(j, w)| words.word(start + j) == w)
                });
                found != clause.negated
            })
        })
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
