//! What the coordinator keeps on disk beyond one run: the crash-safe record it
//! resumes from, and the signed audit log releases are decided on.
//!
//! - [`store`]: the durable record (redb): trainings, committed models, and each
//!   accepted update of the round in progress, fsynced before it is acknowledged.
//! - [`audit`]: the signed, hash-chained audit log (`audit.jsonl`) and its verification.
//!
//! Neither depends on the in-memory state ([`crate::state`]) or the round logic:
//! both sit below them.

pub mod audit;
pub mod store;
