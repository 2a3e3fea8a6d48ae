//! The Fluent forward protocol on `FORWARD_PORT` (default 24224; 0 = off): what Fluent Bit's
//! and Fluentd's `forward` outputs and Docker's `fluentd` log driver send.
//!
//! A connection carries MessagePack arrays, one after another:
//! - Message: `[tag, time, record, option?]`;
//! - Forward: `[tag, [[time, record], …], option?]`;
//! - PackedForward: `[tag, <bytes of [time, record] entries>, option?]`, and
//!   CompressedPackedForward: the same bytes gzipped, `option.compressed == "gzip"`.
//!
//! `time` is seconds, or the EventTime extension (seconds and nanoseconds). Each record is
//! mapped as an Elasticsearch `_bulk` document is (`log`/`message`, level, Fluent Bit's and
//! Fluentd's Kubernetes fields, the rest into `context`), the tag being the service unless the
//! record names one and kept as `context.tag`; its id derives from the tag, time and record,
//! so a chunk sent again stores nothing twice. With `option.chunk`, the answer `{"ack": chunk}`
//! is written once every entry of the message is durable; a message whose entries cannot be
//! stored is not acknowledged (the client sends it again). Records that are not maps, or
//! whose entry is refused, are counted in `logging_aggregator_forward_refused_total` and
//! logged with the reason (the protocol has no way to answer per record).
//!
//! With `FORWARD_SHARED_KEY` set, a connection must first pass the handshake: the server
//! sends `HELO` with a nonce, the client answers `PING` with
//! `sha512_hex(salt + hostname + nonce + shared_key)`, the server `PONG` with its own digest.
//! User authentication (`username`/`password` in `PING`) is not supported: a `HELO` asks for
//! none.
//!
//! Everything the client sends is bounded: a message at most `MAX_REQUEST_BYTES` (also once
//! inflated) and 32 levels deep; the handshake within `HTTP_HEADER_TIMEOUT`; an idle
//! connection closes after five minutes; at most `MAX_CONNECTIONS` connections.

use std::io::{Cursor, Read};
use std::sync::Arc;
use std::time::Duration;

use logging_common::Timestamp;
use rmpv::Value;
use sha2::{Digest, Sha512};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::api::elastic::{Origin, document_entry};
use crate::api::{SharedState, push_json};
use crate::ingest::IngestError;

/// Deepest MessagePack a message may nest.
const MAX_DEPTH: usize = 32;
/// An idle connection closes after this long.
const IDLE: Duration = Duration::from_secs(300);
/// How long a partial message waits for more bytes before it is decoded anyway, at first
/// and at most (the wait doubles while the message stays partial).
const FIRST_PAUSE: Duration = Duration::from_millis(5);
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// Serves the forward protocol until `stop`.
pub fn serve(
    listener: TcpListener,
    state: SharedState,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(state.config.max_connections));
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.wait_for(|s| *s) => break,
            };
            let Ok((tcp, _)) = accepted else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics::counter!("logging_aggregator_connections_refused_total", "listener" => "forward")
                    .increment(1);
                continue;
            };
            let (state, stop) = (state.clone(), stop.clone());
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(reason) = connection(tcp, &state, stop).await {
                    tracing::warn!(%reason, "forward connection closed");
                }
            });
        }
    })
}

async fn connection(
    mut tcp: TcpStream,
    state: &SharedState,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    let limit = state.config.max_request_bytes;
    let mut buffer: Vec<u8> = Vec::new();
    if let Some(key) = &state.config.forward_shared_key {
        let handshake = Duration::from_secs(state.config.http_header_timeout);
        tokio::time::timeout(handshake, authenticate(&mut tcp, &mut buffer, key, limit))
            .await
            .map_err(|_| "the handshake did not finish within HTTP_HEADER_TIMEOUT".to_string())??;
    }
    // A MessagePack value does not say its length, so each attempt on a partial message
    // reads it again from its start: the next attempt waits until the buffer has grown by a
    // quarter (at least 64 KiB), or until the client has paused — a pause that doubles while
    // the message stays partial, so a client sending a byte at a time cannot make the
    // attempts cost more than the message's size a few times over.
    let mut tried_at = 0usize;
    let mut patience = FIRST_PAUSE;
    let mut last_data = tokio::time::Instant::now();
    let mut force = false;
    // The client has finished sending: what it sent is decoded once more, then the
    // connection ends.
    let mut closing = false;
    loop {
        let grown = buffer.len() >= tried_at + (tried_at / 4).max(64 * 1024);
        if force || grown {
            force = false;
            while let Some(message) = next_message(&mut buffer)? {
                patience = FIRST_PAUSE;
                // Each message is an ingest request of its own (a trace of its own).
                let span = tracing::debug_span!("forward message", otel.kind = "server");
                let ack = handle(state, message).instrument(span).await?;
                if let Some(chunk) = ack {
                    let mut out = Vec::new();
                    let answer = Value::Map(vec![(Value::from("ack"), Value::from(chunk))]);
                    rmpv::encode::write_value(&mut out, &answer).map_err(|e| e.to_string())?;
                    tcp.write_all(&out).await.map_err(|e| e.to_string())?;
                }
            }
            tried_at = buffer.len();
        }
        if closing {
            return Ok(());
        }
        if buffer.len() > limit {
            return Err(format!(
                "a message is larger than MAX_REQUEST_BYTES ({limit})"
            ));
        }
        let pending = !buffer.is_empty();
        let wait = if pending { patience } else { IDLE };
        let mut chunk = [0u8; 64 * 1024];
        let read = tokio::select! {
            read = tokio::time::timeout(wait, tcp.read(&mut chunk)) => read,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        match read {
            Err(_) if pending && last_data.elapsed() < IDLE => {
                // The client paused in the middle of a message (or has sent it whole).
                force = tried_at < buffer.len();
                patience = (patience * 2).min(MAX_PAUSE);
                continue;
            }
            Err(_) => return Ok(()),
            Ok(Ok(0)) => {
                closing = true;
                force = true;
                continue;
            }
            Ok(Ok(n)) => buffer.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e.to_string()),
        }
        last_data = tokio::time::Instant::now();
        // Whatever else has arrived, before deciding.
        while buffer.len() <= limit {
            match tcp.try_read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// The first complete MessagePack value of `buffer` (removed from it), `None` when it needs
/// more bytes, an error when the bytes are not MessagePack.
fn next_message(buffer: &mut Vec<u8>) -> Result<Option<Value>, String> {
    if buffer.is_empty() {
        return Ok(None);
    }
    let mut cursor = Cursor::new(&buffer[..]);
    match rmpv::decode::read_value_with_max_depth(&mut cursor, MAX_DEPTH) {
        Ok(value) => {
            let used = cursor.position() as usize;
            buffer.drain(..used);
            Ok(Some(value))
        }
        Err(error) if incomplete(&error) => Ok(None),
        Err(error) => Err(format!("not a forward message (MessagePack): {error}")),
    }
}

fn incomplete(error: &rmpv::decode::Error) -> bool {
    use rmpv::decode::Error;
    match error {
        Error::InvalidMarkerRead(e) | Error::InvalidDataRead(e) => {
            e.kind() == std::io::ErrorKind::UnexpectedEof
        }
        _ => false,
    }
}

/// The handshake of a shared key: `HELO`, `PING`, `PONG`.
async fn authenticate(
    tcp: &mut TcpStream,
    buffer: &mut Vec<u8>,
    key: &str,
    limit: usize,
) -> Result<(), String> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(|e| e.to_string())?;
    let helo = Value::Array(vec![
        Value::from("HELO"),
        Value::Map(vec![
            (Value::from("nonce"), Value::Binary(nonce.to_vec())),
            (Value::from("auth"), Value::from("")),
            (Value::from("keepalive"), Value::Boolean(true)),
        ]),
    ]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &helo).map_err(|e| e.to_string())?;
    tcp.write_all(&out).await.map_err(|e| e.to_string())?;
    let ping = loop {
        if let Some(message) = next_message(buffer)? {
            break message;
        }
        if buffer.len() > limit {
            return Err("the PING is too large".into());
        }
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the client left during the handshake".into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let fields = match &ping {
        Value::Array(fields) if fields.first().and_then(text) == Some("PING".into()) => fields,
        _ => return Err("expected PING after HELO".into()),
    };
    let part = |i: usize| fields.get(i).and_then(text).unwrap_or_default();
    let (hostname, salt, digest) = (part(1), part(2), part(3));
    let expected = sha512_hex(&[salt.as_bytes(), hostname.as_bytes(), &nonce, key.as_bytes()]);
    let ok = digest.eq_ignore_ascii_case(&expected);
    let server = "logging-aggregator";
    let pong = Value::Array(vec![
        Value::from("PONG"),
        Value::Boolean(ok),
        Value::from(if ok { "" } else { "shared_key mismatch" }),
        Value::from(server),
        Value::from(sha512_hex(&[
            salt.as_bytes(),
            server.as_bytes(),
            &nonce,
            key.as_bytes(),
        ])),
    ]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &pong).map_err(|e| e.to_string())?;
    tcp.write_all(&out).await.map_err(|e| e.to_string())?;
    if ok {
        Ok(())
    } else {
        Err(format!("shared_key mismatch from {hostname:?}"))
    }
}

/// SHA-512 of the parts, as lower-case hex.
pub fn sha512_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Sha512::new();
    for part in parts {
        hasher.update(part);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An event's time and record: `[time, record]`, or a record alone (no time).
fn pair(event: &Value) -> (&Value, &Value) {
    match event {
        Value::Array(pair) if pair.len() >= 2 => (&pair[0], &pair[1]),
        other => (&NIL, other),
    }
}

/// What an event without a time or record stands for.
static NIL: Value = Value::Nil;

/// A string or binary value as text.
fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => s.as_str().map(str::to_string),
        Value::Binary(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

/// Stores one message's entries; the chunk to acknowledge, if it asked for one.
async fn handle(state: &SharedState, message: Value) -> Result<Option<String>, String> {
    let Value::Array(parts) = message else {
        return Err("a forward message is an array [tag, …]".into());
    };
    if parts.len() < 2 {
        return Err("a forward message has a tag and entries".into());
    }
    let tag = text(&parts[0]).ok_or("the tag is not a string")?;
    // Message mode has the option fourth; the others third.
    let packed_or_forward = matches!(
        parts[1],
        Value::Array(_) | Value::String(_) | Value::Binary(_)
    );
    let option = parts.get(if packed_or_forward { 2 } else { 3 });
    let option_text = |name: &str| match option {
        Some(Value::Map(pairs)) => pairs
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some(name))
            .and_then(|(_, v)| text(v)),
        _ => None,
    };
    let chunk = option_text("chunk");
    let limit = state.config.max_request_bytes;
    // The events borrow from the message (or from the entries a packed stream held).
    let mut packed_entries = Vec::new();
    let events: Vec<(&Value, &Value)> = match &parts[1] {
        Value::Array(entries) => entries.iter().map(pair).collect(),
        Value::String(_) | Value::Binary(_) => {
            let packed = match &parts[1] {
                Value::Binary(b) => b.clone(),
                Value::String(s) => s.as_bytes().to_vec(),
                _ => Vec::new(),
            };
            let mut buffer = match option_text("compressed").as_deref() {
                Some("gzip") => {
                    let mut out = Vec::new();
                    flate2::read::MultiGzDecoder::new(&packed[..])
                        .take(limit as u64 + 1)
                        .read_to_end(&mut out)
                        .map_err(|e| format!("the packed entries are not gzip: {e}"))?;
                    if out.len() > limit {
                        return Err("the packed entries inflate past MAX_REQUEST_BYTES".into());
                    }
                    out
                }
                Some(other) => {
                    return Err(format!("compressed {other:?} is not supported (gzip)"));
                }
                None => packed,
            };
            while let Some(entry) = next_message(&mut buffer)? {
                packed_entries.push(entry);
            }
            if !buffer.is_empty() {
                return Err("the packed entries end in the middle of one".into());
            }
            packed_entries.iter().map(pair).collect()
        }
        time => vec![(time, parts.get(2).unwrap_or(&NIL))],
    };
    let now = Timestamp::now();
    let mut raws = Vec::with_capacity(events.len());
    let mut refused = 0usize;
    for &(time, record) in &events {
        match entry(&tag, time, record, now) {
            Ok(raw) => raws.push(raw),
            Err(reason) => {
                refused += 1;
                tracing::warn!(tag, %reason, "forward record refused");
            }
        }
    }
    if !raws.is_empty() {
        let refs: Vec<&str> = raws.iter().map(String::as_str).collect();
        let outcome = loop {
            match state.ingest.ingest(&refs, None).await {
                Ok(outcome) => break outcome,
                // Behind: hold the connection (the client's buffer fills) and try again.
                Err(IngestError::Backpressure { .. }) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(error) => return Err(format!("the entries cannot be stored: {error}")),
            }
        };
        for rejection in &outcome.rejected.listed {
            tracing::warn!(tag, reason = %rejection.error, "forward record refused");
        }
        refused += outcome.rejected.count;
        metrics::counter!("logging_aggregator_ingest_entries_total", "protocol" => "forward")
            .increment((outcome.accepted + outcome.duplicates) as u64);
    }
    if refused > 0 {
        metrics::counter!("logging_aggregator_forward_refused_total").increment(refused as u64);
    }
    Ok(chunk)
}

/// An event as the JSON of an entry.
fn entry(tag: &str, time: &Value, record: &Value, now: Timestamp) -> Result<String, String> {
    let at = match time {
        Value::Integer(i) => i
            .as_i64()
            .and_then(|s| s.checked_mul(1_000_000_000))
            .map(Timestamp::from_nanos),
        Value::F64(f) => Timestamp::from_epoch_number(*f).ok(),
        Value::F32(f) => Timestamp::from_epoch_number(f64::from(*f)).ok(),
        Value::Ext(0, bytes) if bytes.len() == 8 => {
            let seconds = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let nanos = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
            Some(Timestamp::from_nanos(
                i64::from(seconds) * 1_000_000_000 + i64::from(nanos),
            ))
        }
        Value::Nil => Some(now),
        _ => None,
    }
    .ok_or_else(|| format!("time {time} is not seconds or an EventTime"))?;
    if !matches!(record, Value::Map(_)) {
        return Err("the record is not a map".into());
    }
    let mut document = String::with_capacity(256);
    write_json(&mut document, record);
    let document = document.into_bytes();
    let origin = Origin {
        protocol: "forward",
        key: "tag",
        name: tag,
    };
    document_entry(&document, origin, None, at)
}

/// A MessagePack value written as JSON text: binary as (lossy) text, extensions and numbers
/// JSON cannot hold (NaN, infinities) as null; a map's keys as text, in their order (a
/// repeated key once, with its first value).
fn write_json(out: &mut String, value: &Value) {
    match value {
        Value::Nil | Value::Ext(_, _) => out.push_str("null"),
        Value::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Integer(i) => match (i.as_i64(), i.as_u64()) {
            (Some(n), _) => out.push_str(&n.to_string()),
            (None, Some(n)) => out.push_str(&n.to_string()),
            (None, None) => out.push_str("null"),
        },
        Value::F32(f) => write_float(out, f64::from(*f)),
        Value::F64(f) => write_float(out, *f),
        Value::String(s) => match s.as_str() {
            Some(text) => push_json(out, text),
            None => push_json(out, &String::from_utf8_lossy(s.as_bytes())),
        },
        Value::Binary(b) => push_json(out, &String::from_utf8_lossy(b)),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(out, item);
            }
            out.push(']');
        }
        Value::Map(pairs) => {
            // A key said twice is kept once (its first value), as a JSON object can hold it.
            let mut seen = std::collections::HashSet::with_capacity(pairs.len());
            out.push('{');
            for (k, v) in pairs {
                let key = text(k).unwrap_or_else(|| k.to_string());
                if !seen.insert(key.clone()) {
                    continue;
                }
                if seen.len() > 1 {
                    out.push(',');
                }
                push_json(out, &key);
                out.push(':');
                write_json(out, v);
            }
            out.push('}');
        }
    }
}

fn write_float(out: &mut String, f: f64) {
    match serde_json::Number::from_f64(f) {
        Some(n) => out.push_str(&n.to_string()),
        None => out.push_str("null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(value: &Value) -> serde_json::Value {
        let mut out = String::new();
        write_json(&mut out, value);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"))
    }

    #[test]
    fn a_record_is_written_as_the_json_it_means() {
        let record = Value::Map(vec![
            (Value::from("log"), Value::from("line with \"quotes\"\n")),
            (Value::from("n"), Value::from(-3)),
            (Value::from("big"), Value::from(u64::MAX)),
            (Value::from("ratio"), Value::F64(0.25)),
            (Value::from("nan"), Value::F64(f64::NAN)),
            (Value::from("raw"), Value::Binary(b"bytes \xff".to_vec())),
            (Value::from("ext"), Value::Ext(5, vec![1, 2])),
            (
                Value::from(7),
                Value::Array(vec![Value::Nil, Value::from(true)]),
            ),
            (Value::from("n"), Value::from("a repeated key")),
        ]);
        assert_eq!(
            json(&record),
            serde_json::json!({
                "log": "line with \"quotes\"\n",
                "n": -3,
                "big": u64::MAX,
                "ratio": 0.25,
                "nan": null,
                "raw": "bytes \u{fffd}",
                "ext": null,
                "7": [null, true],
            })
        );
    }
}
