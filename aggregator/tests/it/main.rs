//! The aggregator's integration tests: the whole service in-process, over real HTTP, against
//! SQLite and a real PostgreSQL.

mod support;

mod access;
mod alerts;
mod archive;
mod audit;
mod broker;
mod elastic_bulk;
mod elasticsearch;
mod errors;
mod forward;
mod ingest;
mod logs;
mod loki;
mod loki_push;
mod loki_query;
mod operations;
mod otlp;
mod query_backends;
mod search;
