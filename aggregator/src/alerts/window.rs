//! Sliding windows, updated as entries pass: time buckets (about sixty per window) holding
//! counts, error counts, sums, maxima and, for percentiles, a log-scale histogram with 1%
//! relative error. Reading a window is a merge of its buckets, so the cost of a rule does not
//! depend on how many entries are stored, only on how many groups it tracks.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Relative accuracy of the percentile histogram.
const GAMMA: f64 = 1.02;

/// The width of a window's buckets: about sixty per window, at least 100 ms.
pub fn bucket_nanos(window_nanos: i64) -> i64 {
    (window_nanos / 60).max(100_000_000)
}

/// One time slice of a window.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Bucket {
    /// `timestamp / width` of the entries it holds.
    pub index: i64,
    pub count: u64,
    pub errors: u64,
    pub sum: f64,
    pub max: Option<f64>,
    /// Histogram of values: log_gamma bucket → count (positive values; zero and negatives
    /// in their own keys).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        with = "sketch_pairs"
    )]
    pub sketch: BTreeMap<i32, u64>,
}

/// The sketch on disk: `[[key, count], …]`. A map with integer keys cannot go through the
/// snapshot's tagged enum (serde buffers it, and the keys come back as strings that no longer
/// parse as `i32`); pairs survive any wrapping. Maps with string keys, as the first format
/// wrote them, are still read.
mod sketch_pairs {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{MapAccess, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sketch: &BTreeMap<i32, u64>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(sketch.iter().map(|(k, v)| (*k, *v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<i32, u64>, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = BTreeMap<i32, u64>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("[[key, count], …] or {\"key\": count, …}")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = seq.next_element::<(i32, u64)>()? {
                    out.insert(k, v);
                }
                Ok(out)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, u64>()? {
                    let k = k.parse::<i32>().map_err(serde::de::Error::custom)?;
                    out.insert(k, v);
                }
                Ok(out)
            }
        }
        d.deserialize_any(Pairs)
    }
}

impl Bucket {
    fn at(index: i64) -> Bucket {
        Bucket {
            index,
            ..Bucket::default()
        }
    }
}

/// What one group of one rule has seen.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Series {
    pub buckets: VecDeque<Bucket>,
    /// Timestamp (ns) of the newest entry seen, for absence.
    pub last_seen: Option<i64>,
    /// The group's labels (`service` → `checkout`…).
    pub labels: BTreeMap<String, String>,
}

/// A window read at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub errors: u64,
    pub sum: f64,
    pub max: Option<f64>,
    pub sketch: BTreeMap<i32, u64>,
}

fn sketch_key(value: f64) -> i32 {
    if value > 0.0 {
        // Bucket k holds (gamma^(k-1), gamma^k]; offset so that keys stay positive-ish.
        (value.ln() / GAMMA.ln()).ceil() as i32
    } else if value == 0.0 {
        i32::MIN
    } else {
        // Negative values are rare in latency-like fields: one coarse key each sign.
        i32::MIN + 1
    }
}

fn sketch_value(key: i32) -> f64 {
    match key {
        i32::MIN => 0.0,
        k if k == i32::MIN + 1 => -1.0,
        // The middle of the bucket, in log space: relative error under (gamma - 1) / 2.
        k => 2.0 * GAMMA.powi(k) / (GAMMA + 1.0),
    }
}

impl Series {
    /// Adds one entry at `ts` (ns).
    pub fn observe(&mut self, ts: i64, width: i64, error: bool, value: Option<(f64, bool)>) {
        let index = ts.div_euclid(width);
        // Entries come in time order nearly always: the newest bucket is the one.
        let bucket = if let Some(newest) = self.buckets.back_mut().filter(|b| b.index == index) {
            newest
        } else {
            self.insert_bucket(index)
        };
        bucket.count += 1;
        if error {
            bucket.errors += 1;
        }
        if let Some((value, with_sketch)) = value {
            bucket.sum += value;
            bucket.max = Some(bucket.max.map_or(value, |m| m.max(value)));
            if with_sketch {
                *bucket.sketch.entry(sketch_key(value)).or_insert(0) += 1;
            }
        }
        self.last_seen = Some(self.last_seen.map_or(ts, |t| t.max(ts)));
    }

    /// The bucket of `index`, made where it belongs if there is none yet.
    fn insert_bucket(&mut self, index: i64) -> &mut Bucket {
        let at = match self.buckets.iter().rposition(|b| b.index <= index) {
            Some(i) if self.buckets[i].index == index => i,
            Some(i) => {
                self.buckets.insert(i + 1, Bucket::at(index));
                i + 1
            }
            None => {
                self.buckets.push_front(Bucket::at(index));
                0
            }
        };
        &mut self.buckets[at]
    }

    /// Drops buckets that ended before the window that ends at `now`.
    pub fn expire(&mut self, now: i64, window: i64, width: i64) {
        let first = (now - window).div_euclid(width) + 1;
        while self.buckets.front().is_some_and(|b| b.index < first) {
            self.buckets.pop_front();
        }
    }

    /// The window ending at `now`.
    pub fn summary(&self, now: i64, window: i64, width: i64) -> Summary {
        let first = (now - window).div_euclid(width) + 1;
        let last = now.div_euclid(width);
        let mut out = Summary::default();
        for bucket in self
            .buckets
            .iter()
            .filter(|b| b.index >= first && b.index <= last)
        {
            out.count += bucket.count;
            out.errors += bucket.errors;
            out.sum += bucket.sum;
            if let Some(m) = bucket.max {
                out.max = Some(out.max.map_or(m, |o: f64| o.max(m)));
            }
            for (key, n) in &bucket.sketch {
                *out.sketch.entry(*key).or_insert(0) += n;
            }
        }
        out
    }
}

impl Summary {
    /// The `q` quantile of the values (nearest rank), within the histogram's accuracy.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.sketch.values().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (key, n) in &self.sketch {
            seen += n;
            if seen >= rank {
                let value = sketch_value(*key);
                // Never report more than the largest value really seen.
                return Some(self.max.map_or(value, |m| value.min(m)));
            }
        }
        self.max
    }

    pub fn average(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    #[test]
    fn a_window_counts_what_is_inside_it_and_forgets_the_rest() {
        let window = 60 * S;
        let width = bucket_nanos(window);
        let mut series = Series::default();
        for t in 0..120 {
            series.observe(t * S, width, t % 10 == 0, None);
        }
        let now = 119 * S;
        let summary = series.summary(now, window, width);
        assert_eq!(summary.count, 60);
        assert_eq!(summary.errors, 6);
        series.expire(now, window, width);
        assert_eq!(series.buckets.len(), 60);
        // Late entries land in their own (older) bucket, in order.
        series.observe(100 * S, width, false, None);
        assert_eq!(series.summary(now, window, width).count, 61);
        assert!(
            series
                .buckets
                .iter()
                .zip(series.buckets.iter().skip(1))
                .all(|(a, b)| a.index < b.index)
        );
        assert_eq!(series.last_seen, Some(119 * S));
        // After a gap, and into the gap: new buckets, still in order.
        series.observe(200 * S, width, false, None);
        series.observe(150 * S, width, false, None);
        series.observe(150 * S, width, true, None);
        let indexes: Vec<i64> = series.buckets.iter().map(|b| b.index).collect();
        assert_eq!(&indexes[indexes.len() - 3..], &[119, 150, 200]);
        assert_eq!(series.buckets[indexes.len() - 2].count, 2);
        assert_eq!(series.buckets[indexes.len() - 2].errors, 1);
        assert_eq!(series.last_seen, Some(200 * S));
    }

    #[test]
    fn percentiles_are_within_one_percent() {
        let window = 300 * S;
        let width = bucket_nanos(window);
        let mut series = Series::default();
        for i in 1..=10_000 {
            series.observe(
                i64::from(i % 300) * S,
                width,
                false,
                Some((f64::from(i), true)),
            );
        }
        let summary = series.summary(299 * S, window, width);
        for (q, exact) in [(0.5, 5000.0), (0.95, 9500.0), (0.99, 9900.0)] {
            let got = summary.quantile(q).unwrap();
            assert!((got - exact).abs() / exact < 0.01, "p{q}: {got} vs {exact}");
        }
        assert_eq!(summary.max, Some(10_000.0));
        assert_eq!(summary.average(), Some(5000.5));
    }
}
