//! Container runtime log formats: what one line of a file says, before any joining.
//!
//! - **CRI** (containerd, CRI-O; what kubelet writes under `/var/log/pods`):
//!   `<RFC3339Nano> <stdout|stderr> <P|F>[:…] <message>`. `P` is a piece of a longer line,
//!   `F` its last (or only) piece.
//! - **Docker json-file**: `{"log":"…\n","stream":"stdout","time":"…"}`; a `log` without the
//!   trailing newline is a 16 KiB piece of a longer line.
//! - **Plain** text: every line is a whole message.

use std::borrow::Cow;

use logging_common::Timestamp;
use serde::Deserialize;

/// The file format, detected from its first line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Cri,
    Docker,
    Plain,
}

/// Which output stream a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    fn parse(text: &[u8]) -> Option<Stream> {
        match text {
            b"stdout" => Some(Stream::Stdout),
            b"stderr" => Some(Stream::Stderr),
            _ => None,
        }
    }
}

/// One line of a file, decoded.
#[derive(Debug, PartialEq)]
pub struct Line<'a> {
    /// When the runtime wrote it (CRI and Docker).
    pub time: Option<Timestamp>,
    pub stream: Stream,
    /// More pieces of the same message follow.
    pub partial: bool,
    pub body: Cow<'a, [u8]>,
}

/// Detects the format from a file's first line.
pub fn detect(first_line: &[u8]) -> Format {
    if decode_cri(first_line).is_some() {
        Format::Cri
    } else if decode_docker(first_line).is_some() {
        Format::Docker
    } else {
        Format::Plain
    }
}

/// Decodes a line (without its newline). A line that does not fit the file's format is kept
/// as a whole plain message rather than dropped.
pub fn decode(format: Format, line: &[u8]) -> Line<'_> {
    let decoded = match format {
        Format::Cri => decode_cri(line),
        Format::Docker => decode_docker(line),
        Format::Plain => None,
    };
    decoded.unwrap_or(Line {
        time: None,
        stream: Stream::Stdout,
        partial: false,
        body: Cow::Borrowed(line),
    })
}

fn decode_cri(line: &[u8]) -> Option<Line<'_>> {
    let mut fields = line.splitn(4, |&b| b == b' ');
    let time = fields.next()?;
    let stream = Stream::parse(fields.next()?)?;
    let tag = fields.next()?;
    let body = fields.next().unwrap_or(b"");
    // The tag is P or F, possibly followed by ":"-separated extensions.
    let partial = match tag.split(|&b| b == b':').next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    let time = std::str::from_utf8(time)
        .ok()
        .and_then(|t| Timestamp::parse_rfc3339(t).ok())?;
    Some(Line {
        time: Some(time),
        stream,
        partial,
        body: Cow::Borrowed(body),
    })
}

#[derive(Deserialize)]
struct DockerLine<'a> {
    #[serde(borrow)]
    log: Cow<'a, str>,
    #[serde(default, borrow)]
    stream: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    time: Option<Cow<'a, str>>,
}

fn decode_docker(line: &[u8]) -> Option<Line<'_>> {
    if !line.starts_with(b"{") {
        return None;
    }
    let docker: DockerLine<'_> = serde_json::from_slice(line).ok()?;
    let stream = match docker.stream.as_deref() {
        Some("stderr") => Stream::Stderr,
        _ => Stream::Stdout,
    };
    let time = docker
        .time
        .as_deref()
        .and_then(|t| Timestamp::parse_rfc3339(t).ok());
    let (body, partial) = match docker.log {
        Cow::Borrowed(text) => match text.strip_suffix('\n') {
            Some(whole) => (Cow::Borrowed(whole.as_bytes()), false),
            None => (Cow::Borrowed(text.as_bytes()), true),
        },
        Cow::Owned(mut text) => {
            let partial = !text.ends_with('\n');
            if !partial {
                text.pop();
            }
            (Cow::Owned(text.into_bytes()), partial)
        }
    };
    Some(Line {
        time,
        stream,
        partial,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_cri_lines_decode_with_their_tags() {
        let line =
            b"2026-11-27T06:16:57.123456789Z stdout F {\"level\":\"info\",\"msg\":\"ready\"}";
        assert_eq!(detect(line), Format::Cri);
        let d = decode(Format::Cri, line);
        assert_eq!(d.stream, Stream::Stdout);
        assert!(!d.partial);
        assert_eq!(&*d.body, b"{\"level\":\"info\",\"msg\":\"ready\"}");
        assert_eq!(
            d.time.unwrap().to_rfc3339(),
            "2026-11-27T06:16:57.123456789Z"
        );
        let p = decode(Format::Cri, b"2026-11-27T06:16:57Z stderr P first half ");
        assert!(p.partial);
        assert_eq!(p.stream, Stream::Stderr);
        assert_eq!(&*p.body, b"first half ");
        let ext = decode(Format::Cri, b"2026-11-27T06:16:57Z stdout F:x message");
        assert!(!ext.partial);
        let empty = decode(Format::Cri, b"2026-11-27T06:16:57Z stdout F");
        assert_eq!(&*empty.body, b"");
    }

    #[test]
    fn docker_json_file_lines_decode_and_pieces_are_marked() {
        let line = br#"{"log":"GET / 200\n","stream":"stdout","time":"2026-11-27T06:16:57.5Z"}"#;
        assert_eq!(detect(line), Format::Docker);
        let d = decode(Format::Docker, line);
        assert_eq!(&*d.body, b"GET / 200");
        assert!(!d.partial);
        let piece = decode(
            Format::Docker,
            br#"{"log":"xxxx","stream":"stderr","time":"2026-11-27T06:16:57Z"}"#,
        );
        assert!(piece.partial);
        assert_eq!(piece.stream, Stream::Stderr);
        let escaped = decode(
            Format::Docker,
            br#"{"log":"tab\there \"q\"\n","stream":"stdout"}"#,
        );
        assert_eq!(&*escaped.body, b"tab\there \"q\"");
    }

    #[test]
    fn anything_else_is_plain_and_a_misfit_line_is_kept_whole() {
        assert_eq!(detect(b"INFO starting server"), Format::Plain);
        assert_eq!(detect(b"{\"level\":\"info\"}"), Format::Plain);
        let odd = decode(Format::Cri, b"garbage that is not CRI");
        assert_eq!(&*odd.body, b"garbage that is not CRI");
        assert!(!odd.partial);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn body() -> impl Strategy<Value = String> {
            // Anything but a newline: that ends the line.
            "[^\\n]{0,120}"
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn arbitrary_bytes_decode_to_something_in_every_format(
                line in proptest::collection::vec(any::<u8>(), 0..300)
            ) {
                for format in [Format::Cri, Format::Docker, Format::Plain] {
                    let d = decode(format, &line);
                    prop_assert!(d.body.len() <= line.len() || format == Format::Docker);
                }
                let _ = detect(&line);
            }

            #[test]
            fn cri_lines_round_trip(
                nanos in 0i64..4_000_000_000_000_000_000,
                stderr in any::<bool>(),
                partial in any::<bool>(),
                text in body(),
            ) {
                let ts = Timestamp::from_nanos(nanos);
                let line = format!(
                    "{} {} {} {text}",
                    ts.to_rfc3339(),
                    if stderr { "stderr" } else { "stdout" },
                    if partial { "P" } else { "F" }
                );
                prop_assert_eq!(detect(line.as_bytes()), Format::Cri);
                let d = decode(Format::Cri, line.as_bytes());
                prop_assert_eq!(d.time, Some(ts));
                prop_assert_eq!(d.stream, if stderr { Stream::Stderr } else { Stream::Stdout });
                prop_assert_eq!(d.partial, partial);
                prop_assert_eq!(&*d.body, text.as_bytes());
            }

            #[test]
            fn docker_lines_round_trip(text in body(), whole in any::<bool>(), stderr in any::<bool>()) {
                let log = if whole { format!("{text}\n") } else { text.clone() };
                let line = serde_json::json!({
                    "log": log,
                    "stream": if stderr { "stderr" } else { "stdout" },
                    "time": "2026-11-27T06:16:57.123456789Z",
                })
                .to_string();
                let d = decode(Format::Docker, line.as_bytes());
                prop_assert_eq!(&*d.body, text.as_bytes());
                prop_assert_eq!(d.partial, !whole);
                prop_assert!(d.time.is_some());
            }
        }
    }
}
