//! Shared building blocks of Sangsaeng, used by the coordinator, the participant
//! daemon, the example and the tests.
//!
//! Map of the crate:
//! - [`error`]: the crate's one error enum.
//! - [`plan`] and [`roster`]: the typed, validated configuration files an anchor
//!   company writes (training plan, list of organisations).
//! - [`pki`] and [`tls`]: the project CA, CSR enrolment, and the rustls/tonic
//!   mutual-TLS configuration plus identity extraction from a peer certificate.
//! - [`channel`]: dialing the coordinator over mutual TLS with bounded timeouts.
//! - [`config_file`]: reading daemon config files (errors name file and key).
//! - [`data`]: reading a site's CSV line data, checking it against the plan's
//!   schema, federated feature statistics and scaling.
//! - [`process`]: logging set-up and SIGINT/SIGTERM handling shared by the daemons.
//! - [`model`]: the MLP's shape, parameter layout and seeded initialisation
//!   (plain Rust: the coordinator never loads burn).
//! - With the `train` feature (default): [`backend`], the single place that
//!   chooses the burn backend; [`mlp`], the burn module; [`train`], local
//!   training and evaluation.
//! - [`metrics`]: accuracy and macro-F1.
//! - [`encoding`]: update deltas on the wire: float32, float16, or int8 with a scale per chunk.
//! - [`fedavg`]: exact (order-independent) example-weighted aggregation of deltas.
//! - [`weights`]: model files (safetensors) and digests.
//! - [`digest`]: whole-object transfer digests, SHA-256 or BLAKE3, and their text form.
//! - [`signing`]: ECDSA P-256 signatures with an endpoint's TLS key, and DSSE
//!   envelopes (audit log entries, release provenance).
//! - [`wire`]: conversions between the protocol messages and these types.

#[cfg(feature = "train")]
pub mod backend;
pub mod channel;
pub mod config_file;
pub mod data;
pub mod digest;
pub mod encoding;
pub mod error;
pub mod fedavg;
pub mod metrics;
#[cfg(feature = "train")]
pub mod mlp;
pub mod model;
pub mod pki;
pub mod plan;
pub mod process;
pub mod roster;
pub mod signing;
pub mod tls;
#[cfg(feature = "train")]
pub mod train;
pub mod weights;
pub mod wire;

pub use error::{Error, Result};
