//! Sangsaeng: federated learning for manufacturing supply chains.
//!
//! This umbrella crate re-exports the member crates and holds [`localnet`], a
//! launcher that runs a whole federation on one machine (PKI, roster, coordinator
//! and participants over real mutual TLS on loopback). The end-to-end example and
//! the integration tests use it; a real deployment runs the two binaries instead.
//! [`simulate`] runs a whole federation of simulated sites in one process
//! (`sangsaeng simulate`), to try a plan before deployment.
//! [`membw`] is the memory-bandwidth probe of the benchmarks.
//!
//! - [`sangsaeng_common`]: plan, roster, PKI/TLS, data, model, FedAvg.
//! - [`sangsaeng_coordinator`]: the anchor company's coordinator.
//! - [`sangsaeng_participant`]: the supplier-side daemon.
//! - [`sangsaeng_proto`]: the `sangsaeng.v1` protocol.

pub mod localnet;
pub mod membw;
pub mod simulate;

pub use sangsaeng_common as common;
pub use sangsaeng_coordinator as coordinator;
pub use sangsaeng_participant as participant;
pub use sangsaeng_proto as proto;
