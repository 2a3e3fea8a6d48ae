//! The agent's integration tests.
