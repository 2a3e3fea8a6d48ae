//! The embedded store's schema: which fields are searchable, which are columns for filters,
//! sorting and analytics, and what is stored.
//!
//! The entry itself is stored once, as the JSON the API returns (`src`, zstd-compressed by the
//! document store). Everything else exists only to find and count entries:
//!
//! | field | kind | used for |
//! |---|---|---|
//! | `id` | indexed bytes | lookup by id, dedup, hiding soft-deleted entries |
//! | `ts`, `seq` | i64/u64 columns | time ranges and the (timestamp, sequence) sort / cursor |
//! | `level` | indexed u64 column | `level` and `min_level` filters, analytics |
//! | `service` | indexed keyword column | filter, per-service analytics and stats |
//! | `trace_id` … `user_id`, `tags` | indexed keywords | exact filters |
//! | `message` | full text with positions | `q`: terms, phrases, boolean operators |
//! | `pattern` | u64 column | top message patterns |
//! | `num` | JSON columns | percentiles of numeric context fields (`num.duration_ms`) |
//! | `raw_len` | u64 column | raw bytes in stats |

use tantivy::schema::{
    BytesOptions, Field, INDEXED, IndexRecordOption, JsonObjectOptions, NumericOptions, STRING,
    Schema, SchemaBuilder, TextFieldIndexing, TextOptions,
};

/// Handles to the schema's fields.
#[derive(Clone, Debug)]
pub struct Fields {
    pub id: Field,
    pub ts: Field,
    pub seq: Field,
    pub level: Field,
    pub service: Field,
    pub trace_id: Field,
    pub span_id: Field,
    pub request_id: Field,
    pub correlation_id: Field,
    pub user_id: Field,
    pub tags: Field,
    pub message: Field,
    pub pattern: Field,
    pub num: Field,
    pub raw_len: Field,
    pub src: Field,
}

/// Names of the fields a `q` query may address as `field:value`.
pub const QUERYABLE_FIELDS: [&str; 8] = [
    "message",
    "service",
    "trace_id",
    "span_id",
    "request_id",
    "correlation_id",
    "user_id",
    "tags",
];

pub fn build(full_text: bool) -> (Schema, Fields) {
    let mut b = SchemaBuilder::new();
    let column = NumericOptions::default().set_fast();
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
        id: b.add_bytes_field("id", BytesOptions::default().set_indexed()),
        ts: b.add_i64_field("ts", column.clone()),
        seq: b.add_u64_field("seq", column.clone()),
        level: b.add_u64_field("level", column.clone() | INDEXED),
        service: b.add_text_field("service", STRING | tantivy::schema::FAST),
        trace_id: b.add_text_field("trace_id", STRING),
        span_id: b.add_text_field("span_id", STRING),
        request_id: b.add_text_field("request_id", STRING),
        correlation_id: b.add_text_field("correlation_id", STRING),
        user_id: b.add_text_field("user_id", STRING),
        tags: b.add_text_field("tags", STRING),
        message: b.add_text_field("message", message),
        pattern: b.add_u64_field("pattern", column.clone()),
        num: b.add_json_field("num", JsonObjectOptions::default().set_fast("raw")),
        raw_len: b.add_u64_field("raw_len", column),
        src: b.add_bytes_field("src", BytesOptions::default().set_stored()),
    };
    (b.build(), fields)
}
