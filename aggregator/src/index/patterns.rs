//! Message patterns: what is left of a message when its variable parts are masked, so that
//! "user 17 logged in from 10.0.0.3" and "user 42 logged in from 10.0.0.9" count as one.
//!
//! A run of word characters (`[A-Za-z0-9_.:-]`) that contains a digit is variable (numbers,
//! ids, UUIDs, IPs, durations, timestamps) and becomes `<*>`; everything else is kept. This is
//! the masking step of Drain-style log template mining, cheap enough to run on every entry.

use xxhash_rust::xxh3::xxh3_64;

/// Longest template considered, in bytes; the rest of a long message does not change its
/// pattern.
const MAX_TEMPLATE_BYTES: usize = 240;

/// The message's template.
pub fn template(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_TEMPLATE_BYTES));
    let bytes = message.as_bytes();
    let mut i = 0;
    while i < bytes.len() && out.len() < MAX_TEMPLATE_BYTES {
        let b = bytes[i];
        if is_word(b) {
            let start = i;
            let mut has_digit = false;
            while i < bytes.len() && is_word(bytes[i]) {
                has_digit |= bytes[i].is_ascii_digit();
                i += 1;
            }
            if has_digit {
                out.push_str("<*>");
            } else {
                out.push_str(&message[start..i]);
            }
        } else {
            // Copy one whole character (multi-byte UTF-8 stays intact).
            let len = utf8_len(b);
            let end = (i + len).min(bytes.len());
            out.push_str(message.get(i..end).unwrap_or(""));
            i = end;
        }
    }
    out
}

/// A 32-bit hash of the template: the value of the `pattern` column.
pub fn pattern_hash(message: &str) -> u64 {
    xxh3_64(template(message).as_bytes()) >> 32
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_parts_are_masked_and_the_words_kept() {
        for (message, want) in [
            (
                "user 17 logged in from 10.0.0.3",
                "user <*> logged in from <*>",
            ),
            (
                "GET /api/users/123 returned 200 in 12ms",
                "GET /api/users/<*> returned <*> in <*>",
            ),
            (
                "order 0193b2e4-7c1a-7000-8000-0000000000ab failed: timeout",
                "order <*> failed: timeout",
            ),
            ("connection reset by peer", "connection reset by peer"),
            ("größe=12 überschritten", "größe=<*> überschritten"),
        ] {
            assert_eq!(template(message), want, "{message}");
        }
    }

    #[test]
    fn messages_of_one_pattern_share_a_hash() {
        assert_eq!(
            pattern_hash("user 17 logged in from 10.0.0.3"),
            pattern_hash("user 42 logged in from 192.168.1.1")
        );
        assert_ne!(
            pattern_hash("user 17 logged in"),
            pattern_hash("user 17 logged out")
        );
        assert!(pattern_hash("x") < 1 << 32);
    }
}
