//! End-to-end tests: the real binaries, as processes, killed with SIGKILL.

mod agent;
mod config;
mod durability;
mod encryption;
mod hostile;
mod manifests;
mod tracing;
