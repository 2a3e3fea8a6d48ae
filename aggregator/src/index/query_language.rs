//! The `q` language of `/api/search` and `/api/analytics`, parsed into a bounded tree.
//!
//! ```text
//! payment declined            both words, anywhere in the entry (AND is the default)
//! "card declined"             a phrase: the words next to each other, in this order
//! gateway OR refused          either
//! payment AND NOT accepted    NOT, or -term, excludes; +term requires
//! (a OR b) c                  grouping
//! user_id:alice               one field: service, level, message, tags, id, trace_id,
//! context.order_id:4711       span_id, request_id, correlation_id, user_id, environment,
//! kubernetes.namespace:shop   service_version, context.<path>, kubernetes.<key>
//! *declin*  declin*  *lined   a fragment of a word (contains, starts, ends); slower
//! ```
//!
//! Words are compared as the store cuts them: lower-cased, split at anything that is not a
//! letter or a digit. Values of `service`, `level`, `tags` and the ids are compared whole.
//!
//! Everything here comes from a client, so the tree is bounded: at most [`MAX_DEPTH`] levels
//! of parentheses and negations, [`MAX_TERMS`] terms and [`MAX_LENGTH`] bytes. The parser's
//! recursion is bounded by the depth it checks, so no input can exhaust the stack.

/// Deepest nesting of parentheses and negations.
pub const MAX_DEPTH: usize = 32;
/// Most terms in one query.
pub const MAX_TERMS: usize = 256;
/// Longest query, in bytes.
pub const MAX_LENGTH: usize = 8192;

/// A parsed query.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// One term.
    Match(Match),
    /// Every child matches.
    And(Vec<Node>),
    /// At least one child matches.
    Or(Vec<Node>),
    /// The child does not match.
    Not(Box<Node>),
}

/// Which part of an entry a term looks at.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    /// The message, every context value, the ids, service, tags and environment.
    Anywhere,
    Message,
    Service,
    Level,
    Tags,
    Id,
    TraceId,
    SpanId,
    RequestId,
    CorrelationId,
    UserId,
    Environment,
    ServiceVersion,
    /// A path below `context`, dotted (`order_id`, `kubernetes.namespace`).
    Context(String),
}

impl Field {
    /// The name a client writes before the colon.
    fn parse(name: &str) -> Option<Field> {
        Some(match name {
            "message" | "msg" => Field::Message,
            "service" => Field::Service,
            "level" => Field::Level,
            "tags" | "tag" => Field::Tags,
            "id" => Field::Id,
            "trace_id" => Field::TraceId,
            "span_id" => Field::SpanId,
            "request_id" => Field::RequestId,
            "correlation_id" => Field::CorrelationId,
            "user_id" => Field::UserId,
            "environment" => Field::Environment,
            "service_version" => Field::ServiceVersion,
            _ => {
                if let Some(path) = name.strip_prefix("context.") {
                    Field::Context(path.to_string())
                } else if name.starts_with("kubernetes.") {
                    Field::Context(name.to_string())
                } else {
                    return None;
                }
            }
        })
    }

    /// Whether values of this field are compared whole (exact keyword), not as words.
    pub fn is_keyword(&self) -> bool {
        matches!(
            self,
            Field::Service
                | Field::Level
                | Field::Tags
                | Field::Id
                | Field::TraceId
                | Field::SpanId
                | Field::RequestId
                | Field::CorrelationId
                | Field::UserId
                | Field::Environment
                | Field::ServiceVersion
        )
    }
}

/// How a term's text is compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// These words, next to each other and in this order (one word, or a phrase).
    Words(Vec<String>),
    /// A fragment anywhere in the text (`*declin*`), lower-cased.
    Contains(String),
    /// The start of a word (`declin*`), lower-cased.
    Prefix(String),
    /// The end of a word (`*lined`), lower-cased.
    Suffix(String),
}

/// One term: a field and what its text must look like.
#[derive(Clone, Debug, PartialEq)]
pub struct Match {
    pub field: Field,
    /// The value as the client wrote it, without quotes: what keyword fields compare.
    pub raw: String,
    pub pattern: Pattern,
}

/// Why a query cannot be read. Every message names what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SyntaxError(pub String);

fn error<T>(message: impl Into<String>) -> Result<T, SyntaxError> {
    Err(SyntaxError(message.into()))
}

/// The words of a text, as the store compares them.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Open,
    Close,
    And,
    Or,
    Not,
    /// `-` directly before a term or group.
    Minus,
    /// `+` directly before a term or group.
    Plus,
    /// A word or a `field:value`; `quoted` when it came from "…".
    Term {
        field: Option<String>,
        text: String,
        quoted: bool,
    },
}

/// Whether `name` reads like a field name (so `10:30` stays a term).
fn is_field_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

fn quoted_text(
    chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>,
) -> Result<String, SyntaxError> {
    let mut text = String::new();
    loop {
        match chars.next() {
            None => return error("a phrase is missing its closing quote"),
            Some((_, '"')) => return Ok(text),
            Some((_, '\\')) => match chars.next() {
                Some((_, c)) => text.push(c),
                None => return error("a phrase is missing its closing quote"),
            },
            Some((_, c)) => text.push(c),
        }
    }
}

fn lex(query: &str) -> Result<Vec<Token>, SyntaxError> {
    let mut tokens = Vec::new();
    let mut chars = query.char_indices().peekable();
    let boundary = |c: char| c.is_whitespace() || matches!(c, '(' | ')' | '"');
    while let Some(&(start, c)) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                tokens.push(Token::Open);
            }
            ')' => {
                chars.next();
                tokens.push(Token::Close);
            }
            '"' => {
                chars.next();
                let text = quoted_text(&mut chars)?;
                tokens.push(Token::Term {
                    field: None,
                    text,
                    quoted: true,
                });
            }
            '-' | '+' => {
                chars.next();
                match chars.peek() {
                    Some(&(_, next)) if !next.is_whitespace() && next != ')' => {
                        tokens.push(if c == '-' { Token::Minus } else { Token::Plus });
                    }
                    _ => return error(format!("{c:?} must be followed directly by a term")),
                }
            }
            _ => {
                let mut end = query.len();
                while let Some(&(i, c)) = chars.peek() {
                    if boundary(c) {
                        end = i;
                        break;
                    }
                    chars.next();
                }
                let word = &query[start..end];
                match word {
                    "AND" | "&&" => tokens.push(Token::And),
                    "OR" | "||" => tokens.push(Token::Or),
                    "NOT" => tokens.push(Token::Not),
                    _ => match word.split_once(':') {
                        Some((name, value)) if is_field_name(name) => {
                            let (text, quoted) = if !value.is_empty() {
                                (value.to_string(), false)
                            } else if chars.peek().is_some_and(|&(_, c)| c == '"') {
                                chars.next();
                                (quoted_text(&mut chars)?, true)
                            } else {
                                return error(format!(
                                    "{word:?}: a field needs its value right after the colon"
                                ));
                            };
                            tokens.push(Token::Term {
                                field: Some(name.to_string()),
                                text,
                                quoted,
                            });
                        }
                        _ => tokens.push(Token::Term {
                            field: None,
                            text: word.to_string(),
                            quoted: false,
                        }),
                    },
                }
            }
        }
    }
    Ok(tokens)
}

/// Parses `q`.
pub fn parse(query: &str) -> Result<Node, SyntaxError> {
    if query.len() > MAX_LENGTH {
        return error(format!(
            "the query is {} bytes long; at most {MAX_LENGTH} are read",
            query.len()
        ));
    }
    let tokens = lex(query)?;
    if tokens.is_empty() {
        return error("the query is empty");
    }
    let mut parser = Parser {
        tokens,
        at: 0,
        terms: 0,
    };
    let node = parser.or(0)?;
    match parser.peek() {
        None => Ok(node),
        Some(Token::Close) => error("a ')' has no '(' to close"),
        Some(other) => error(format!("unexpected {other:?}")),
    }
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    terms: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token
    }

    fn deeper(depth: usize) -> Result<usize, SyntaxError> {
        if depth >= MAX_DEPTH {
            return error(format!(
                "the query nests parentheses and negations more than {MAX_DEPTH} deep"
            ));
        }
        Ok(depth + 1)
    }

    /// `and (OR and)*`
    fn or(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        let mut alternatives = vec![self.and(depth)?];
        while self.peek() == Some(&Token::Or) {
            self.next();
            if matches!(self.peek(), None | Some(Token::Close | Token::Or)) {
                return error("OR needs a term on each side");
            }
            alternatives.push(self.and(depth)?);
        }
        Ok(if alternatives.len() == 1 {
            alternatives.remove(0)
        } else {
            Node::Or(alternatives)
        })
    }

    /// `unary ([AND] unary)*`: terms side by side must all match.
    fn and(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        let mut all = vec![self.unary(depth)?];
        loop {
            match self.peek() {
                None | Some(Token::Or | Token::Close) => break,
                Some(Token::And) => {
                    self.next();
                    if matches!(
                        self.peek(),
                        None | Some(Token::Close | Token::Or | Token::And)
                    ) {
                        return error("AND needs a term on each side");
                    }
                }
                _ => {}
            }
            all.push(self.unary(depth)?);
        }
        Ok(if all.len() == 1 {
            all.remove(0)
        } else {
            Node::And(all)
        })
    }

    fn unary(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        match self.peek() {
            Some(Token::Not | Token::Minus) => {
                let was = self.next();
                let depth = Parser::deeper(depth)?;
                if matches!(
                    self.peek(),
                    None | Some(Token::Close | Token::Or | Token::And)
                ) {
                    return error(if was == Some(Token::Not) {
                        "NOT needs a term after it"
                    } else {
                        "'-' needs a term after it"
                    });
                }
                Ok(Node::Not(Box::new(self.unary(depth)?)))
            }
            Some(Token::Plus) => {
                self.next();
                let depth = Parser::deeper(depth)?;
                self.unary(depth)
            }
            _ => self.primary(depth),
        }
    }

    fn primary(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        match self.next() {
            Some(Token::Open) => {
                let depth = Parser::deeper(depth)?;
                if self.peek() == Some(&Token::Close) {
                    return error("'()' holds nothing to search for");
                }
                let inner = self.or(depth)?;
                match self.next() {
                    Some(Token::Close) => Ok(inner),
                    _ => error("a '(' is missing its ')'"),
                }
            }
            Some(Token::Term {
                field,
                text,
                quoted,
            }) => {
                self.terms += 1;
                if self.terms > MAX_TERMS {
                    return error(format!("the query has more than {MAX_TERMS} terms"));
                }
                term(field.as_deref(), text, quoted).map(Node::Match)
            }
            Some(Token::Close) => error("a ')' has no '(' to close"),
            Some(Token::And | Token::Or) => error("AND and OR need a term on each side"),
            Some(other) => error(format!("unexpected {other:?}")),
            None => error("the query ends where a term was expected"),
        }
    }
}

fn term(field: Option<&str>, text: String, quoted: bool) -> Result<Match, SyntaxError> {
    let field = match field {
        None => Field::Anywhere,
        Some(name) => Field::parse(name).ok_or_else(|| {
            SyntaxError(format!(
                "{name:?} is not a field; use message, service, level, tags, id, trace_id, \
                 span_id, request_id, correlation_id, user_id, environment, service_version, \
                 context.<key> or kubernetes.<key> (or quote the text to search it literally)"
            ))
        })?,
    };
    if field == Field::Context(String::new())
        || matches!(&field, Field::Context(p) if p.ends_with('.') || p.contains(".."))
    {
        return error("context.<key> needs a key name");
    }
    if field == Field::Level && text.parse::<logging_common::LogLevel>().is_err() {
        return error(format!("level:{text} is not a level"));
    }
    let pattern = if quoted {
        Pattern::Words(words(&text).collect())
    } else {
        wildcard(&text)?
    };
    if let Pattern::Words(words) = &pattern
        && words.is_empty()
        && (!field.is_keyword() || text.is_empty())
    {
        return error(format!("{text:?} has no letter or digit to search for"));
    }
    Ok(Match {
        field,
        raw: text,
        pattern,
    })
}

/// A term's pattern: words, or a fragment with `*` at one or both ends.
fn wildcard(text: &str) -> Result<Pattern, SyntaxError> {
    let leading = text.starts_with('*');
    let trailing = text.len() > 1 && text.ends_with('*');
    let core = text.trim_matches('*');
    if core.contains('*') {
        return error(format!(
            "{text:?}: '*' may only start or end a term, as in *declin*"
        ));
    }
    if !leading && !trailing {
        return Ok(Pattern::Words(words(text).collect()));
    }
    if core.is_empty() {
        return error(format!(
            "{text:?} matches everything; leave the term out instead"
        ));
    }
    let fragment = core.to_lowercase();
    if !fragment.chars().any(char::is_alphanumeric) {
        return error(format!("{text:?} has no letter or digit to search for"));
    }
    Ok(match (leading, trailing) {
        (true, true) => Pattern::Contains(fragment),
        (false, true) => Pattern::Prefix(fragment),
        _ => Pattern::Suffix(fragment),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anywhere(words: &[&str]) -> Node {
        Node::Match(Match {
            field: Field::Anywhere,
            raw: words.join(" "),
            pattern: Pattern::Words(words.iter().map(|w| w.to_string()).collect()),
        })
    }

    #[test]
    fn terms_phrases_and_operators_make_the_expected_tree() {
        assert_eq!(parse("payment").unwrap(), anywhere(&["payment"]));
        assert_eq!(
            parse("payment declined").unwrap(),
            Node::And(vec![anywhere(&["payment"]), anywhere(&["declined"])])
        );
        let Node::Match(m) = parse("\"Card  Declined\"").unwrap() else {
            panic!()
        };
        assert_eq!(
            m.pattern,
            Pattern::Words(vec!["card".into(), "declined".into()])
        );
        assert_eq!(
            parse("a OR b c").unwrap(),
            Node::Or(vec![
                anywhere(&["a"]),
                Node::And(vec![anywhere(&["b"]), anywhere(&["c"])])
            ])
        );
        assert_eq!(
            parse("a AND NOT b").unwrap(),
            Node::And(vec![
                anywhere(&["a"]),
                Node::Not(Box::new(anywhere(&["b"])))
            ])
        );
        assert_eq!(parse("-b").unwrap(), Node::Not(Box::new(anywhere(&["b"]))));
        assert_eq!(parse("+b").unwrap(), anywhere(&["b"]));
        assert_eq!(
            parse("(a OR b) c").unwrap(),
            Node::And(vec![
                Node::Or(vec![anywhere(&["a"]), anywhere(&["b"])]),
                anywhere(&["c"])
            ])
        );
        // A term with punctuation is the phrase of its words.
        let Node::Match(m) = parse("/api/v1").unwrap() else {
            panic!()
        };
        assert_eq!(m.pattern, Pattern::Words(vec!["api".into(), "v1".into()]));
        // A time is a term, not a field.
        assert!(matches!(parse("10:30").unwrap(), Node::Match(m) if m.field == Field::Anywhere));
    }

    #[test]
    fn fields_scope_a_term() {
        for (q, field, raw) in [
            ("user_id:alice", Field::UserId, "alice"),
            (
                "context.order_id:4711",
                Field::Context("order_id".into()),
                "4711",
            ),
            (
                "kubernetes.namespace:shop",
                Field::Context("kubernetes.namespace".into()),
                "shop",
            ),
            ("service:api-gateway", Field::Service, "api-gateway"),
            ("trace_id:\"4bf9 2f35\"", Field::TraceId, "4bf9 2f35"),
            ("level:error", Field::Level, "error"),
        ] {
            let Node::Match(m) = parse(q).unwrap() else {
                panic!("{q}")
            };
            assert_eq!((m.field, m.raw.as_str()), (field, raw), "{q}");
        }
    }

    #[test]
    fn wildcards_at_the_ends_are_fragments() {
        let pattern = |q: &str| match parse(q).unwrap() {
            Node::Match(m) => m.pattern,
            other => panic!("{other:?}"),
        };
        assert_eq!(pattern("*Declin*"), Pattern::Contains("declin".into()));
        assert_eq!(pattern("declin*"), Pattern::Prefix("declin".into()));
        assert_eq!(pattern("*lined"), Pattern::Suffix("lined".into()));
    }

    #[test]
    fn bad_queries_say_what_is_wrong() {
        for (q, says) in [
            ("\"unclosed", "closing quote"),
            ("nosuchfield:x", "not a field"),
            ("(a b", "missing its ')'"),
            ("(a OR", "each side"),
            ("a)", "no '('"),
            ("--", "followed directly"),
            ("-", "followed directly"),
            ("id:*", "matches everything"),
            ("context:*", "not a field"),
            ("*", "matches everything"),
            ("a*b", "may only start or end"),
            ("a OR", "each side"),
            ("a AND", "each side"),
            ("NOT", "needs a term"),
            ("()", "nothing to search"),
            ("!!!", "no letter or digit"),
            ("level:loud", "not a level"),
            ("   ", "empty"),
            ("service:", "value right after"),
        ] {
            let e = parse(q).unwrap_err();
            assert!(e.0.contains(says), "{q:?}: {e}");
        }
    }

    #[test]
    fn deep_or_long_queries_are_refused_without_exhausting_the_stack() {
        let deep = format!("{}a{}", "(".repeat(800), ")".repeat(800));
        assert!(parse(&deep).unwrap_err().0.contains("deep"));
        let nots = format!("{}a", "NOT ".repeat(2000));
        assert!(parse(&nots).unwrap_err().0.contains("deep"));
        let minus = format!("{}a", "-".repeat(5000));
        assert!(parse(&minus).is_err());
        let many = "a ".repeat(MAX_TERMS + 1);
        assert!(parse(&many).unwrap_err().0.contains("terms"));
        assert!(
            parse(&"a".repeat(MAX_LENGTH + 1))
                .unwrap_err()
                .0
                .contains("bytes")
        );
        let ok = format!(
            "{}a{}",
            "(".repeat(MAX_DEPTH - 1),
            ")".repeat(MAX_DEPTH - 1)
        );
        assert!(parse(&ok).is_ok());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn depth(node: &Node) -> usize {
            match node {
                Node::Match(_) => 1,
                Node::Not(inner) => 1 + depth(inner),
                Node::And(all) | Node::Or(all) => 1 + all.iter().map(depth).max().unwrap_or(0),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn any_text_parses_or_is_refused_and_trees_stay_shallow(q in ".{0,300}") {
                if let Ok(node) = parse(&q) {
                    prop_assert!(depth(&node) <= 3 * MAX_DEPTH + 2);
                }
            }

            #[test]
            fn operator_soup_never_panics(
                parts in proptest::collection::vec(
                    prop_oneof![
                        Just("("), Just(")"), Just("NOT "), Just("-"), Just("+"), Just(" OR "),
                        Just(" AND "), Just("a"), Just("\""), Just("*"), Just("x:"),
                        Just("service:"), Just("context."), Just(" "),
                    ],
                    0..400,
                )
            ) {
                let _ = parse(&parts.concat());
            }

            #[test]
            fn plain_words_always_parse_as_their_conjunction(
                ws in proptest::collection::vec("[a-z][a-z0-9]{0,8}", 1..20)
            ) {
                let reserved = ["and", "or", "not"];
                prop_assume!(ws.iter().all(|w| !reserved.contains(&w.as_str())));
                let node = parse(&ws.join(" ")).unwrap();
                let count = match &node {
                    Node::And(all) => all.len(),
                    Node::Match(_) => 1,
                    _ => 0,
                };
                prop_assert_eq!(count, ws.len());
            }
        }
    }
}
