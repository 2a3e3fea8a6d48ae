//! Local socket inputs: syslog over UDP and TCP (octet-counted or newline framing), and a Unix
//! stream socket taking NDJSON entries or raw lines. Everything received goes to the spool.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, UdpSocket, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::spool::Spool;
use crate::syslog;

/// Longest message accepted on a socket; longer ones are cut and marked.
const MAX_MESSAGE: usize = 1024 * 1024;

fn spool_entry(spool: &Spool, entry: Map<String, Value>, transport: &str) {
    let line = serde_json::to_vec(&Value::Object(entry)).unwrap_or_default();
    metrics::counter!("logging_agent_socket_messages_total", "input" => transport.to_string())
        .increment(1);
    if let Err(error) = spool.append(&line) {
        metrics::counter!("logging_agent_dropped_total", "reason" => "spool_write").increment(1);
        tracing::error!(%error, "cannot write to the socket spool; message dropped");
    }
}

fn cut(text: &str) -> (&str, bool) {
    if text.len() <= MAX_MESSAGE {
        (text, false)
    } else {
        (&text[..text.floor_char_boundary(MAX_MESSAGE)], true)
    }
}

fn syslog_entry(text: &str, transport: &str) -> Map<String, Value> {
    let (text, truncated) = cut(text);
    let mut entry = syslog::to_entry(text, transport);
    entry.entry("service").or_insert_with(|| "syslog".into());
    if truncated {
        entry.insert("truncated".into(), true.into());
    }
    entry
}

/// A line from the Unix socket: an entry as JSON (fields as for `POST /api/logs`), or a raw
/// line of text.
fn socket_entry(text: &str) -> Map<String, Value> {
    let (text, truncated) = cut(text.trim_end_matches(['\r', '\n']));
    let mut entry = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        _ => {
            let mut map = Map::new();
            map.insert("msg".into(), text.into());
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
                    spool_entry(&spool, syslog_entry(&text, "syslog-udp"), "syslog-udp");
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
                if let Err(error) = read_syslog_stream(stream, &spool).await {
                    tracing::debug!(%peer, %error, "syslog TCP connection ended");
                }
            });
        }
    });
    Ok((task, local))
}

async fn read_syslog_stream(stream: tokio::net::TcpStream, spool: &Spool) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let first = {
            let buf = reader.fill_buf().await?;
            match buf.first() {
                None => return Ok(()),
                Some(b) => *b,
            }
        };
        if first.is_ascii_digit() {
            // Octet counting: "<length> <message>".
            let mut length = Vec::new();
            reader.read_until(b' ', &mut length).await?;
            let length: usize = std::str::from_utf8(&length)
                .ok()
                .and_then(|l| l.trim().parse().ok())
                .filter(|l| *l <= MAX_MESSAGE)
                .ok_or_else(|| std::io::Error::other("bad octet count"))?;
            let mut message = vec![0u8; length];
            reader.read_exact(&mut message).await?;
            let text = String::from_utf8_lossy(&message);
            spool_entry(spool, syslog_entry(&text, "syslog-tcp"), "syslog-tcp");
        } else {
            let mut line = Vec::new();
            let n = (&mut reader)
                .take(MAX_MESSAGE as u64 + 1)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Ok(());
            }
            let text = String::from_utf8_lossy(&line);
            if !text.trim().is_empty() {
                spool_entry(spool, syslog_entry(&text, "syslog-tcp"), "syslog-tcp");
            }
        }
    }
}

/// The Unix stream socket: NDJSON entries or raw lines.
pub async fn unix(
    path: &Path,
    spool: Arc<Spool>,
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
                loop {
                    line.clear();
                    match (&mut reader)
                        .take(MAX_MESSAGE as u64 + 1)
                        .read_until(b'\n', &mut line)
                        .await
                    {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {
                            let text = String::from_utf8_lossy(&line);
                            if !text.trim().is_empty() {
                                spool_entry(&spool, socket_entry(&text), "unix-socket");
                            }
                        }
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
        let e =
            socket_entry("{\"level\":\"error\",\"service\":\"cron\",\"message\":\"job failed\"}\n");
        assert_eq!(e["service"], "cron");
        assert_eq!(e["source"], "unix-socket");
        let raw = socket_entry("just text\n");
        assert_eq!(raw["msg"], "just text");
        assert_eq!(raw["service"], "socket");
    }
}
