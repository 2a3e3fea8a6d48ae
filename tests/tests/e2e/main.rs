//! End-to-end tests: the real binaries, as processes, killed with SIGKILL.

mod config;
mod durability;
