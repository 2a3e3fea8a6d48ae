//! What the benchmark programs measure of the aggregator's store: waiting until it is at rest,
//! the bytes under its data directory, and latency percentiles. Shared by the benchmarks.

use std::path::Path;
use std::time::{Duration, Instant};

use logging_tests::ADMIN_TOKEN;
use serde_json::Value;

/// Waits until the store is at rest (everything flushed to parts, merges done, the WAL holding
/// nothing consumed), for three minutes at most; says so when it was not.
pub async fn wait_at_rest(client: &reqwest::Client, base: &str) {
    let started = Instant::now();
    loop {
        let stats: Value = match client
            .get(format!("{base}/api/logs/stats"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
        {
            Ok(response) => response.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        };
        let in_memory: u64 = stats["partitions"]
            .as_array()
            .map(|p| {
                p.iter()
                    .filter_map(|p| p["unflushed_entries"].as_u64())
                    .sum()
            })
            .unwrap_or(0);
        if stats["wal"]["bytes_on_disk"] == 0 && in_memory == 0 {
            return;
        }
        if started.elapsed() > Duration::from_secs(180) {
            println!("  (not at rest after 3 minutes: {})", stats["wal"]);
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Bytes of the files under `dir`, the aggregator's own log left out.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&entry.path()),
            Ok(_) if entry.file_name() == "aggregator.log" => 0,
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// p50 and p99 of `samples`, in milliseconds.
pub fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |p: f64| {
        let i = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.99))
}
