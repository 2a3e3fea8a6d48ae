//! The node agent: follows container log files and local sockets (syslog, a Unix socket),
//! turns their lines into entries, and ships them to the aggregator over mutual TLS without
//! losing or duplicating any (docs/design.md §3, §4, §5).
//!
//! Follow one line through the modules in order: [`discover`] finds the file, [`tail`] reads
//! it (runtime formats in [`decode`], stack traces in [`multiline`]), [`entry`] parses
//! ([`logging_common::parse`]), enriches ([`kubernetes`]) and redacts ([`redact`]) it, [`tailer`] batches it,
//! [`ship`] sends it, and [`checkpoint`] records it once acknowledged. Socket input
//! ([`sockets`], [`syslog`]) is written to the [`spool`] first, which is tailed like a file.

pub mod app;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod discover;
pub mod entry;
pub mod kubernetes;
pub mod multiline;
pub mod parsers;
pub mod redact;
pub mod ship;
pub mod sockets;
pub mod spool;
pub mod syslog;
pub mod tail;
pub mod tailer;
