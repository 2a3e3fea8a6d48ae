//! Local socket inputs: syslog over UDP and TCP (octet-counted or newline framing), and a Unix
//! stream socket taking NDJSON entries or raw lines. Everything received goes to the spool.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use logging_common::detect::detect_level;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, UdpSocket, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::spool::Spool;
use crate::syslog;

/// Room left in an entry for everything but the message (id, timestamp, metadata).
const ENVELOPE: usize = 4096;

/// The longest message kept from a socket for entries of at most `max_log_size` bytes;
/// longer ones are cut there, marked `truncated`, and the rest of them is read and dropped
/// (never taken for the next message).
pub fn max_message(max_log_size: usize) -> usize {
    max_log_size.saturating_sub(ENVELOPE).max(256)
}

fn spool_entry(spool: &Spool, entry: Map<String, Value>, transport: &str) {
    let line = serde_json::to_vec(&Value::Object(entry)).unwrap_or_default();
    metrics::counter!("logging_agent_socket_messages_total", "input" => transport.to_string())
        .increment(1);
    if let Err(error) = spool.append(&line) {
        metrics::counter!("logging_agent_dropped_total", "reason" => "spool_write").increment(1);
        tracing::error!(%error, "cannot write to the socket spool; message dropped");
    }
}

fn cut(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        (text, false)
    } else {
        (&text[..text.floor_char_boundary(max)], true)
    }
}

fn syslog_entry(text: &str, transport: &str, max: usize, cut_before: bool) -> Map<String, Value> {
    let (text, truncated) = cut(text, max);
    let truncated = truncated || cut_before;
    let mut entry = syslog::to_entry(text, transport);
    entry.entry("service").or_insert_with(|| "syslog".into());
    if truncated {
        entry.insert("truncated".into(), true.into());
    }
    entry
}

/// A line from the Unix socket: an entry as JSON (fields as for `POST /api/logs`), or a raw
/// line of text.
fn socket_entry(text: &str, max: usize, cut_before: bool) -> Map<String, Value> {
    let (text, truncated) = cut(text.trim_end_matches(['\r', '\n']), max);
    let truncated = truncated || cut_before;
    let mut entry = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        _ => {
            let mut map = Map::new();
            map.insert("msg".into(), text.into());
            // The level a raw line states is read as a file's would be.
            if let Some(level) = detect_level(text) {
                map.insert("level".into(), level.as_str().into());
            }
            map
        }
    };
    entry.entry("service").or_insert_with(|| "socket".into());
    entry.insert("source".into(), "unix-socket".into());
    if truncated {
        entry.insert("truncated".into(), true.into());
    }
    entry
}

/// Syslog over UDP: one message a datagram.
pub async fn udp(
    address: &str,
    spool: Arc<Spool>,
    max: usize,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(JoinHandle<()>, SocketAddr)> {
    let socket = UdpSocket::bind(address).await?;
    let local = socket.local_addr()?;
    tracing::info!(address = %local, "syslog over UDP");
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let received = tokio::select! {
                r = socket.recv_from(&mut buf) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match received {
                Ok((n, _)) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    spool_entry(
                        &spool,
                        syslog_entry(&text, "syslog-udp", max, false),
                        "syslog-udp",
                    );
                }
                Err(error) => tracing::warn!(%error, "syslog UDP receive failed"),
            }
        }
    });
    Ok((task, local))
}

/// Syslog over TCP: RFC 6587 octet counting (`<length> <message>`) or one message a line,
/// detected per connection from its first byte.
pub async fn tcp(
    address: &str,
    spool: Arc<Spool>,
    max: usize,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(JoinHandle<()>, SocketAddr)> {
    let listener = TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    tracing::info!(address = %local, "syslog over TCP");
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Ok((stream, peer)) = accepted else {
                continue;
            };
            let spool = spool.clone();
            tokio::spawn(async move {
                if let Err(error) = read_syslog_stream(stream, &spool, max).await {
                    tracing::debug!(%peer, %error, "syslog TCP connection ended");
                }
            });
        }
    });
    Ok((task, local))
}

async fn read_syslog_stream(
    stream: tokio::net::TcpStream,
    spool: &Spool,
    max: usize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        let first = {
            let buf = reader.fill_buf().await?;
            match buf.first() {
                None => return Ok(()),
                Some(b) => *b,
            }
        };
        if first.is_ascii_digit() {
            // Octet counting: "<length> <message>". A length past what is kept is read whole
            // (the stream stays framed) and all but its first `max` bytes dropped.
            let mut length = Vec::new();
            (&mut reader).take(20).read_until(b' ', &mut length).await?;
            let length: u64 = std::str::from_utf8(&length)
                .ok()
                .and_then(|l| l.trim().parse().ok())
                .ok_or_else(|| std::io::Error::other("bad octet count"))?;
            let mut message = Vec::new();
            (&mut reader)
                .take(length.min(max as u64))
                .read_to_end(&mut message)
                .await?;
            let rest = length.saturating_sub(message.len() as u64);
            if rest > 0 {
                tokio::io::copy(&mut (&mut reader).take(rest), &mut tokio::io::sink()).await?;
            }
            let text = String::from_utf8_lossy(&message);
            spool_entry(
                spool,
                syslog_entry(&text, "syslog-tcp", max, rest > 0),
                "syslog-tcp",
            );
        } else {
            let Some(cut_before) = read_line(&mut reader, &mut line, max).await? else {
                return Ok(());
            };
            let text = String::from_utf8_lossy(&line);
            if !text.trim().is_empty() {
                spool_entry(
                    spool,
                    syslog_entry(&text, "syslog-tcp", max, cut_before),
                    "syslog-tcp",
                );
            }
        }
    }
}

/// Reads one line into `line`, keeping at most `max` bytes of it and dropping the rest up to
/// its newline. `None` at the end of the stream; else whether the line was cut.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<bool>> {
    line.clear();
    let n = (&mut *reader)
        .take(max as u64)
        .read_until(b'\n', line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') || n < max {
        return Ok(Some(false));
    }
    // Cut: skip to the end of the line without keeping it.
    loop {
        let (done, used) = {
            let buf = reader.fill_buf().await?;
            if buf.is_empty() {
                return Ok(Some(true));
            }
            match memchr::memchr(b'\n', buf) {
                Some(i) => (true, i + 1),
                None => (false, buf.len()),
            }
        };
        reader.consume(used);
        if done {
            return Ok(Some(true));
        }
    }
}

/// The Unix stream socket: NDJSON entries or raw lines.
pub async fn unix(
    path: &Path,
    spool: Arc<Spool>,
    max: usize,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<JoinHandle<()>> {
    // A socket file left by an earlier run would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    tracing::info!(path = %path.display(), "Unix socket input");
    Ok(tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Ok((stream, _)) = accepted else { continue };
            let spool = spool.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                while let Ok(Some(cut_before)) = read_line(&mut reader, &mut line, max).await {
                    let text = String::from_utf8_lossy(&line);
                    if !text.trim().is_empty() {
                        spool_entry(&spool, socket_entry(&text, max, cut_before), "unix-socket");
                    }
                }
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_lines_are_entries_or_raw_messages() {
        let e = socket_entry(
            "{\"level\":\"error\",\"service\":\"cron\",\"message\":\"job failed\"}\n",
            1024,
            false,
        );
        assert_eq!(e["service"], "cron");
        assert_eq!(e["source"], "unix-socket");
        let raw = socket_entry("just text\n", 1024, false);
        assert_eq!(raw["msg"], "just text");
        assert_eq!(raw["service"], "socket");
        assert!(raw.get("level").is_none());
        let raw = socket_entry("[Mon Nov 30 04:47:44 2026] [error] gone\n", 1024, false);
        assert_eq!(raw["level"], "error");
    }

    #[tokio::test]
    async fn a_long_line_is_cut_and_its_rest_never_becomes_the_next_message() {
        let mut input: &[u8] = b"short\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\nnext\nBBBBBBBBBBBB";
        let mut line = Vec::new();
        let mut got = Vec::new();
        while let Some(cut) = read_line(&mut input, &mut line, 10).await.unwrap() {
            got.push((String::from_utf8_lossy(&line).into_owned(), cut));
        }
        assert_eq!(
            got,
            vec![
                ("short\n".to_string(), false),
                ("AAAAAAAAAA".to_string(), true),
                ("next\n".to_string(), false),
                ("BBBBBBBBBB".to_string(), true),
            ]
        );
    }
}
