//! Syslog messages, RFC 5424 and RFC 3164 (BSD), as rsyslog, journald forwarding and network
//! devices send them.
//!
//! ```text
//! <34>1 2026-11-27T06:00:00.003Z host app 1234 ID47 [meta x="1"] message   (RFC 5424)
//! <34>Nov 27 06:00:00 host app[1234]: message                               (RFC 3164)
//! ```

use logging_common::{LogLevel, Timestamp};
use serde_json::{Map, Value};

const FACILITIES: [&str; 24] = [
    "kern",
    "user",
    "mail",
    "daemon",
    "auth",
    "syslog",
    "lpr",
    "news",
    "uucp",
    "cron",
    "authpriv",
    "ftp",
    "ntp",
    "security",
    "console",
    "solaris-cron",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
];

/// A syslog message as an entry-shaped JSON object (`ts`, `level`, `service`, `msg` and the
/// rest), ready for the spool.
pub fn to_entry(text: &str, transport: &str) -> Map<String, Value> {
    let text = text.trim_end_matches(['\r', '\n', '\0']);
    let mut entry = Map::new();
    entry.insert("source".into(), transport.into());
    let Some((pri, rest)) = split_pri(text) else {
        // Not syslog at all: keep it as a plain message.
        entry.insert("msg".into(), text.into());
        return entry;
    };
    let severity = pri & 7;
    let facility = usize::from(pri >> 3);
    if let Some(level) = LogLevel::from_syslog_severity(u64::from(severity)) {
        entry.insert("level".into(), level.as_str().into());
    }
    entry.insert(
        "facility".into(),
        FACILITIES
            .get(facility)
            .copied()
            .unwrap_or("unknown")
            .into(),
    );
    if let Some(rest) = rest.strip_prefix("1 ") {
        rfc5424(rest, &mut entry);
    } else {
        rfc3164(rest, &mut entry);
    }
    entry
}

fn split_pri(text: &str) -> Option<(u8, &str)> {
    let rest = text.strip_prefix('<')?;
    let end = rest.find('>')?;
    if end == 0 || end > 3 {
        return None;
    }
    let pri: u8 = rest[..end].parse().ok()?;
    (pri <= 191).then_some((pri, &rest[end + 1..]))
}

fn nil(field: &str) -> Option<&str> {
    (field != "-" && !field.is_empty()).then_some(field)
}

fn rfc5424(rest: &str, entry: &mut Map<String, Value>) {
    let mut fields = rest.splitn(6, ' ');
    let timestamp = fields.next().unwrap_or("-");
    let host = fields.next().unwrap_or("-");
    let app = fields.next().unwrap_or("-");
    let procid = fields.next().unwrap_or("-");
    let msgid = fields.next().unwrap_or("-");
    let rest = fields.next().unwrap_or("");
    if let Some(ts) = nil(timestamp).and_then(|t| Timestamp::parse_rfc3339(t).ok()) {
        entry.insert("ts".into(), ts.to_rfc3339().into());
    }
    if let Some(host) = nil(host) {
        entry.insert("hostname".into(), host.into());
    }
    if let Some(app) = nil(app) {
        entry.insert("service".into(), app.into());
    }
    if let Some(procid) = nil(procid) {
        entry.insert("procid".into(), procid.into());
    }
    if let Some(msgid) = nil(msgid) {
        entry.insert("msgid".into(), msgid.into());
    }
    // Structured data: "-" or one or more [id k="v" …] elements, kept as their text.
    let (data, message) = if let Some(after) = rest.strip_prefix("- ") {
        ("", after)
    } else if rest == "-" {
        ("", "")
    } else if rest.starts_with('[') {
        let mut depth_end = 0;
        let bytes = rest.as_bytes();
        let mut i = 0;
        let mut in_quotes = false;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if in_quotes => i += 1,
                b'"' => in_quotes = !in_quotes,
                b']' if !in_quotes => {
                    depth_end = i + 1;
                    if bytes.get(i + 1) != Some(&b'[') {
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        (&rest[..depth_end], rest[depth_end..].trim_start())
    } else {
        ("", rest)
    };
    if !data.is_empty() {
        entry.insert("structured_data".into(), data.into());
    }
    // A UTF-8 byte order mark may precede the message.
    entry.insert("msg".into(), message.trim_start_matches('\u{feff}').into());
}

fn rfc3164(rest: &str, entry: &mut Map<String, Value>) {
    // "Nov 27 06:00:00 host tag[pid]: message" (the day may be space-padded: "Nov  7").
    let mut text = rest;
    let has_stamp = text.len() >= 16
        && text.is_char_boundary(16)
        && text[..16].is_ascii()
        && text.as_bytes()[3] == b' '
        && text.as_bytes()[15] == b' ';
    if has_stamp {
        let stamp = &text[..15];
        if let Some(ts) = bsd_timestamp(stamp) {
            entry.insert("ts".into(), ts.to_rfc3339().into());
        }
        text = &text[16..];
        if let Some((host, after)) = text.split_once(' ') {
            entry.insert("hostname".into(), host.into());
            text = after;
        }
    }
    if let Some(colon) = text.find(": ") {
        let tag = &text[..colon];
        if !tag.is_empty() && !tag.contains(' ') {
            let (name, pid) = match tag.split_once('[') {
                Some((name, pid)) => (name, Some(pid.trim_end_matches(']'))),
                None => (tag, None),
            };
            entry.insert("service".into(), name.into());
            if let Some(pid) = pid {
                entry.insert("procid".into(), pid.into());
            }
            text = &text[colon + 2..];
        }
    }
    entry.insert("msg".into(), text.into());
}

/// `Nov 27 06:00:00`, in the current year (BSD syslog has none), UTC.
fn bsd_timestamp(stamp: &str) -> Option<Timestamp> {
    let month = match &stamp[..3] {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let day: u32 = stamp[4..6].trim().parse().ok()?;
    let year = Timestamp::now().to_rfc3339()[..4].to_string();
    Timestamp::parse_rfc3339(&format!("{year}-{month:02}-{day:02}T{}Z", &stamp[7..15])).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc5424_messages_keep_every_part() {
        let e = to_entry(
            "<165>1 2026-11-27T06:00:00.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\" eventSource=\"Application\"] An application event\n",
            "syslog-udp",
        );
        assert_eq!(e["level"], "notice");
        assert_eq!(e["facility"], "local4");
        assert_eq!(e["ts"], "2026-11-27T06:00:00.003Z");
        assert_eq!(e["hostname"], "mymachine.example.com");
        assert_eq!(e["service"], "evntslog");
        assert_eq!(e["msgid"], "ID47");
        assert!(e.get("procid").is_none());
        assert_eq!(
            e["structured_data"],
            "[exampleSDID@32473 iut=\"3\" eventSource=\"Application\"]"
        );
        assert_eq!(e["msg"], "An application event");
        let bare = to_entry("<13>1 - - - - - -", "syslog-tcp");
        assert_eq!(bare["msg"], "");
        assert_eq!(bare["level"], "notice");
    }

    #[test]
    fn odd_bytes_never_panic() {
        for text in [
            "<1>",
            "<999>x",
            "<13>Nov \u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}x y: z",
            "<13>1 ",
            "<13>1 [unclosed",
            "<>x",
            "<13>Zzz 99 99:99:99 h t: m",
        ] {
            let e = to_entry(text, "syslog-udp");
            assert_eq!(e["source"], "syslog-udp", "{text:?}");
            assert!(e["msg"].is_string(), "{text:?}: {e:?}");
        }
    }

    #[test]
    fn rfc3164_messages_as_rsyslog_sends_them() {
        let e = to_entry(
            "<38>Nov  7 06:00:00 web-1 sshd[4242]: Accepted publickey for bob",
            "syslog-udp",
        );
        assert_eq!(e["level"], "info");
        assert_eq!(e["facility"], "auth");
        assert_eq!(e["hostname"], "web-1");
        assert_eq!(e["service"], "sshd");
        assert_eq!(e["procid"], "4242");
        assert_eq!(e["msg"], "Accepted publickey for bob");
        assert!(e["ts"].as_str().unwrap().ends_with("-11-07T06:00:00Z"));
        let e = to_entry("<11>kernel: oops", "syslog-udp");
        assert_eq!(e["level"], "error");
        assert_eq!(e["service"], "kernel");
        let e = to_entry("no priority at all", "syslog-udp");
        assert_eq!(e["msg"], "no priority at all");
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Whatever arrives on a socket: an entry with its source and a message taken
            /// from the text itself, and a level only if it is a real one.
            #[test]
            fn any_text_is_an_entry_whose_message_comes_from_it(text in ".{0,200}") {
                let e = to_entry(&text, "syslog-tcp");
                prop_assert_eq!(&e["source"], "syslog-tcp");
                let msg = e["msg"].as_str().expect("a message");
                prop_assert!(text.contains(msg.trim()), "{msg:?} not in {text:?}");
                if let Some(level) = e.get("level") {
                    prop_assert!(level.as_str().and_then(LogLevel::parse).is_some());
                }
            }

            /// RFC 5424 as a sender writes it comes back field by field.
            #[test]
            fn rfc5424_round_trips(
                pri in 0u8..192,
                host in "[a-z][a-z0-9-]{0,15}",
                app in "[a-z][a-z0-9_]{0,15}",
                procid in "[0-9]{1,5}",
                msg in "[!-~]([ -~]{0,78}[!-~])?",
            ) {
                let line = format!("<{pri}>1 2026-11-27T06:00:00Z {host} {app} {procid} - - {msg}");
                let e = to_entry(&line, "syslog-udp");
                prop_assert_eq!(&e["hostname"], host.as_str());
                prop_assert_eq!(&e["service"], app.as_str());
                prop_assert_eq!(&e["procid"], procid.as_str());
                prop_assert_eq!(e["msg"].as_str().unwrap(), msg.as_str());
                let level = LogLevel::from_syslog_severity(u64::from(pri & 7)).unwrap();
                prop_assert_eq!(&e["level"], level.as_str());
            }
        }
    }
}
