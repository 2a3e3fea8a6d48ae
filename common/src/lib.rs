//! What the agent and the aggregator share: the data model of the seed's specification, log
//! levels and timestamps as real software writes them, entry ids, validation of what clients
//! send, and the configuration loader.

pub mod config;
pub mod crypto;
pub mod detect;
pub mod id;
pub mod level;
pub mod model;
pub mod parse;
pub mod telemetry;
pub mod timestamp;
pub mod tls;
pub mod validate;

pub use level::LogLevel;
pub use model::{Alert, AlertSeverity, AlertStatus, AuditEntry, Context, LogEntry};
pub use timestamp::Timestamp;
