//! Timestamps: nanoseconds since the Unix epoch, parsed from RFC 3339 or epoch numbers.
//!
//! Parsing and formatting are written out by hand because they sit on the hot path of both
//! binaries (every CRI line carries one) and because real logs bend RFC 3339: a space instead
//! of `T`, a lowercase `z`, no offset at all (taken as UTC), `+0100` without a colon.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time with nanosecond precision, UTC.
///
/// Representable range: 1677-09-21 to 2262-04-11 (an `i64` of nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

const NANOS_PER_SEC: i64 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;

/// Why a timestamp could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    #[error("{0:?} is not an RFC 3339 timestamp (e.g. 2026-11-27T06:10:17.123Z)")]
    NotRfc3339(String),
    #[error("{0} is outside the representable range (years 1677 to 2262)")]
    OutOfRange(String),
}

impl Timestamp {
    pub const fn from_nanos(nanos: i64) -> Timestamp {
        Timestamp(nanos)
    }

    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    pub fn as_millis(self) -> i64 {
        self.0.div_euclid(1_000_000)
    }

    pub fn now() -> Timestamp {
        let nanos = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
        };
        Timestamp(nanos)
    }

    /// Days since 1970-01-01 (negative before): the partition key of the embedded store.
    pub fn day(self) -> i64 {
        self.0.div_euclid(NANOS_PER_SEC * SECS_PER_DAY)
    }

    pub fn saturating_add_nanos(self, nanos: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(nanos))
    }

    /// Interprets an epoch number by its magnitude, as log shippers do: seconds below 1e11
    /// (until year 5138), milliseconds below 1e14, microseconds below 1e17, else nanoseconds.
    pub fn from_epoch_number(value: f64) -> Result<Timestamp, TimestampError> {
        if !value.is_finite() {
            return Err(TimestampError::OutOfRange(value.to_string()));
        }
        let magnitude = value.abs();
        let scale = if magnitude < 1e11 {
            1e9
        } else if magnitude < 1e14 {
            1e6
        } else if magnitude < 1e17 {
            1e3
        } else {
            1.0
        };
        let nanos = value * scale;
        if nanos >= i64::MAX as f64 || nanos <= i64::MIN as f64 {
            return Err(TimestampError::OutOfRange(value.to_string()));
        }
        Ok(Timestamp(nanos.round() as i64))
    }

    /// The same by magnitude for an integer, exactly (no float rounding of nanoseconds).
    pub fn from_epoch_integer(value: i64) -> Result<Timestamp, TimestampError> {
        let magnitude = value.unsigned_abs();
        let scale: i64 = if magnitude < 100_000_000_000 {
            NANOS_PER_SEC
        } else if magnitude < 100_000_000_000_000 {
            1_000_000
        } else if magnitude < 100_000_000_000_000_000 {
            1_000
        } else {
            1
        };
        value
            .checked_mul(scale)
            .map(Timestamp)
            .ok_or_else(|| TimestampError::OutOfRange(value.to_string()))
    }

    /// Parses RFC 3339 and the common variants described in the module documentation.
    pub fn parse_rfc3339(text: &str) -> Result<Timestamp, TimestampError> {
        parse_rfc3339(text.trim().as_bytes())
            .ok_or_else(|| TimestampError::NotRfc3339(text.to_string()))?
            .map_err(|()| TimestampError::OutOfRange(text.to_string()))
    }

    /// Parses either form: RFC 3339 text or an epoch number written as text.
    pub fn parse(text: &str) -> Result<Timestamp, TimestampError> {
        let trimmed = text.trim();
        // The number parsers run only on text that looks like a number: RFC 3339 text, the
        // common case, goes straight to its own parser.
        let integer_like =
            !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit() || b == b'-');
        if integer_like && let Ok(n) = trimmed.parse::<i64>() {
            return Timestamp::from_epoch_integer(n);
        }
        let number_like = trimmed
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-');
        if number_like && let Ok(f) = trimmed.parse::<f64>() {
            return Timestamp::from_epoch_number(f);
        }
        Timestamp::parse_rfc3339(trimmed)
    }

    /// Writes RFC 3339 in UTC with the fraction trimmed to 0, 3, 6 or 9 digits.
    pub fn write_rfc3339(self, out: &mut String) {
        let secs = self.0.div_euclid(NANOS_PER_SEC);
        let nanos = self.0.rem_euclid(NANOS_PER_SEC) as u32;
        let days = secs.div_euclid(SECS_PER_DAY);
        let sod = secs.rem_euclid(SECS_PER_DAY) as u32;
        let (year, month, day) = civil_from_days(days);
        let mut buf = [0u8; 30];
        write_digits(&mut buf[0..4], year as u32);
        buf[4] = b'-';
        write_digits(&mut buf[5..7], month);
        buf[7] = b'-';
        write_digits(&mut buf[8..10], day);
        buf[10] = b'T';
        write_digits(&mut buf[11..13], sod / 3600);
        buf[13] = b':';
        write_digits(&mut buf[14..16], sod / 60 % 60);
        buf[16] = b':';
        write_digits(&mut buf[17..19], sod % 60);
        let mut len = 19;
        if nanos != 0 {
            buf[19] = b'.';
            let (digits, value) = if nanos.is_multiple_of(1_000_000) {
                (3, nanos / 1_000_000)
            } else if nanos.is_multiple_of(1_000) {
                (6, nanos / 1_000)
            } else {
                (9, nanos)
            };
            write_digits(&mut buf[20..20 + digits], value);
            len = 20 + digits;
        }
        buf[len] = b'Z';
        // Every byte written above is ASCII.
        out.push_str(std::str::from_utf8(&buf[..=len]).unwrap_or_default());
    }

    pub fn to_rfc3339(self) -> String {
        let mut out = String::with_capacity(30);
        self.write_rfc3339(&mut out);
        out
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

fn write_digits(out: &mut [u8], mut value: u32) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Howard Hinnant's `days_from_civil`.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn digits(bytes: &[u8]) -> Option<u32> {
    let mut value = 0u32;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u32::from(b - b'0');
    }
    Some(value)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// `None`: not the format; `Some(Err)`: the format, but out of range.
fn parse_rfc3339(s: &[u8]) -> Option<Result<Timestamp, ()>> {
    if s.len() < 19 || s[4] != b'-' || s[7] != b'-' || s[13] != b':' || s[16] != b':' {
        return None;
    }
    if !matches!(s[10], b'T' | b't' | b' ') {
        return None;
    }
    let year = i64::from(digits(&s[0..4])?);
    let month = digits(&s[5..7])?;
    let day = digits(&s[8..10])?;
    let hour = digits(&s[11..13])?;
    let minute = digits(&s[14..16])?;
    let second = digits(&s[17..19])?;
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos: i64 = 0;
    if let Some((&b'.' | &b',', tail)) = rest.split_first() {
        let n = tail.iter().take_while(|b| b.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        for (i, &b) in tail[..n].iter().enumerate() {
            if i < 9 {
                nanos = nanos * 10 + i64::from(b - b'0');
            }
        }
        for _ in n..9 {
            nanos *= 10;
        }
        rest = &tail[n..];
    }
    let offset_secs: i64 = match rest {
        [] | [b'Z'] | [b'z'] => 0,
        [sign @ (b'+' | b'-'), tail @ ..] => {
            let (h, m) = match tail {
                [h1, h2, b':', m1, m2] | [h1, h2, m1, m2] => {
                    (digits(&[*h1, *h2])?, digits(&[*m1, *m2])?)
                }
                [h1, h2] => (digits(&[*h1, *h2])?, 0),
                _ => return None,
            };
            if h > 23 || m > 59 {
                return None;
            }
            let secs = i64::from(h * 3600 + m * 60);
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    // A leap second (:60) is folded onto the next second, as most systems do.
    let secs = days_from_civil(year, month, day) * SECS_PER_DAY
        + i64::from(hour * 3600 + minute * 60 + second)
        - offset_secs;
    Some(
        secs.checked_mul(NANOS_PER_SEC)
            .and_then(|n| n.checked_add(nanos))
            .map(Timestamp)
            .ok_or(()),
    )
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TimestampVisitor;
        impl Visitor<'_> for TimestampVisitor {
            type Value = Timestamp;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp or epoch seconds, milliseconds or nanoseconds")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Timestamp, E> {
                Timestamp::parse(v).map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Timestamp, E> {
                Timestamp::from_epoch_integer(v).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Timestamp, E> {
                let v = i64::try_from(v)
                    .map_err(|_| E::custom(TimestampError::OutOfRange(v.to_string())))?;
                Timestamp::from_epoch_integer(v).map_err(E::custom)
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Timestamp, E> {
                Timestamp::from_epoch_number(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(TimestampVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_795_760_217; // 2026-11-27T06:16:57Z

    #[test]
    fn rfc3339_and_its_common_variants_parse_to_the_same_instant() {
        let want = Timestamp(T * NANOS_PER_SEC + 123_000_000);
        for text in [
            "2026-11-27T06:16:57.123Z",
            "2026-11-27t06:16:57.123z",
            "2026-11-27 06:16:57.123",
            "2026-11-27T06:16:57.123+00:00",
            "2026-11-27T07:16:57.123+01:00",
            "2026-11-27T07:16:57.123+0100",
            "2026-11-27T01:16:57.123-05",
            "2026-11-27T06:16:57,123Z",
            "2026-11-27T06:16:57.123000000Z",
        ] {
            assert_eq!(Timestamp::parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn kubelet_cri_nanosecond_timestamps_keep_every_digit() {
        let ts = Timestamp::parse("2026-11-27T06:16:57.123456789Z").unwrap();
        assert_eq!(ts.as_nanos(), T * NANOS_PER_SEC + 123_456_789);
        assert_eq!(ts.to_rfc3339(), "2026-11-27T06:16:57.123456789Z");
        // More than nine digits are truncated, not refused.
        let ts = Timestamp::parse("2026-11-27T06:16:57.1234567891Z").unwrap();
        assert_eq!(ts.as_nanos(), T * NANOS_PER_SEC + 123_456_789);
    }

    #[test]
    fn epoch_numbers_are_read_by_magnitude() {
        let secs = Timestamp(T * NANOS_PER_SEC);
        assert_eq!(Timestamp::from_epoch_integer(T), Ok(secs));
        assert_eq!(Timestamp::from_epoch_integer(T * 1000), Ok(secs));
        assert_eq!(Timestamp::from_epoch_integer(T * 1_000_000), Ok(secs));
        assert_eq!(Timestamp::from_epoch_integer(T * NANOS_PER_SEC), Ok(secs));
        assert_eq!(Timestamp::parse(&T.to_string()), Ok(secs));
        let frac: Timestamp = serde_json::from_str(&format!("{T}.5")).unwrap();
        assert_eq!(frac.as_nanos(), T * NANOS_PER_SEC + 500_000_000);
        let ms: Timestamp = serde_json::from_str(&format!("{}", T * 1000 + 7)).unwrap();
        assert_eq!(ms.as_nanos(), T * NANOS_PER_SEC + 7_000_000);
    }

    #[test]
    fn impossible_dates_and_garbage_are_refused() {
        for text in [
            "2026-02-30T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "2026-11-27",
            "yesterday",
            "2026-11-27T06:16:57.Z",
            "2026-11-27T06:16:57Zjunk",
            "",
        ] {
            assert!(Timestamp::parse(text).is_err(), "{text}");
        }
        assert!(matches!(
            Timestamp::parse("9999-01-01T00:00:00Z"),
            Err(TimestampError::OutOfRange(_))
        ));
        assert!(Timestamp::from_epoch_number(f64::NAN).is_err());
    }

    #[test]
    fn formatting_trims_the_fraction_and_round_trips_across_eras() {
        for (nanos, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (-1, "1969-12-31T23:59:59.999999999Z"),
            (951_782_400 * NANOS_PER_SEC, "2000-02-29T00:00:00Z"),
            (T * NANOS_PER_SEC + 5_000, "2026-11-27T06:16:57.000005Z"),
        ] {
            assert_eq!(Timestamp(nanos).to_rfc3339(), text);
            assert_eq!(Timestamp::parse(text), Ok(Timestamp(nanos)));
        }
        for days in (-100_000..100_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(5000))]

            #[test]
            fn any_text_parses_or_is_refused(text in ".{0,64}") {
                let _ = Timestamp::parse(&text);
                let _ = Timestamp::parse_rfc3339(&text);
            }

            #[test]
            fn epoch_numbers_of_any_size_never_overflow(n in any::<i64>(), f in any::<f64>()) {
                let _ = Timestamp::from_epoch_integer(n);
                let _ = Timestamp::from_epoch_number(f);
                let _ = Timestamp::parse(&n.to_string());
                let _ = Timestamp::parse(&f.to_string());
            }

            /// Every instant from 1900 to 2200 survives RFC 3339 and back, to the nanosecond.
            #[test]
            fn rfc3339_round_trips(nanos in -2_208_988_800_000_000_000i64..7_258_118_400_000_000_000) {
                let ts = Timestamp::from_nanos(nanos);
                let text = ts.to_rfc3339();
                prop_assert_eq!(Timestamp::parse_rfc3339(&text).unwrap(), ts, "{}", text);
                prop_assert_eq!(Timestamp::parse(&text).unwrap(), ts);
            }
        }
    }
}
