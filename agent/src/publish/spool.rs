//! The crash-safe outbox spool (being written).
