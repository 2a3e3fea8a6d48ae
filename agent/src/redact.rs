//! Redaction before anything leaves the node: secrets in `key=value` and JSON, bearer tokens,
//! AWS access keys, card numbers that pass the Luhn check, and configured patterns. The
//! redacted entry lists which rules fired (`context.redacted`).
//!
//! Each rule first checks for a cheap marker (`=`, `:`, `Bearer`, `AKIA`, a run of digits),
//! so a line with nothing to redact costs a few byte scans, not a regex search.

use std::borrow::Cow;

use regex::{Captures, Regex};

pub const REDACTED: &str = "[REDACTED]";

/// The compiled rules.
pub struct Redactor {
    secret_pairs: Regex,
    bearer: Regex,
    aws_key: Regex,
    card: Regex,
    custom: Vec<Regex>,
}

impl Redactor {
    pub fn new(custom: &[String]) -> Result<Redactor, regex::Error> {
        Ok(Redactor {
            // key=value, key: value, "key": "value" for secret-looking keys.
            secret_pairs: Regex::new(
                r#"(?i)("?(?:password|passwd|pwd|secret|client_secret|token|access_token|refresh_token|api_key|apikey|api-key|private_key|secret_key|credentials?)"?\s*[=:]\s*)("(?:[^"\\]|\\.)*"|[^\s,;&}]+)"#,
            )?,
            bearer: Regex::new(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9\-._~+/]+=*")?,
            aws_key: Regex::new(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")?,
            card: Regex::new(r"\b\d(?:[ -]?\d){12,18}\b")?,
            custom: custom
                .iter()
                .map(|p| Regex::new(p))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Redacts `text`, recording the names of the rules that fired in `fired`.
    pub fn redact<'t>(&self, text: &'t str, fired: &mut Vec<&'static str>) -> Cow<'t, str> {
        let mut out = Cow::Borrowed(text);
        if text.contains(['=', ':']) && self.secret_pairs.is_match(&out) {
            out = Cow::Owned(
                self.secret_pairs
                    .replace_all(&out, |c: &Captures<'_>| {
                        let quoted = c[2].starts_with('"');
                        if quoted {
                            format!("{}\"{REDACTED}\"", &c[1])
                        } else {
                            format!("{}{REDACTED}", &c[1])
                        }
                    })
                    .into_owned(),
            );
            fired.push("secret");
        }
        if (contains_ignore_case(&out, "bearer") || contains_ignore_case(&out, "basic "))
            && self.bearer.is_match(&out)
        {
            out = Cow::Owned(
                self.bearer
                    .replace_all(&out, |c: &Captures<'_>| format!("{} {REDACTED}", &c[1]))
                    .into_owned(),
            );
            fired.push("bearer_token");
        }
        if (out.contains("AKIA") || out.contains("ASIA")) && self.aws_key.is_match(&out) {
            out = Cow::Owned(self.aws_key.replace_all(&out, REDACTED).into_owned());
            fired.push("aws_access_key");
        }
        if has_digit_run(&out, 13) {
            let mut hit = false;
            let replaced = self.card.replace_all(&out, |c: &Captures<'_>| {
                if luhn(&c[0]) {
                    hit = true;
                    REDACTED.to_string()
                } else {
                    c[0].to_string()
                }
            });
            if hit {
                out = Cow::Owned(replaced.into_owned());
                fired.push("card_number");
            }
        }
        for pattern in &self.custom {
            if pattern.is_match(&out) {
                out = Cow::Owned(pattern.replace_all(&out, REDACTED).into_owned());
                fired.push("custom");
            }
        }
        out
    }
}

fn contains_ignore_case(text: &str, needle: &str) -> bool {
    text.as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Whether `text` has `n` digits close enough together to be a card number.
fn has_digit_run(text: &str, n: usize) -> bool {
    let mut run = 0;
    for b in text.bytes() {
        if b.is_ascii_digit() {
            run += 1;
            if run >= n {
                return true;
            }
        } else if b != b' ' && b != b'-' {
            run = 0;
        }
    }
    false
}

/// The Luhn checksum that card numbers carry.
fn luhn(candidate: &str) -> bool {
    let digits: Vec<u32> = candidate.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let double = d * 2;
                if double > 9 { double - 9 } else { double }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redact(text: &str) -> (String, Vec<&'static str>) {
        let r = Redactor::new(&["ssn=\\d{3}-\\d{2}-\\d{4}".into()]).unwrap();
        let mut fired = Vec::new();
        let out = r.redact(text, &mut fired).into_owned();
        (out, fired)
    }

    #[test]
    fn secrets_in_pairs_and_json_are_redacted() {
        assert_eq!(
            redact("login user=bob password=hunter2 ok").0,
            "login user=bob password=[REDACTED] ok"
        );
        assert_eq!(
            redact(r#"{"user":"bob","api_key":"sk-123","x":1}"#).0,
            r#"{"user":"bob","api_key":"[REDACTED]","x":1}"#
        );
        assert_eq!(redact("token: abc.def").0, "token: [REDACTED]");
        let (out, fired) = redact("Authorization: Bearer eyJhbGciOi.J9.xyz");
        assert_eq!(out, "Authorization: Bearer [REDACTED]");
        assert_eq!(fired, vec!["bearer_token"]);
    }

    #[test]
    fn keys_and_card_numbers_are_redacted_only_when_they_are_real() {
        let (out, fired) = redact("using AKIAIOSFODNN7EXAMPLE for s3");
        assert_eq!(out, "using [REDACTED] for s3");
        assert_eq!(fired, vec!["aws_access_key"]);
        // 4111 1111 1111 1111 passes Luhn; an order number of 16 digits usually does not.
        let (out, fired) = redact("card 4111 1111 1111 1111 charged, order 1234567890123456");
        assert_eq!(out, "card [REDACTED] charged, order 1234567890123456");
        assert_eq!(fired, vec!["card_number"]);
        assert_eq!(redact("ssn=123-45-6789").1, vec!["custom"]);
        let (out, fired) = redact("GET /health 200 in 3 ms");
        assert_eq!(out, "GET /health 200 in 3 ms");
        assert!(fired.is_empty());
    }
}
