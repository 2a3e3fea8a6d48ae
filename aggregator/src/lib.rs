//! The logging aggregator: durable ingest, the embedded log store, the audit trail and the
//! operator API. `main.rs` only reads the configuration and calls [`app::start`], so tests run
//! the whole service in-process.
//!
//! Follow one entry: [`api`] (`POST /api/logs`) → [`ingest`] (validate, enrich) → [`wal`]
//! (dedup, group commit, fsync: now it is acknowledged) → [`index::indexer`] (the WAL
//! consumer that feeds the day partitions of [`index`]) → reads through [`api`] again.

pub mod alerts;
pub mod api;
pub mod app;
pub mod archive;
pub mod auth;
pub mod broker;
pub mod certs;
pub mod config;
pub mod db;
pub mod error;
pub mod forward;
pub mod index;
pub mod ingest;
pub mod listeners;
pub mod logql;
pub mod read;
pub mod sinks;
pub mod wal;
