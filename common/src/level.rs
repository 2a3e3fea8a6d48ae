//! Log severity: one canonical set, parsed from the spellings real software writes.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The severity of a log entry, ordered from least to most severe.
///
/// The set is syslog's eight severities plus `trace`. Every spelling in common use maps onto
/// it (`warn` → `Warning`, `fatal` → `Critical`, `panic` → `Emergency`, syslog numbers 0–7),
/// and the canonical lowercase name is what is stored and returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Notice = 3,
    Warning = 4,
    Error = 5,
    Critical = 6,
    Alert = 7,
    Emergency = 8,
}

/// The spellings accepted, for error messages.
pub const ACCEPTED_LEVELS: &str = "trace, debug, info, notice, warn, warning, error, err, \
     fatal, critical, crit, panic, emerg, emergency, alert, or a syslog severity 0-7";

impl LogLevel {
    pub const ALL: [LogLevel; 9] = [
        LogLevel::Trace,
        LogLevel::Debug,
        LogLevel::Info,
        LogLevel::Notice,
        LogLevel::Warning,
        LogLevel::Error,
        LogLevel::Critical,
        LogLevel::Alert,
        LogLevel::Emergency,
    ];

    /// The canonical name, as stored and returned by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Notice => "notice",
            LogLevel::Warning => "warning",
            LogLevel::Error => "error",
            LogLevel::Critical => "critical",
            LogLevel::Alert => "alert",
            LogLevel::Emergency => "emergency",
        }
    }

    /// Rank in severity order (0 = trace … 8 = emergency); what the index stores.
    pub fn rank(self) -> u8 {
        self as u8
    }

    pub fn from_rank(rank: u64) -> Option<LogLevel> {
        LogLevel::ALL.get(usize::try_from(rank).ok()?).copied()
    }

    /// True for `error` and everything more severe: what an error rate counts.
    pub fn is_error(self) -> bool {
        self >= LogLevel::Error
    }

    /// Maps a syslog severity (RFC 5424 §6.2.1: 0 = emergency … 7 = debug).
    pub fn from_syslog_severity(severity: u64) -> Option<LogLevel> {
        Some(match severity {
            0 => LogLevel::Emergency,
            1 => LogLevel::Alert,
            2 => LogLevel::Critical,
            3 => LogLevel::Error,
            4 => LogLevel::Warning,
            5 => LogLevel::Notice,
            6 => LogLevel::Info,
            7 => LogLevel::Debug,
            _ => return None,
        })
    }

    /// Parses any accepted spelling, case-insensitively, without allocating.
    pub fn parse(text: &str) -> Option<LogLevel> {
        let text = text.trim();
        if text.len() == 1 && text.as_bytes()[0].is_ascii_digit() {
            return LogLevel::from_syslog_severity(u64::from(text.as_bytes()[0] - b'0'));
        }
        if text.len() > 13 {
            return None;
        }
        let mut buf = [0u8; 13];
        let lower = &mut buf[..text.len()];
        lower.copy_from_slice(text.as_bytes());
        lower.make_ascii_lowercase();
        Some(match &*lower {
            b"trace" | b"trc" => LogLevel::Trace,
            b"debug" | b"dbg" => LogLevel::Debug,
            b"info" | b"inf" | b"information" | b"informational" => LogLevel::Info,
            b"notice" => LogLevel::Notice,
            b"warn" | b"warning" | b"wrn" => LogLevel::Warning,
            b"error" | b"err" | b"eror" => LogLevel::Error,
            b"fatal" | b"critical" | b"crit" | b"crt" => LogLevel::Critical,
            b"alert" => LogLevel::Alert,
            b"panic" | b"emerg" | b"emergency" => LogLevel::Emergency,
            _ => return None,
        })
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a level that is not one of the accepted spellings.
#[derive(Debug, thiserror::Error)]
#[error("unknown level {0:?}; expected one of {ACCEPTED_LEVELS}")]
pub struct UnknownLevel(pub String);

impl FromStr for LogLevel {
    type Err = UnknownLevel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LogLevel::parse(s).ok_or_else(|| UnknownLevel(s.to_string()))
    }
}

impl Serialize for LogLevel {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LevelVisitor;
        impl Visitor<'_> for LevelVisitor {
            type Value = LogLevel;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a level name or syslog severity ({ACCEPTED_LEVELS})")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<LogLevel, E> {
                LogLevel::parse(v).ok_or_else(|| E::custom(UnknownLevel(v.to_string())))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LogLevel, E> {
                LogLevel::from_syslog_severity(v).ok_or_else(|| {
                    E::custom(format!("syslog severity {v} is out of range; expected 0-7"))
                })
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LogLevel, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "syslog severity {v} is out of range; expected 0-7"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(LevelVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_common_spelling_maps_to_its_canonical_level() {
        let cases = [
            ("trace", LogLevel::Trace),
            ("TRACE", LogLevel::Trace),
            ("debug", LogLevel::Debug),
            ("Info", LogLevel::Info),
            ("INFO", LogLevel::Info),
            ("notice", LogLevel::Notice),
            ("warn", LogLevel::Warning),
            ("WARNING", LogLevel::Warning),
            ("error", LogLevel::Error),
            ("ERR", LogLevel::Error),
            ("fatal", LogLevel::Critical),
            ("FATAL", LogLevel::Critical),
            ("critical", LogLevel::Critical),
            ("crit", LogLevel::Critical),
            ("panic", LogLevel::Emergency),
            ("emerg", LogLevel::Emergency),
            ("alert", LogLevel::Alert),
            (" info ", LogLevel::Info),
        ];
        for (text, want) in cases {
            assert_eq!(LogLevel::parse(text), Some(want), "{text}");
        }
    }

    #[test]
    fn syslog_numeric_severities_map_by_rfc_5424() {
        let want = [
            LogLevel::Emergency,
            LogLevel::Alert,
            LogLevel::Critical,
            LogLevel::Error,
            LogLevel::Warning,
            LogLevel::Notice,
            LogLevel::Info,
            LogLevel::Debug,
        ];
        for (n, level) in want.iter().enumerate() {
            assert_eq!(LogLevel::parse(&n.to_string()), Some(*level));
            let json: LogLevel = serde_json::from_str(&n.to_string()).unwrap();
            assert_eq!(json, *level);
        }
        assert!(LogLevel::parse("8").is_none());
        assert!(serde_json::from_str::<LogLevel>("8").is_err());
        assert!(serde_json::from_str::<LogLevel>("-1").is_err());
    }

    #[test]
    fn unknown_spellings_are_refused_with_the_accepted_list() {
        assert!(LogLevel::parse("verbose").is_none());
        assert!(LogLevel::parse("").is_none());
        assert!(LogLevel::parse("informational-extra").is_none());
        let err = serde_json::from_str::<LogLevel>("\"loud\"").unwrap_err();
        assert!(err.to_string().contains("unknown level \"loud\""), "{err}");
    }

    #[test]
    fn levels_order_by_severity_and_round_trip_through_rank() {
        assert!(LogLevel::Error > LogLevel::Warning);
        assert!(LogLevel::Critical.is_error());
        assert!(!LogLevel::Warning.is_error());
        for level in LogLevel::ALL {
            assert_eq!(LogLevel::from_rank(u64::from(level.rank())), Some(level));
            assert_eq!(LogLevel::parse(level.as_str()), Some(level));
        }
        assert_eq!(
            serde_json::to_string(&LogLevel::Warning).unwrap(),
            "\"warning\""
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_text_is_a_level_or_refused(text in ".{0,32}") {
                if let Some(level) = LogLevel::parse(&text) {
                    prop_assert_eq!(LogLevel::parse(level.as_str()), Some(level));
                }
            }

            #[test]
            fn every_level_round_trips_through_its_name_and_any_case(i in 0usize..9, upper in any::<bool>()) {
                let level = LogLevel::ALL[i];
                let name = if upper { level.as_str().to_uppercase() } else { level.as_str().to_string() };
                prop_assert_eq!(LogLevel::parse(&name), Some(level));
            }
        }
    }
}
