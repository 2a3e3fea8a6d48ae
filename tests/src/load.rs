//! Realistic log entries for the benchmarks, and a client that loads them into an
//! aggregator through its HTTP API as fast as it takes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ADMIN_TOKEN;

pub const SERVICES: [&str; 20] = [
    "api-gateway",
    "auth",
    "billing",
    "cart",
    "catalog",
    "checkout",
    "email",
    "inventory",
    "notifications",
    "orders",
    "payments",
    "pricing",
    "recommendations",
    "search",
    "sessions",
    "shipping",
    "tax",
    "users",
    "warehouse",
    "web",
];
/// Entries per request.
pub const BATCH: usize = 1000;

/// Requests in flight (`BENCH_IN_FLIGHT`, default 8).
pub fn in_flight() -> usize {
    std::env::var("BENCH_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

/// A steady ingest rate to hold (`BENCH_RATE`, entries a second), instead of as fast as the
/// aggregator acknowledges.
pub fn rate() -> Option<f64> {
    std::env::var("BENCH_RATE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|r| *r > 0.0)
}

/// A small deterministic generator (xorshift), so every run loads the same data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn hex(&mut self, len: usize) -> String {
        let mut s = String::with_capacity(len);
        while s.len() < len {
            s.push_str(&format!("{:016x}", self.next_u64()));
        }
        s.truncate(len);
        s
    }
}

/// One entry as a client would send it: ~200 bytes of message, a JSON context, some ids.
pub fn entry(rng: &mut Rng, n: usize, ts_ms: u64, out: &mut String) {
    let service = SERVICES[rng.below(SERVICES.len() as u64) as usize];
    let level = match rng.below(100) {
        0..=9 => "debug",
        10..=79 => "info",
        80..=91 => "warning",
        92..=98 => "error",
        _ => "critical",
    };
    let duration = (rng.below(2000) as f64) / 10.0 + (rng.below(100) as f64);
    let status = [200, 200, 200, 201, 204, 301, 400, 404, 500, 503][rng.below(10) as usize];
    // Twelve templates with variable parts, as real services log: ~200 bytes each.
    let mut message = match rng.below(12) {
        0 => format!(
            "GET /api/v1/{service}/items/{} returned {status} in {duration:.1} ms (upstream={service}-svc, cache=miss, bytes={}, client=10.{}.{}.{})",
            rng.below(100_000),
            rng.below(50_000),
            rng.below(256),
            rng.below(256),
            rng.below(256)
        ),
        1 => format!(
            "user {} logged in from 10.{}.{}.{} using Mozilla/5.0 (X11; Linux x86_64) session {} mfa=true region=eu-west-1",
            rng.below(1_000_000),
            rng.below(256),
            rng.below(256),
            rng.below(256),
            rng.hex(16)
        ),
        2 => format!(
            "payment {} failed: card declined by issuer (code {}); the order stays pending and the customer will be notified by email after {} s",
            rng.hex(12),
            rng.below(60),
            rng.below(30)
        ),
        3 => format!(
            "cache miss for key session:{} after {} ms; falling back to the primary database, which answered in {duration:.1} ms with {} rows",
            rng.hex(16),
            rng.below(50),
            rng.below(100)
        ),
        4 => format!(
            "db query took {duration:.2} ms: SELECT id, status, total, created_at FROM orders WHERE customer_id = {} AND status IN ('new', 'paid') ORDER BY created_at DESC LIMIT 50",
            rng.below(10_000_000)
        ),
        5 => format!(
            "worker {} processed job {}-{} from queue {service}.events in {duration:.1} ms (attempt {}, {} messages left, lag {} ms)",
            rng.below(64),
            rng.hex(8),
            rng.hex(4),
            rng.below(3) + 1,
            rng.below(10_000),
            rng.below(5_000)
        ),
        6 => format!(
            "retrying upstream call to {service}.svc.cluster.local:8080/internal/health attempt {} of 5 after connection reset by peer; backing off for {} ms",
            rng.below(5) + 1,
            rng.below(2_000)
        ),
        7 => format!(
            "order {} moved from {} to {} by {} after review; inventory reserved in warehouse {} and shipping label requested from the carrier",
            rng.below(100_000_000),
            ["new", "paid", "packed"][rng.below(3) as usize],
            ["shipped", "cancelled", "refunded"][rng.below(3) as usize],
            ["system", "operator", "customer"][rng.below(3) as usize],
            rng.below(40)
        ),
        8 => format!(
            "token for client {} expired {} s ago; issuing a new access token with scope orders:read orders:write valid for 3600 s (refresh token rotated)",
            rng.hex(10),
            rng.below(600)
        ),
        9 => format!(
            "health check of dependency redis-{} answered in {duration:.1} ms; pool has {} idle and {} active connections of 64, {} waiters queued",
            rng.below(6),
            rng.below(64),
            rng.below(64),
            rng.below(10)
        ),
        10 => format!(
            "rendered template emails/order_confirmation.html for order {} in {duration:.1} ms and queued the message to {} recipients via the smtp relay",
            rng.below(100_000_000),
            rng.below(4) + 1
        ),
        _ => format!(
            "garbage collection paused the process for {duration:.1} ms; heap {} MiB of {} MiB in use, {} objects freed in generation {}",
            rng.below(2_000),
            2_048,
            rng.below(5_000_000),
            rng.below(3)
        ),
    };
    // One entry in 500,000 carries a rare word, for the rare-term search.
    if n % 500_000 == 250_000 {
        message.push_str(&format!(" xylophone{}", n / 500_000));
    }
    out.push_str(&format!(
        r#"{{"timestamp":{ts_ms},"level":"{level}","service":"{service}","message":"{message}","context":{{"duration_ms":{duration:.1},"status":{status},"method":"GET","host":"node-{}","pod":"{service}-7d4b9c5f6-{}","region":"eu-west-1"}}"#,
        rng.below(12),
        rng.hex(5),
    ));
    if rng.below(2) == 0 {
        out.push_str(&format!(
            r#","trace_id":"{}","span_id":"{}""#,
            rng.hex(32),
            rng.hex(16)
        ));
    }
    if rng.below(2) == 0 {
        out.push_str(&format!(r#","request_id":"req-{}""#, rng.hex(12)));
    }
    if rng.below(3) == 0 {
        out.push_str(&format!(r#","user_id":"user-{}""#, rng.below(1_000_000)));
    }
    out.push('}');
}

/// Request bodies (JSON arrays of `BATCH` entries) and what they hold.
pub struct Bodies {
    pub bodies: Vec<Vec<u8>>,
    pub raw_ndjson_bytes: u64,
    pub span_ms: u64,
    pub end_ms: u64,
}

/// `total` entries with timestamps spread over the `span_ms` before now, in arrival order
/// with a little jitter, as a cluster's logs arrive.
pub fn generate(total: usize, span_ms: u64) -> Bodies {
    let end_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let start_ms = end_ms - span_ms;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut bodies = Vec::with_capacity(total / BATCH + 1);
    let mut raw = 0u64;
    let mut n = 0;
    while n < total {
        let mut body = String::with_capacity(BATCH * 520);
        body.push('[');
        for i in 0..BATCH.min(total - n) {
            if i > 0 {
                body.push(',');
            }
            let before = body.len();
            let ts = start_ms
                + (n as u64 * span_ms) / total as u64
                + rng.below(2000.min(span_ms.max(1)));
            entry(&mut rng, n, ts.min(end_ms), &mut body);
            raw += (body.len() - before + 1) as u64;
            n += 1;
        }
        body.push(']');
        bodies.push(body.into_bytes());
    }
    Bodies {
        bodies,
        raw_ndjson_bytes: raw,
        span_ms,
        end_ms,
    }
}

/// Posts every body to `{base}/api/logs` with `in_flight()` requests at a time, retrying
/// after 429/503; returns the tasks and the retry count.
pub fn send_all(
    client: &reqwest::Client,
    base: &str,
    bodies: Arc<Vec<Vec<u8>>>,
) -> (Vec<tokio::task::JoinHandle<()>>, Arc<AtomicUsize>) {
    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    let started = tokio::time::Instant::now();
    // With a rate, body `i` leaves no earlier than i × BATCH / rate seconds after the start.
    let pace = rate().map(|r| Duration::from_secs_f64(BATCH as f64 / r));
    for _ in 0..in_flight() {
        let (client, bodies, next, retries, url) = (
            client.clone(),
            bodies.clone(),
            next.clone(),
            retries.clone(),
            format!("{base}/api/logs"),
        );
        senders.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { return };
                if let Some(pace) = pace {
                    tokio::time::sleep_until(started + pace * i as u32).await;
                }
                loop {
                    let response = client
                        .post(&url)
                        .bearer_auth(ADMIN_TOKEN)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .expect("POST");
                    match response.status().as_u16() {
                        201 => break,
                        429 | 503 => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        other => panic!(
                            "POST answered {other}: {}",
                            response.text().await.unwrap_or_default()
                        ),
                    }
                }
            }
        }));
    }
    (senders, retries)
}

/// Stored lines: what the WAL hands a sink (slices of one record's NDJSON payload per
/// request body, as `Record::lines` gives them).
pub fn stored_lines(total: usize) -> Vec<bytes::Bytes> {
    let data = generate(total, 60_000);
    let mut lines = Vec::with_capacity(total);
    for body in &data.bodies {
        let mut payload = Vec::new();
        let mut ends = Vec::new();
        let entries: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap();
        for e in entries {
            let ts =
                logging_common::Timestamp::from_nanos(e["timestamp"].as_i64().unwrap() * 1_000_000);
            let level = logging_common::LogLevel::parse(e["level"].as_str().unwrap()).unwrap();
            let mut entry = logging_common::LogEntry::new(
                ts,
                level,
                e["service"].as_str().unwrap(),
                e["message"].as_str().unwrap(),
            );
            entry.context = serde_json::from_str(&e["context"].to_string()).unwrap();
            entry.trace_id = e["trace_id"].as_str().map(str::to_string);
            entry.span_id = e["span_id"].as_str().map(str::to_string);
            entry.request_id = e["request_id"].as_str().map(str::to_string);
            entry.user_id = e["user_id"].as_str().map(str::to_string);
            serde_json::to_writer(&mut payload, &entry).unwrap();
            ends.push(payload.len());
            payload.push(b'\n');
        }
        let payload = bytes::Bytes::from(payload);
        let mut start = 0;
        for end in ends {
            lines.push(payload.slice(start..end));
            start = end + 1;
        }
    }
    lines
}
