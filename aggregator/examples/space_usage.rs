//! Where the embedded store's bytes go, per component and field.
//!
//! ```text
//! cargo run --release -p logging-aggregator --example space_usage -- ./data
//! ```

use std::collections::BTreeMap;

use tantivy::Index;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data_dir = std::env::args().nth(1).unwrap_or_else(|| "./data".into());
    let mut docs = 0u64;
    let mut by_part: BTreeMap<String, u64> = BTreeMap::new();
    for entry in std::fs::read_dir(std::path::Path::new(&data_dir).join("index"))? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let index = Index::open_in_dir(entry.path())?;
        let searcher = index.reader()?.searcher();
        docs += searcher.num_docs();
        for segment in searcher.space_usage()?.segments() {
            let mut add = |part: String, bytes: u64| *by_part.entry(part).or_default() += bytes;
            add("store".into(), segment.store().total().get_bytes());
            for (kind, usage) in [
                ("terms", segment.termdict()),
                ("postings", segment.postings()),
                ("positions", segment.positions()),
                ("columns", segment.fast_fields()),
                ("fieldnorms", segment.fieldnorms()),
            ] {
                for field in usage.fields() {
                    add(
                        format!("{kind}/{}", field.field_name()),
                        field.total().get_bytes(),
                    );
                }
            }
        }
    }
    let total: u64 = by_part.values().sum();
    println!(
        "{docs} entries, {:.1} MB, {:.1} bytes an entry",
        total as f64 / 1e6,
        total as f64 / docs.max(1) as f64
    );
    let mut parts: Vec<_> = by_part.into_iter().filter(|(_, b)| *b > 0).collect();
    parts.sort_by_key(|part| std::cmp::Reverse(part.1));
    for (part, bytes) in parts {
        println!(
            "{part:<28} {:>10.1} MB {:>7.1} B/entry {:>5.1}%",
            bytes as f64 / 1e6,
            bytes as f64 / docs.max(1) as f64,
            100.0 * bytes as f64 / total.max(1) as f64
        );
    }
    Ok(())
}
