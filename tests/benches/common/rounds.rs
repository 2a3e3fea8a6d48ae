//! What the off/on benchmarks (tracing, encryption) share: their settings, the CRI pod log
//! both sides read, and the median of their rounds.

use std::path::Path;

use super::cri;

/// A number from the environment (`BENCH_LINES`, `BENCH_ROUNDS`, …), else `default`.
pub fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes `lines` of the store issue's CRI data as one pod's log under `root`, where the
/// agent's default glob (`<root>/var/log/pods/*/*/*.log`) finds it.
pub fn write_pod_log(root: &Path, lines: usize) -> cri::Written {
    let dir =
        root.join("var/log/pods/shop_web-7d4b9c5f6-x2k9p_0e7b3c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6/web");
    std::fs::create_dir_all(&dir).unwrap();
    cri::write(&dir.join("0.log"), lines, 42)
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}
