//! The embedded store's schema: which fields are searchable, which are columns for filters,
//! sorting and analytics, and what is stored.
//!
//! The entry itself is stored once, as the JSON the API returns (`src`, zstd-compressed by the
//! document store). Everything else exists only to find and count entries:
//!
//! | field | kind | used for |
//! |---|---|---|
//! | `id_key` | indexed u64 | lookup by id, dedup, hiding soft-deleted entries |
//! | `keys` | indexed u64 | exact filters on trace_id, request_id, correlation_id, user_id |
//! | `ts`, `seq` | i64/u64 columns | time ranges and the (timestamp, sequence) sort / cursor |
//! | `level` | indexed u64 column | `level` and `min_level` filters, analytics |
//! | `service` | indexed keyword column | filter, per-service analytics and stats |
//! | `tags` | indexed keywords | exact filter |
//! | `message` | full text with positions | `q`: terms, phrases, boolean operators |
//! | `pattern` | u64 column | top message patterns |
//! | `num` | JSON columns | percentiles of numeric context fields (`num.duration_ms`) |
//! | `raw_len` | u64 column | raw bytes in stats |
//!
//! Ids are indexed as 64-bit hashes (of the field and the value) rather than as text: a
//! trace id is 32 random hex characters, and kept as text its term-dictionary entry costs more
//! than the rest of the entry's index. A hash hit is confirmed against the stored entry where
//! a false one would matter (lookup by id, dedup); for filters the chance of a collision
//! among a day's ids is below 10^-12.

use tantivy::schema::{
    BytesOptions, FAST, Field, IndexRecordOption, JsonObjectOptions, NumericOptions, Schema,
    SchemaBuilder, TextFieldIndexing, TextOptions,
};
use uuid::Uuid;
use xxhash_rust::xxh3::xxh3_64;

/// Handles to the schema's fields.
#[derive(Clone, Debug)]
pub struct Fields {
    pub id_key: Field,
    pub keys: Field,
    pub ts: Field,
    pub seq: Field,
    pub level: Field,
    pub service: Field,
    pub tags: Field,
    pub message: Field,
    pub pattern: Field,
    pub num: Field,
    pub raw_len: Field,
    pub src: Field,
}

/// The id-like fields indexed in `keys`, each hashed with its own tag.
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
pub enum KeyKind {
    TraceId = 1,
    RequestId = 2,
    CorrelationId = 3,
    UserId = 4,
}

/// The `keys` term of an id-like value.
pub fn key_hash(kind: KeyKind, value: &str) -> u64 {
    let mut bytes = Vec::with_capacity(value.len() + 1);
    bytes.push(kind as u8);
    bytes.extend_from_slice(value.as_bytes());
    xxh3_64(&bytes)
}

/// The `id_key` term of an entry id.
pub fn id_hash(id: &Uuid) -> u64 {
    xxh3_64(id.as_bytes())
}

pub fn build(full_text: bool) -> (Schema, Fields) {
    let mut b = SchemaBuilder::new();
    let column = NumericOptions::default().set_fast();
    // Keywords: exact terms, no frequencies, no field norms (nothing here is scored).
    let keyword = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer("raw")
            .set_fieldnorms(false)
            .set_index_option(IndexRecordOption::Basic),
    );
    let message = if full_text {
        TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("default")
                .set_fieldnorms(false)
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        )
    } else {
        TextOptions::default()
    };
    let fields = Fields {
        id_key: b.add_u64_field("id_key", NumericOptions::default().set_indexed()),
        keys: b.add_u64_field("keys", NumericOptions::default().set_indexed()),
        ts: b.add_i64_field("ts", column.clone()),
        seq: b.add_u64_field("seq", column.clone()),
        level: b.add_u64_field("level", column.clone().set_indexed()),
        service: b.add_text_field("service", keyword.clone() | FAST),
        tags: b.add_text_field("tags", keyword),
        message: b.add_text_field("message", message),
        pattern: b.add_u64_field("pattern", column.clone()),
        num: b.add_json_field("num", JsonObjectOptions::default().set_fast("raw")),
        raw_len: b.add_u64_field("raw_len", column),
        src: b.add_bytes_field("src", BytesOptions::default().set_stored()),
    };
    (b.build(), fields)
}
