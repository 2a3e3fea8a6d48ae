//! The store issue's benchmark data, as `shared/bench/gen_cri.py` writes it: kubelet CRI
//! lines with JSON bodies (~183 bytes a line), timestamps spread over one hour of
//! 2026-11-27, in the same proportions (levels 8:1:1:1 info/warn/error/debug, seven
//! messages, five path prefixes with a number, statuses, a duration, one of 10,000 users and a
//! 48-bit request id). The same Python generator is not at hand on every machine, so this is
//! its port: the same distribution, deterministic for a seed, not the same random draws.

use std::io::Write;
use std::path::Path;

use logging_tests::load::Rng;

const LEVELS: [&str; 11] = [
    "info", "info", "info", "info", "info", "info", "info", "info", "warn", "error", "debug",
];
const MESSAGES: [&str; 7] = [
    "request handled",
    "cache miss",
    "upstream timeout",
    "user login",
    "db query executed",
    "retrying request",
    "config reloaded",
];
const PATHS: [&str; 5] = [
    "/api/v1/items/",
    "/api/v1/users/",
    "/api/v2/orders/",
    "/healthz/",
    "/api/v1/search/",
];
const STATUSES: [u32; 17] = [
    200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 201, 204, 301, 400, 404, 500, 503,
];
/// 2026-11-27T03:00:00Z.
const BASE_SECONDS: i64 = 1_795_748_400;

/// What was written.
pub struct Written {
    pub bytes: u64,
    /// The request id of the middle line: it occurs once.
    pub rare_request_id: String,
    /// The hour the lines span, as RFC 3339 start and end.
    pub hour: (String, String),
}

/// Writes `lines` CRI lines to `path`.
pub fn write(path: &Path, lines: usize, seed: u64) -> Written {
    let mut rng = Rng(seed.max(1));
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let step = 3_600_000_000_000i64 / lines.max(1) as i64;
    let mut bytes = 0u64;
    let mut rare = String::new();
    let mut text = String::with_capacity(256);
    for i in 0..lines {
        let ns = BASE_SECONDS * 1_000_000_000 + i as i64 * step + rng.below(1000) as i64;
        let ts = logging_common::Timestamp::from_nanos(ns);
        let mut stamp = String::with_capacity(32);
        ts.write_rfc3339(&mut stamp);
        // gen_cri.py writes all nine fraction digits.
        let stamp = nine_digits(&stamp);
        let stream = if rng.below(10) < 9 {
            "stdout"
        } else {
            "stderr"
        };
        let request_id = format!("{:012x}", rng.next_u64() & 0xffff_ffff_ffff);
        if i == lines / 2 {
            rare = request_id.clone();
        }
        text.clear();
        use std::fmt::Write as _;
        let _ = writeln!(
            text,
            "{stamp} {stream} F {{\"level\":\"{}\",\"msg\":\"{}\",\"path\":\"{}{}\",\"status\":{},\"duration_ms\":{:.3},\"user\":\"u-{}\",\"req_id\":\"{}\"}}",
            LEVELS[rng.below(LEVELS.len() as u64) as usize],
            MESSAGES[rng.below(MESSAGES.len() as u64) as usize],
            PATHS[rng.below(PATHS.len() as u64) as usize],
            rng.below(99_999) + 1,
            STATUSES[rng.below(STATUSES.len() as u64) as usize],
            rng.below(500_000) as f64 / 1000.0,
            rng.below(9_999) + 1,
            request_id,
        );
        bytes += text.len() as u64;
        file.write_all(text.as_bytes()).unwrap();
    }
    file.flush().unwrap();
    let at = |s: i64| logging_common::Timestamp::from_nanos(s * 1_000_000_000).to_rfc3339();
    Written {
        bytes,
        rare_request_id: rare,
        hour: (at(BASE_SECONDS), at(BASE_SECONDS + 3600)),
    }
}

/// `2026-11-27T03:00:00.5Z` → `2026-11-27T03:00:00.500000000Z`.
fn nine_digits(stamp: &str) -> String {
    let body = stamp.trim_end_matches('Z');
    match body.split_once('.') {
        Some((secs, frac)) => format!("{secs}.{frac:0<9}Z"),
        None => format!("{body}.000000000Z"),
    }
}
